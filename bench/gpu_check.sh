#!/usr/bin/env bash
# GPU check for a bare NVIDIA machine with no Redis and no PostgreSQL (everything runs embedded:
# SQLite ledger + kombu's filesystem broker under a scratch TEXTNLP_HOME). Needs no network.
#
#   bash bench/gpu_check.sh            # from anywhere; ~4-5 minutes on one H100
#
# The caller provides python3 with torch + transformers, and our other dependencies on PYTHONPATH
# (e.g. wheels unpacked into /tmp/site). Steps, each under `timeout`:
#   1. the GPUs (nvidia-smi -L, memory) and the Python stack;
#   2. bench/throughput.py on `small` and `demo`, embedded, on cuda.0 (builds bench/.models once);
#   3. one worker per GPU: `python -m textnlp_jobs.cli worker --all-devices`, then per GPU a job
#      pinned to cuda.i must be run by that GPU's worker; each worker's process must see exactly
#      one GPU (its CUDA context shows on that GPU alone in nvidia-smi; pin_device leaves torch one
#      device); GPU memory per GPU and per worker process.
# Knobs (environment): PYTHON, DEVICE (cuda.0), SMALL_ARGS, DEMO_ARGS, GPU_CHECK_LOGS (log folder),
# GPU_CHECK_ALLOW_CPU=1 (dry run of the whole script on a machine without GPUs, on cpu.0).
# With $OUT set (the device runner), result files are copied there. Exit status: 0 when every step
# passed, else the number of failed steps.

set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LOGS=${GPU_CHECK_LOGS:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$LOGS"
FAILED=0
STARTED=$SECONDS

say() { printf '\n=== [%3ds] %s\n' "$((SECONDS - STARTED))" "$*"; }

# step NAME SECONDS CMD...: run under timeout, log to $LOGS/NAME.log and the terminal.
step() {
    local name=$1 limit=$2 rc t0=$SECONDS
    shift 2
    say "$name (limit ${limit}s): $*"
    timeout -k 25 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
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
    echo "nvidia-smi not found: this check needs NVIDIA GPUs (GPU_CHECK_ALLOW_CPU=1 for a dry run)" >&2
    exit 2
fi
if [ "$HAVE_GPU" = 1 ]; then
    DEVICE=${DEVICE:-cuda.0}
    SMALL_ARGS=${SMALL_ARGS:---model small --jobs 512 --batch 32 --unbatched-jobs 64 --latency-seconds 10}
    DEMO_ARGS=${DEMO_ARGS:---model demo --jobs 512 --batch 32 --unbatched-jobs 32 --latency-seconds 5}
else
    DEVICE=${DEVICE:-cpu.0}
    SMALL_ARGS=${SMALL_ARGS:---model tiny --jobs 32 --batch 8 --unbatched-jobs 8 --latency-seconds 3}
    DEMO_ARGS=${DEMO_ARGS:---model demo --jobs 32 --batch 8 --unbatched-jobs 8 --latency-seconds 3}
fi

gpu_memory() {
    [ "$HAVE_GPU" = 1 ] || { echo "(no GPU)"; return 0; }
    timeout 20 nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv
}

# --- 1. the machine -----------------------------------------------------------------------
say "machine"
if [ "$HAVE_GPU" = 1 ]; then
    timeout 20 nvidia-smi -L
    gpu_memory
fi
step python-stack 60 "$PY" -c '
import sys, torch, transformers, celery, kombu, sqlalchemy, pydantic_settings
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| GPUs visible to torch:", torch.cuda.device_count(), "| transformers", transformers.__version__,
      "| celery", celery.__version__, "| kombu", kombu.__version__, "| sqlalchemy", sqlalchemy.__version__,
      "| torch threads", torch.get_num_threads())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name} {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
'

# --- 2. throughput, embedded, on one GPU --------------------------------------------------
# shellcheck disable=SC2086  # the *_ARGS are word lists on purpose
step bench-small 150 "$PY" bench/throughput.py $SMALL_ARGS --device "$DEVICE" --embedded
# The demo model trains for a while on the CPU the first time (carry bench/.models/demo to skip it).
DEMO_LIMIT=110
compgen -G "bench/.models/demo/[!.]*" >/dev/null || DEMO_LIMIT=240
# shellcheck disable=SC2086
step bench-demo "$DEMO_LIMIT" "$PY" bench/throughput.py $DEMO_ARGS --device "$DEVICE" --embedded
gpu_memory

# --- 3. one worker per GPU ----------------------------------------------------------------
HOME_DIR=$(mktemp -d /tmp/gpu_check_home.XXXXXX)
export TEXTNLP_HOME="$HOME_DIR" TEXTNLP_MODEL_STORE="$REPO/bench/.models" TEXTNLP_NODE_NAME=gpucheck
export TEXTNLP_PLACEMENT='{"*": ["demo"]}' TEXTNLP_BATCHING='{"*": {"max_batch": 8, "max_wait_ms": 20}}'
if [ "$HAVE_GPU" = 1 ]; then
    NGPU=$(timeout 20 nvidia-smi -L | grep -c '^GPU ')
    DEVICES=$(seq -s ' ' -f 'cuda.%g' 0 $((NGPU - 1)))
else
    DEVICES=cpu.0
fi

step register-demo 120 "$PY" - <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "bench")
import throughput  # noqa: E402  (bench/throughput.py: builds bench/.models/demo if missing)
from textnlp_jobs.db.migrate import upgrade
from textnlp_jobs.db.session import session_factory
from textnlp_jobs.inference import store
from textnlp_jobs.settings import get_settings

