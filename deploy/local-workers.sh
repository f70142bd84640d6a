#!/usr/bin/env bash
# Several tuning workers on this machine, one study: one worker per GPU (CUDA_VISIBLE_DEVICES), or
# WORKERS CPU workers where there is no GPU. Waits for all of them; logs go to LOG_DIR (studies/logs).
#
#   deploy/local-workers.sh                                   # journal file, no server needed
#   deploy/local-workers.sh postgresql://optuna@db-host/optuna
#   TRIALS=100 WORKERS=4 deploy/local-workers.sh journal:studies/study.journal --set train.epochs=6
#
# Arguments after the storage go to every `python -m src.tune`. Env: TRIALS (default: tune.trials),
# STUDY (default: tune.study), WORKERS (default: the number of GPUs, else 2), LOG_DIR, PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
storage="${1:-journal:studies/study.journal}"
shift $(( $# > 0 ? 1 : 0 ))
python="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"

gpus=()
if command -v nvidia-smi >/dev/null 2>&1; then
  mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | grep -E '^[0-9]+$' || true)
fi
workers="${WORKERS:-${#gpus[@]}}"
[ "$workers" -gt 0 ] || workers=2
threads=$(( $(nproc) / workers )); [ "$threads" -gt 0 ] || threads=1

args=(--storage "$storage")
[ -n "${TRIALS:-}" ] && args+=(--trials "$TRIALS")
[ -n "${STUDY:-}" ] && args+=(--study "$STUDY")
logs="${LOG_DIR:-studies/logs}"
mkdir -p "$logs"
# Job control: each worker runs in its own process group and handles SIGINT from its first moment
# (bash would start background commands of a script with SIGINT ignored). Ctrl-C or TERM reaches the
# script, which passes Ctrl-C on to every worker: each marks its running trial failed and exits.
set -m
pids=()
stop() { kill -INT "${pids[@]}" 2>/dev/null || true; }
trap stop INT TERM
for ((i = 0; i < workers; i++)); do
  device=""
  [ "${#gpus[@]}" -gt 0 ] && device="${gpus[$((i % ${#gpus[@]}))]}"
  CUDA_VISIBLE_DEVICES="$device" OMP_NUM_THREADS="$threads" \
    "$python" -m src.tune "${args[@]}" "$@" > "$logs/worker-$i.log" 2>&1 &
  pids+=($!)
  where="CPU, $threads threads"; [ -n "$device" ] && where="GPU $device"
  echo "worker $i: pid $!, $where, log $logs/worker-$i.log"
done
status=0
for pid in "${pids[@]}"; do
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done  # a trapped signal cuts wait short
  rc=0; wait "$pid" || rc=$?  # the worker's own exit status
  [ "$rc" -eq 0 ] || status=$rc
done
echo "workers done (exit $status); last worker's summary:"
tail -n 4 "$logs/worker-$((workers - 1)).log" || true
exit "$status"
