# Sourced by bench/cpu_pipeline*.sh once BIN, CFG, STORE and OUT are set: the timing log $OUT/timings.txt, the
# `stage NAME COMMAND...` function that times a command into it, and the first stage: the Gram, after which the
# store is made read-only (evaluate and baselines only read it).
mkdir -p "$OUT"
log="$OUT/timings.txt"; : > "$log"
stage() { local name=$1; shift; local t0=$(date +%s); "$@"; echo "$name: $(( $(date +%s) - t0 )) s" | tee -a "$log"; }
stage compute-kernel $BIN/mnkpipe compute-kernel --config $CFG --store "$STORE" --no-progress
chmod -R a-w "$STORE"