settings = get_settings()
version, path = throughput.ensure_model("demo")
upgrade(settings.database_url_value())
with session_factory(settings).begin() as session:
    store.register_version(session, "demo", path)
print(f"registered demo {version} in {settings.database_url_value()}")
EOF

if [ "$HAVE_GPU" = 1 ]; then
    say "pin_device leaves exactly one GPU to torch, per GPU (the code path of workers.device)"
    for i in $(seq 0 $((NGPU - 1))); do
        timeout 90 "$PY" -c "
from workers.device import pin_device
pin_device('cuda', $i)
import os, torch
n = torch.cuda.device_count()
print(f'cuda.$i: CUDA_VISIBLE_DEVICES={os.environ[\"CUDA_VISIBLE_DEVICES\"]} torch sees {n} GPU(s): '
      f'{torch.cuda.get_device_name(0) if n else None}', 'OK' if n == 1 else 'FAIL')
raise SystemExit(0 if n == 1 else 1)
" > "$LOGS/pin-$i.log" 2>&1 &
    done
    wait
    cat "$LOGS"/pin-*.log
    if grep -q FAIL "$LOGS"/pin-*.log || [ "$(grep -c ' OK$' "$LOGS"/pin-*.log | awk -F: '{s+=$NF} END {print s}')" -ne "$NGPU" ]; then
        FAILED=$((FAILED + 1)); echo "!!! pinning check FAILED"
    fi
fi

say "starting: $PY -m textnlp_jobs.cli worker --all-devices --models demo (devices: $DEVICES)"
setsid "$PY" -m textnlp_jobs.cli worker --all-devices --models demo --loglevel INFO \
    > "$LOGS/workers.log" 2>&1 &
SUPERVISOR=$!
stop_workers() {
    if kill -0 "$SUPERVISOR" 2>/dev/null; then
        kill -TERM -- "-$SUPERVISOR" 2>/dev/null
        for _ in $(seq 1 40); do kill -0 "$SUPERVISOR" 2>/dev/null || break; sleep 0.5; done
        kill -KILL -- "-$SUPERVISOR" 2>/dev/null
    fi
    return 0
}
trap stop_workers EXIT

# shellcheck disable=SC2086
step per-device-jobs 120 "$PY" - $DEVICES <<'EOF'
"""Wait for every device worker, pin one job to each device, check who ran it; then jobs left
to any device, to show the shared model queue spreads them."""
import collections
import subprocess
import sys
import time

from textnlp_jobs.client import Client
from textnlp_jobs.settings import get_settings
from workers.device import worker_hostname

devices = sys.argv[1:]
settings = get_settings()
client = Client(settings)
waiting = {worker_hostname(settings, d): d for d in devices}
give_up = time.monotonic() + 90
while waiting and time.monotonic() < give_up:
    for reply in client.celery.control.ping(destination=list(waiting), timeout=1.0) or []:
        for host in reply:
            print(f"worker {host} ready")
            waiting.pop(host, None)
if waiting:
    sys.exit(f"workers not ready after 90s: {sorted(waiting)}")

pinned = {d: client.submit("The default value is", model="demo", max_new_tokens=8, device=d).id for d in devices}
free = [client.submit(f"Return a new list of {i} items", model="demo", max_new_tokens=8).id
        for i in range(8 * len(devices))]
