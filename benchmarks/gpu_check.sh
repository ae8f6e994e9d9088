#!/usr/bin/env bash
# The GPU machine's one call (issue 15): everything the H200 has to measure or check, in under
# 8 minutes, results under $OUT, one table printed last.
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#   BUDGET=300 bash benchmarks/gpu_check.sh         # a shorter budget: later parts are skipped
#   CPU_DRY_RUN=1 OUT=/tmp/out bash benchmarks/gpu_check.sh    # the same flow on a CPU, tiny
#
# .whl/ holds webdataset and braceexpand (bash ../shared/gpu/fetch_wheels.sh webdataset
# braceexpand): the machine lacks them, and dvc/dvclive too, so trackers are off there.
# Parts (each under `timeout`, all within $BUDGET seconds, default 465: 7 min 45 s):
#   1. wheels, CUDA check (fails at once without a GPU)
#   2. at once, while the GPU is shared (nothing here is timed):
#      - 4,000 ImageNet-sized JPEGs sharded on all cores, then one short run of the pretrain
#        stage with compile on: the cold compile time of the stage, and a warm compile cache
#      - the cold torch.compile of timm's and our F0 step, at once (compile time; warms the
#        cache for part 3)
#      - pytest -m gpu, less the AGC timing test (it needs the GPU alone)
#      - F0-F7 peak memory at each recipe's micro_batch, pretraining and fine-tuning
#   3. alone on the GPU: train_throughput.py --compile (timm and ours, eager and compiled; the
#      loader per decode path and mixing mode; the pretrain stage end to end, compile on)
#   4. the AGC timing test, if time is left
#   5. benchmarks/gpu_report.py: the table (also $OUT/summary.md)
# $OUT gets 7 files (the machine sends back 8 at most): gpu_check.log (progress and the data,
# compile and memory parts' output), pytest.log, throughput.log, compile.json, memory.json,
# throughput.json, summary.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
: "${OUT:?set OUT to the folder for the results}"
BUDGET=${BUDGET:-465}
WORK=${WORK:-/tmp/gpu-check}
START=$(date +%s)
mkdir -p "$OUT" "$WORK"
CPU="" COMPILE="--compile" IMAGES=4000 T=1          # T: the parts' time limits, multiplied
if [[ ${CPU_DRY_RUN:-0} == 1 ]]; then CPU="--cpu" COMPILE="" IMAGES=192 T=4; fi  # 2 slow cores

log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/gpu_check.log"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
limit() { local l; l=$(left); (( $1 < l )) && echo "$1" || echo "$l"; }   # min(seconds, left)

# part NAME SECONDS LOG CMD...: CMD under `timeout`, its output appended to $OUT/LOG
part() {
  local name=$1 secs logfile=$3; secs=$(limit "$2"); shift 3
  if (( secs < 15 )); then log "$name: skipped, the budget is spent"; return 0; fi
  log "$name: start (at most ${secs}s)"
  timeout --kill-after=10 "$secs" "$@" >> "$OUT/$logfile" 2>&1
  local rc=$?
  log "$name: exit $rc$( (( rc == 124 || rc == 137 )) && echo ' (timed out)')"
  return 0
}

# -- 1. wheels and the GPU --------------------------------------------------------------------
log "gpu_check: budget ${BUDGET}s, results in $OUT"
if ! ls .whl/*.whl > /dev/null 2>&1; then
  log "FAIL: no .whl/*.whl: run 'bash ../shared/gpu/fetch_wheels.sh webdataset braceexpand' and carry .whl"
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
  >> "$OUT/gpu_check.log" 2>&1 || { log "FAIL: pip could not install .whl/*.whl"; exit 2; }
export PYTHONPATH=/tmp/site:$PWD
if ! python3 - >> "$OUT/gpu_check.log" 2>&1 <<'EOF'
import sys
import torch, torchvision, timm, webdataset, braceexpand  # noqa: F401
import os
versions = (f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm "
            f"{timm.__version__}, python {sys.version.split()[0]}")
if os.environ.get("CPU_DRY_RUN") == "1":
    print(f"CPU dry run, {versions}")
    sys.exit(0)
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch")
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {versions}")
EOF
then
  log "FAIL: CUDA or a package is missing (see $OUT/gpu_check.log):"; tail -3 "$OUT/gpu_check.log"
  exit 2
fi
log "$(tail -1 "$OUT/gpu_check.log")"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader >> "$OUT/gpu_check.log" 2>&1

# -- 2. data, compiles, tests and memory at once ---------------------------------------------
TT=benchmarks/train_throughput.py
(
  part data $(( 120 * T )) gpu_check.log python3 $TT --make-shards "$WORK/data" --images $IMAGES
  if [[ -f "$WORK/data/shards/_info.json" ]]; then
    part compile-e2e $(( 200 * T )) gpu_check.log python3 $TT $CPU --only e2e $COMPILE --pairs disjoint \
      --decodes prefetch --e2e-steps 2 --shards "$WORK/data/shards" --e2e-out "$WORK" \
      --json "$OUT/compile.json" --append
  else
    log "FAIL: no shards were made (see gpu_check.log)"
  fi
) &
for model in timm step; do                 # timm's and our step: two cold compiles at once
  part "compile-$model" $(( 200 * T )) gpu_check.log python3 $TT $CPU --only $model $COMPILE --no-eager \
    --iters 2 --json "$OUT/compile.json" --append &
done
part pytest $(( 200 * T )) pytest.log python3 -m pytest -m gpu -q -p no:cacheprovider -k "not agc" \
  tests/test_gpu.py tests/test_prefetch.py &
part memory $(( 150 * T )) gpu_check.log python3 $TT $CPU --only memory --memory-stages pretrain finetune \
  --json "$OUT/memory.json"
wait

# -- 3. throughput, alone on the GPU ----------------------------------------------------------
if [[ -f "$WORK/data/shards/_info.json" ]]; then
  ROWS_BUDGET=$(( $(left) - 45 ))     # rows stop starting here; the AGC test and table follow
  part throughput "$(( $(left) - 25 ))" throughput.log python3 $TT $CPU $COMPILE \
    --shards "$WORK/data/shards" --iters 12 --e2e-steps 20 --budget "$ROWS_BUDGET" \
    --e2e-out "$WORK" --json "$OUT/throughput.json"
else
  part throughput "$(( $(left) - 25 ))" throughput.log python3 $TT $CPU $COMPILE --only timm step \
    --iters 15 --json "$OUT/throughput.json"
fi

# -- 4. the AGC timing test, if there is time -------------------------------------------------
part pytest-agc 40 pytest.log python3 -m pytest -m gpu -q -p no:cacheprovider -k agc tests/test_gpu.py

# -- 5. the table -----------------------------------------------------------------------------
log "gpu_check: done in $(( $(date +%s) - START ))s"
python3 benchmarks/gpu_report.py "$OUT"
