#!/usr/bin/env bash
# Download, on this (networked) machine, the wheels that the lent GPU machine lacks for mnkpipe's store and
# pipeline code (its image has Python 3.12, numpy, cupy, torch, pyyaml, click, tqdm, typing-extensions, but no
# zarr and no Ray). They go to .whl/ (git-ignored); a device call names `.whl` in `carry`, and bench/gpu_check.sh
# installs them with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl`.
# Usage (repo root): bash bench/prepare_device_wheels.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
DEST=.whl
mkdir -p "$DEST"

# zarr and its needs missing there (Requires-Dist of zarr 3.1.6: donfig, google-crc32c, numcodecs; numpy>=2,
# packaging, typing-extensions and donfig's pyyaml are already in the image), at the versions CI uses.
WHEELS=(
  "zarr==3.1.6"
  "numcodecs==0.16.5"
  "donfig==0.8.1.post1"
  "google-crc32c==1.9.0"
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64
           manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64)
args=()
for p in "${PLATFORMS[@]}"; do args+=(--platform "$p"); done

for w in "${WHEELS[@]}"; do
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${args[@]}" -d "$DEST" "$w"
done

# Keep one version per project (two stop the whole install on the device).
"$PY" - "$DEST" <<'EOF'
import collections, pathlib, sys
d = pathlib.Path(sys.argv[1])
by = collections.defaultdict(list)
for f in d.glob("*.whl"):
    by[f.name.split("-")[0].lower().replace("_", "-")].append(f)
dups = {k: [f.name for f in v] for k, v in by.items() if len(v) > 1}
if dups:
    sys.exit(f"several versions of one project in {d}: {dups}; remove the stale ones")
EOF

size=$(du -sm "$DEST" | cut -f1)
ls -1 "$DEST"
echo "$DEST: ${size} MiB"
if [ "$size" -gt 48 ]; then
  echo "warning: $DEST is over 48 MiB; the whole tree that travels must stay under 64 MiB" >&2
fi
