#!/usr/bin/env bash
# One-shot device check of the cupy CNTK backend (bench/gpu_check.py): correctness vs the float64 reference and
# the golden Grams, throughput at 32x32 depth 20 GAP, the per-pair 4-D baseline, end to end if available.
# Run from the repository root on the GPU machine:  bash bench/gpu_check.sh [gpu_check.py options]
# Log and JSON go to $OUT (or ./gpu_check_out). Finishes in under 8 minutes (pytest capped at 90 s, the check at 420 s).
# Wheels in .whl/ (bench/prepare_device_wheels.sh) are installed first; the golden file is $GOLDEN, else
# tests/data/cntk_neural_tangents.npz. On a machine without a GPU it prints "backend UNAVAILABLE" and exits 2.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -z "${MNKPIPE_DATA:-}" ] && [ -d .devcarry/omniglot ]; then
  export MNKPIPE_DATA=$PWD/.devcarry/omniglot   # for the end-to-end part
fi

run() {
  echo "== gpu_check $(date -u +%FT%TZ) on $(hostname)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu \
    --format=csv 2>&1 || echo "nvidia-smi not available"
  if compgen -G ".whl/*.whl" > /dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
      echo "wheel install failed: parts that need zarr will be skipped"
    fi
  fi
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  "$PY" -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'devices', cupy.cuda.runtime.getDeviceCount())" \
    || echo "cupy does not import"
  echo "== pytest: the real-GPU tests of tests/test_cupy_backend.py"
  timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_cupy_backend.py -k real_gpu 2>&1 | tail -5
  timeout 420 "$PY" bench/gpu_check.py --out "$OUT" "$@"
  rc=$?
  echo "gpu_check.py exit code $rc (0 all checks passed, 1 a correctness check failed, 2 no GPU, 124 timeout)"
  echo "$rc" > "$OUT/rc"
}

run "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "$(cat "$OUT/rc" 2>/dev/null || echo 1)"