bad = 0
for device, job in zip(pinned, client.wait(list(pinned.values()), timeout=60)):
    expected = f"{settings.node_name}/{device}"
    ok = job.status == "succeeded" and job.worker == expected
    bad += not ok
    print(f"pinned to {device}: status={job.status} worker={job.worker} text={job.text!r} "
          f"{'OK' if ok else 'FAIL (expected ' + expected + ')'}")
ran = collections.Counter((j.worker, j.status) for j in client.wait(free, timeout=60))
print("unpinned jobs by (worker, status):", dict(ran))
bad += sum(n for (_, status), n in ran.items() if status != "succeeded")
sys.exit(1 if bad else 0)
EOF

say "GPU memory with the workers loaded"
gpu_memory
if [ "$HAVE_GPU" = 1 ]; then
    WORKER_PIDS=$(pgrep -P "$SUPERVISOR" | tr '\n' ' ')
    echo "worker pids (children of the supervisor $SUPERVISOR): $WORKER_PIDS"
    timeout 20 nvidia-smi --query-gpu=index,uuid --format=csv,noheader > "$LOGS/gpus.csv"
    timeout 20 nvidia-smi --query-compute-apps=pid,gpu_uuid,used_memory --format=csv,noheader > "$LOGS/apps.csv"
    echo "GPU processes (pid, GPU index, memory):"
    while IFS=', ' read -r pid uuid mem unit; do
        idx=$(awk -F', ' -v u="$uuid" '$2 == u {print $1}' "$LOGS/gpus.csv")
        mark=""; case " $WORKER_PIDS " in *" $pid "*) mark="  <- device worker";; esac
        echo "  pid $pid  GPU $idx  $mem $unit$mark"
    done < "$LOGS/apps.csv"
    for pid in $WORKER_PIDS; do
        n=$(grep -c "^$pid," "$LOGS/apps.csv")
        echo "worker pid $pid has a CUDA context on $n GPU(s)$([ "$n" -eq 1 ] && echo ' OK' || echo ' (nvidia-smi may not show pids inside a container)')"
    done
fi
if grep -rqE "MEMORY_USAGE\.(labels|set)" textnlp_jobs workers; then
    echo "textnlp_model_memory_usage_bytes in worker logs:"; grep -h "memory_usage" "$LOGS/workers.log" | tail -5
else
    echo "textnlp_model_memory_usage_bytes: not recorded by this version (the gauge is defined in"
    echo "  textnlp_jobs/metrics/registry.py but no code sets it); nvidia-smi above stands in for it."
fi
# (workers.device's own INFO lines are logged before Celery configures logging, so they do not
# show; Celery's banner names each worker and its queues.)
grep -hE "starting [0-9]+ device worker|-------------- gen-|\.> textnlp\.|concurrency:" "$LOGS/workers.log" | head -40

stop_workers
trap - EXIT

# --- summary ------------------------------------------------------------------------------
say "summary"
grep -h '^BENCH_RESULT ' "$LOGS"/bench-*.log > "$LOGS/bench_results.jsonl" 2>/dev/null
"$PY" - "$LOGS/bench_results.jsonl" <<'EOF' || true
import json, sys
for line in open(sys.argv[1]):
    data = json.loads(line.split(" ", 1)[1])
    m = data["machine"]
    for r in data["results"]:
        sb, su, lat = r.get("system_batched") or {}, r.get("system_unbatched") or {}, r.get("latency") or {}
        f = lambda v, d=1: "-" if v is None else f"{v:,.{d}f}"
        print(f"{r['model']:>6} on {m['device_name']}: direct {f(r['direct_batched']['tokens_per_s'])} tok/s | "
              f"system {f(sb.get('tokens_per_s'))} tok/s ({f(r.get('system_vs_direct_batched'), 3)} of direct) | "
              f"batch-1 system {f(su.get('tokens_per_s'))} tok/s, batching gain {f(r.get('batching_gain_system'), 2)}x | "
              f"overhead {f(r.get('overhead_ms_per_job_batched'), 2)} ms/job | "
              f"p50/p95 {f(lat.get('latency_p50_ms'))}/{f(lat.get('latency_p95_ms'))} ms")
EOF
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    cp "$LOGS/bench_results.jsonl" "$LOGS/bench-small.log" "$LOGS/bench-demo.log" "$LOGS/per-device-jobs.log" \
       "$LOGS/workers.log" "$OUT/" 2>/dev/null
fi
rm -rf "$HOME_DIR"
echo "logs in $LOGS; $FAILED step(s) failed; $((SECONDS - STARTED))s in all"
exit "$FAILED"
