#!/usr/bin/env bash
# Run bench/throughput.py on a 2-core machine split the way a GPU machine splits the work: the
# device loop thread alone on CPU 1 (the direct runs, then the loop thread of the worker's engine
# process); everything else on CPU 0 (PostgreSQL, Redis, the benchmark's client, the worker, and
# the engine process's other threads: job intake and tokenization, results, drop checks).
# Unpinned, those steal the loop's only core, which a 16-core GPU host never does: there they
# slow the loop only by holding the GIL, and that is what this split leaves in. Its limit: CPU 0 is
# oversubscribed, so a thread holding the GIL there can be descheduled while the loop waits for
# it, which a 16-core host rarely does; results move a lot from run to run (bench/README.md).
#
#   bash bench/pinned.sh --model launch --jobs 1024 --batch 128 --batches 128 \
#       --max-new-tokens-range 8:128 --hf-max-batch-tokens= --latency-seconds 0 --torch-threads 1
#
# After each system run it prints the CPU time of the worker's and the engine process's threads
# during that run (from /proc). Needs taskset, and py-spy (pip install py-spy) to find the loop
# thread and name threads; without it the whole engine process gets CPU 1.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
PY_SPY=$(dirname "$PYTHON")/py-spy
[ "$(nproc)" -ge 2 ] || { echo "pinned.sh needs 2 CPUs" >&2; exit 2; }

for pid in $(pgrep -x postgres || true) $(pgrep -x redis-server || true); do
  taskset -a -p 1 "$pid" >/dev/null 2>&1 || true
done

descendants() {  # every process under $1
  local child
  for child in $(pgrep -P "$1" || true); do
    echo "$child"
    descendants "$child"
  done
}
role_of() {  # worker, engine (the worker's spawn child) or other
  local cmdline
  cmdline=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || { echo gone; return; }
  case $cmdline in
    *spawn_main*) echo engine ;;
    *textnlp_jobs.worker_main*) echo worker ;;
    *) echo other ;;
  esac
}

pin_loop_thread() {  # the engine process's device loop thread to CPU 1, once it has started
  local pid=$1 line
  while kill -0 "$pid" 2>/dev/null; do
    while read -r line; do
      if [[ $line =~ ^Thread\ ([0-9]+)\ \(.*\):\ \"(continuous|batcher)- ]]; then
        taskset -p 2 "${BASH_REMATCH[1]}" >/dev/null
        echo "[pinned] engine $pid: loop thread ${BASH_REMATCH[1]} on CPU 1, its other threads on CPU 0"
        return
      fi
    done < <("$PY_SPY" dump --pid "$pid" 2>/dev/null || true)
    sleep 1
  done
}

pin_loop() {  # pin each new process under the benchmark, until it ends
  local bench=$1 pid
  declare -A seen
  while kill -0 "$bench" 2>/dev/null; do
    for pid in $(descendants "$bench"); do
      [ -z "${seen[$pid]:-}" ] || continue
      seen[$pid]=1
      case $(role_of "$pid") in
        engine) if [ -x "$PY_SPY" ]; then
                  taskset -a -p 1 "$pid" >/dev/null 2>&1 || true
                  pin_loop_thread "$pid" &
                else  # the loop thread cannot be found: the whole engine process gets CPU 1
                  echo "[pinned] no py-spy: engine $pid, all its threads, on CPU 1" >&2
                  taskset -a -p 2 "$pid" >/dev/null 2>&1 || true
                fi ;;
        worker) taskset -a -p 1 "$pid" >/dev/null 2>&1 || true
                taskset -a -p 1 "$bench" >/dev/null 2>&1 || true ;;  # its direct runs are over
        *) taskset -a -p 1 "$pid" >/dev/null 2>&1 || true ;;
      esac
    done
    sleep 0.2
  done
}

declare -A before
thread_ticks() {  # "pid/tid ticks" for each thread of the worker and its engine process
  local pid task stat
  for pid in $(descendants "$1"); do
    case $(role_of "$pid") in worker|engine) ;; *) continue ;; esac
    for task in /proc/"$pid"/task/*; do
      stat=$(cat "$task/stat" 2>/dev/null) || continue
      read -r -a fields <<<"${stat##*) }"  # fields from the state on: utime and stime are 11 and 12
      echo "$pid/${task##*/} $(( fields[11] + fields[12] ))"
    done
  done
}
report() {  # the CPU each thread used since `before`, by process
  local bench=$1 hz pid key ticks line total
  hz=$(getconf CLK_TCK)
  declare -A now names
  while read -r key ticks; do now[$key]=$ticks; done < <(thread_ticks "$bench")
  for pid in $(descendants "$bench"); do
    case $(role_of "$pid") in worker|engine) ;; *) continue ;; esac
    if [ -x "$PY_SPY" ]; then
      while read -r line; do
        [[ $line =~ ^Thread\ ([0-9]+)\ \(.*\):\ \"(.*)\" ]] && names[$pid/${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
      done < <("$PY_SPY" dump --pid "$pid" 2>/dev/null || true)
    fi
    line="    cpu ms, $(role_of "$pid"):"
    total=0
    for key in "${!now[@]}"; do
      [[ $key == "$pid/"* ]] || continue
      ticks=$(( (now[$key] - ${before[$key]:-0}) * 1000 / hz ))
      total=$(( total + ticks ))
      [ "$ticks" -gt 0 ] && line+=" ${names[$key]:-tid ${key#*/}}=$ticks"
    done
    echo "$line | total $total"
  done
}

fifo=$(mktemp -u)
mkfifo "$fifo"
taskset 2 "$PYTHON" bench/throughput.py "$@" >"$fifo" 2>&1 &
bench=$!
trap 'kill $bench 2>/dev/null || true; rm -f "$fifo"' EXIT
pin_loop "$bench" &
while IFS= read -r line; do
  printf '%s\n' "$line"
  case $line in
    *": system, "*" jobs, max_batch="*)
      before=()
      while read -r key ticks; do before[$key]=$ticks; done < <(thread_ticks "$bench") ;;
    *": system "*" tok/s, mean batch"*)
      report "$bench" ;;
  esac
done <"$fifo"
wait "$bench"
