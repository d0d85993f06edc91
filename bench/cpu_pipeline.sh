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
source bench/pipeline_kernel.sh  # timings log, stage(), the Gram
COMMON=(--store "$STORE" --config $CFG --seeds "$SEEDS" --train-tasks 1,2,4,8,16 --out "$OUT" --no-progress)
# every method, label mode (trained and untrained extractor) and K at the fixed ridge 1e-5
stage evaluate $BIN/mnkpipe evaluate "${COMMON[@]}" --labels onehot,embedding,random_embedding --augment 1,15
# the authors' placement of the ridge (rows <method>-authors), K = 1
stage evaluate-authors $BIN/mnkpipe evaluate "${COMMON[@]}" --labels onehot,embedding --augment 1 --conventions authors
# the ridge chosen on the validation tasks (rows <method>-valridge), K = 1: each grid ridge needs its own
# meta-kernel arrays, which for K = 15 (25 arrays of up to 6000 x 6000 per ridge) this machine could not afford
stage evaluate-valridge $BIN/mnkpipe evaluate "${COMMON[@]}" --labels onehot,embedding,random_embedding --augment 1 \
  --ridge-grid 1e-5,1e-3,1e-2,1e-1
stage baselines $BIN/mnkpipe baselines --store "$STORE" --config $CFG --seeds "$SEEDS" --train-tasks 1,2,4,8,16 \
  --out "$OUT" --no-progress
PLOT=mnk/embedding/K15,mnk/embedding/K1,mnk/onehot/K15,mnk/random_embedding/K15,meta_term/embedding/K15,r_t/onehot
PLOT=$PLOT,r_t/embedding,embedding_1nn,pixel_1nn,maml,maml-test-selected,imaml,imaml-test-selected
stage report $BIN/mnkpipe report --out "$OUT" --x characters --plot-methods $PLOT
mv "$OUT/accuracy.png" "$OUT/accuracy_characters.png"
$BIN/mnkpipe report --out "$OUT" --plot-methods $PLOT > /dev/null
rm -rf "$OUT/checkpoints" "$OUT/extractors" "$OUT/phi" "$OUT/validation"
echo "total: $(awk '{s += $2} END {print s}' "$log") s" | tee -a "$log"
