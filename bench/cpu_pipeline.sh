#!/usr/bin/env bash
# The CPU-sized experiment end to end (configs/omniglot-5w1s-cpu.toml): kernel, evaluation, baselines, report.
# Results are copied to docs/results/omniglot-5w1s-cpu/ with the timings of each stage.
set -euo pipefail
cd "$(dirname "$0")/.."
export MNKPIPE_DATA="${MNKPIPE_DATA:-$(cd .. && pwd)/shared/data/omniglot}" RAY_AUTH_MODE=disabled
BIN=.venv/bin
CFG=configs/omniglot-5w1s-cpu.toml
STORE=${STORE:-runs/omniglot-5w1s-cpu.zarr}
OUT=docs/results/omniglot-5w1s-cpu
mkdir -p "$OUT"
log="$OUT/timings.txt"; : > "$log"
stage() { local name=$1; shift; local t0=$(date +%s); "$@"; echo "$name: $(( $(date +%s) - t0 )) s" | tee -a "$log"; }
stage compute-kernel $BIN/mnkpipe compute-kernel --config $CFG --store "$STORE" --no-progress
stage evaluate $BIN/mnkpipe evaluate --store "$STORE" --seeds 5 --out "$OUT" --no-progress
stage baselines $BIN/mnkpipe baselines --store "$STORE" --config $CFG --seeds 2 --out "$OUT" --no-progress
stage report $BIN/mnkpipe report --out "$OUT"
rm -rf "$OUT/checkpoints"
echo "total: $(awk '{s += $2} END {print s}' "$log") s" | tee -a "$log"
