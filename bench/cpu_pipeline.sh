#!/usr/bin/env bash
# The CPU-sized experiment end to end (configs/omniglot-5w1s-cpu.toml): kernel, evaluation (both label modes,
# K = 1 and 15, all ablations), baselines, report. The store is made read-only once its Gram is done: evaluate and
# baselines only read it. Results go to $OUT (default docs/results/omniglot-5w1s-cpu/) with each stage's timing.
set -euo pipefail
cd "$(dirname "$0")/.."
export MNKPIPE_DATA="${MNKPIPE_DATA:-$(cd .. && pwd)/shared/data/omniglot}" RAY_AUTH_MODE=disabled
BIN=${BIN:-.venv/bin}
CFG=configs/omniglot-5w1s-cpu.toml
STORE=${STORE:-runs/omniglot-5w1s-cpu.zarr}
OUT=${OUT:-docs/results/omniglot-5w1s-cpu}
SEEDS=${SEEDS:-5}
mkdir -p "$OUT"
log="$OUT/timings.txt"; : > "$log"
stage() { local name=$1; shift; local t0=$(date +%s); "$@"; echo "$name: $(( $(date +%s) - t0 )) s" | tee -a "$log"; }
stage compute-kernel $BIN/mnkpipe compute-kernel --config $CFG --store "$STORE" --no-progress
chmod -R a-w "$STORE"
stage evaluate $BIN/mnkpipe evaluate --store "$STORE" --config $CFG --labels onehot,embedding --augment 1,15 \
  --seeds "$SEEDS" --train-tasks 1,2,4,8,16 --out "$OUT" --no-progress
stage baselines $BIN/mnkpipe baselines --store "$STORE" --config $CFG --seeds "$SEEDS" --train-tasks 1,2,4,8,16 \
  --out "$OUT" --no-progress
stage report $BIN/mnkpipe report --out "$OUT"
$BIN/mnkpipe report --out "$OUT" --x characters > /dev/null && mv "$OUT/accuracy.png" "$OUT/accuracy_characters.png"
$BIN/mnkpipe report --out "$OUT" > /dev/null
rm -rf "$OUT/checkpoints" "$OUT/extractors" "$OUT/phi"
echo "total: $(awk '{s += $2} END {print s}' "$log") s" | tee -a "$log"
