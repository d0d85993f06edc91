#!/usr/bin/env bash
# The CPU-sized experiment end to end (configs/omniglot-5w1s-cpu.toml): kernel, evaluation (one-hot and embedding
# labels, K = 1 and 15, all ablations, the ridge fixed and chosen on validation tasks, the authors' conventions, an
# untrained extractor's labels), baselines (validation- and test-selected), report. The store is made read-only
# once its Gram is done: evaluate and baselines only read it. Results go to $OUT (default
# docs/results/omniglot-5w1s-cpu/) with each stage's timing.
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
COMMON=(--store "$STORE" --config $CFG --augment 1,15 --seeds "$SEEDS" --train-tasks 1,2,4,8,16 --out "$OUT")
# fixed ridge 1e-5 and the ridge chosen on the validation tasks (rows <method>-valridge)
stage evaluate $BIN/mnkpipe evaluate "${COMMON[@]}" --labels onehot,embedding --ridge-grid 1e-5,1e-3,1e-2,1e-1 \
  --no-progress
# the authors' placement of the ridge (rows <method>-authors), and the untrained extractor's embedding as labels
stage evaluate-authors $BIN/mnkpipe evaluate "${COMMON[@]}" --labels onehot,embedding --conventions authors \
  --no-progress
stage evaluate-random $BIN/mnkpipe evaluate "${COMMON[@]}" --labels random_embedding --methods mnk,meta_term,r_t \
  --ridge-grid 1e-5,1e-3,1e-2,1e-1 --no-progress  # the meta-kernel arrays of the first stage are reused
stage baselines $BIN/mnkpipe baselines --store "$STORE" --config $CFG --seeds "$SEEDS" --train-tasks 1,2,4,8,16 \
  --out "$OUT" --no-progress
stage report $BIN/mnkpipe report --out "$OUT"
$BIN/mnkpipe report --out "$OUT" --x characters > /dev/null && mv "$OUT/accuracy.png" "$OUT/accuracy_characters.png"
$BIN/mnkpipe report --out "$OUT" > /dev/null
rm -rf "$OUT/checkpoints" "$OUT/extractors" "$OUT/phi" "$OUT/validation"
echo "total: $(awk '{s += $2} END {print s}' "$log") s" | tee -a "$log"
