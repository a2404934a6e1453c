# One image for every role: producers, device workers, maintenance worker, beat, Flower.
# The image holds the built wheel, not a checkout: what runs here is what `pip install` gives a user.
# GPU hosts use a CUDA base and a CUDA build of torch, e.g.
#   docker build --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# CPU-only images: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu (a much smaller torch).
ARG BASE=python:3.11-slim

FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY textnlp_jobs ./textnlp_jobs
RUN pip wheel --no-cache-dir --no-deps -w /wheels .

FROM ${BASE}
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=""
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TEXTNLP_HOME=/var/lib/textnlp
COPY --from=wheel /wheels /tmp/wheels
# torch first and alone: the pin picks the version, TORCH_INDEX picks the build (CPU or CUDA).
RUN pip install --no-cache-dir ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "${TORCH_SPEC}" \
 && pip install --no-cache-dir /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels
RUN useradd --system --home /var/lib/textnlp textnlp && mkdir -p /var/lib/textnlp && chown textnlp /var/lib/textnlp
USER textnlp
WORKDIR /var/lib/textnlp
HEALTHCHECK CMD ["textnlp-jobs", "check"]
ENTRYPOINT ["textnlp-jobs"]
