# One image for every role: producers, device workers, maintenance worker, beat, Flower.
# GPU hosts use a CUDA base and a CUDA build of torch; set TORCH_SPEC accordingly, e.g.
#   docker build --build-arg BASE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 ...
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG TORCH_SPEC="torch==2.13.0"
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TEXTNLP_HOME=/var/lib/textnlp
WORKDIR /app
COPY pyproject.toml README.md beat_schedule.py ./
COPY textnlp_jobs ./textnlp_jobs
COPY workers ./workers
COPY migrations ./migrations
RUN pip install --no-cache-dir "${TORCH_SPEC}" && pip install --no-cache-dir -e .
RUN useradd --system --home /var/lib/textnlp textnlp && mkdir -p /var/lib/textnlp && chown textnlp /var/lib/textnlp
USER textnlp
HEALTHCHECK CMD ["textnlp-jobs", "check"]
ENTRYPOINT ["textnlp-jobs"]
