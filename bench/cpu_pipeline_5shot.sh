#!/usr/bin/env bash
# The second setting of docs/results: 5-way 5-shot at CPU size (configs/omniglot-5w5s-cpu.toml), kernel methods
# only: kernel, evaluation (one-hot and embedding labels, K = 1, all ablations, the ridge fixed and chosen on the
# validation tasks), report. Results go to $OUT (default docs/results/omniglot-5w5s-cpu/) with each stage's timing.
set -euo pipefail
cd "$(dirname "$0")/.."
export MNKPIPE_DATA="${MNKPIPE_DATA:-$(cd .. && pwd)/shared/data/omniglot}" RAY_AUTH_MODE=disabled
BIN=${BIN:-.venv/bin}
CFG=configs/omniglot-5w5s-cpu.toml
STORE=${STORE:-runs/omniglot-5w5s-cpu.zarr}
OUT=${OUT:-docs/results/omniglot-5w5s-cpu}
SEEDS=${SEEDS:-3}
source bench/pipeline_kernel.sh  # timings log, stage(), the Gram
stage evaluate $BIN/mnkpipe evaluate --store "$STORE" --config $CFG --augment 1 --seeds "$SEEDS" \
  --train-tasks 1,2,4,8 --out "$OUT" --labels onehot,embedding --ridge-grid 1e-5,1e-3,1e-2,1e-1 --no-progress
$BIN/mnkpipe report --out "$OUT" > /dev/null --plot-methods \
  mnk/embedding/K1,mnk/onehot/K1,mnk-valridge/embedding/K1,meta_term/embedding/K1,r_t/onehot,r_t/embedding,embedding_1nn,pixel_1nn
rm -rf "$OUT/extractors" "$OUT/phi" "$OUT/validation"
echo "total: $(awk '{s += $2} END {print s}' "$log") s" | tee -a "$log"
