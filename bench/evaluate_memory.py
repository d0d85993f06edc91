"""Peak memory of `evaluate` at N >= 16,000 images: small images, plan "mnk", all cores, real Ray and Zarr.

    .venv/bin/python bench/evaluate_memory.py [--size 4] [--train-tasks 40] [--test-tasks 400] [--keep DIR]

Builds the store with `mnkpipe compute-kernel` in a subprocess (so this process's peak is evaluate's alone), then
runs evaluate (MNK and r_t, one-hot, K = 1, all training tasks, one seed) here and prints: N, the Gram's size on
disk, the driver's peak RSS, the workers' peak RSS (recorded by the tile driver in the Phi group), and the wall time.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zarr

from mnkpipe.evaluation.evaluate import evaluate
from mnkpipe.store import open_store

CONFIG = """[data]
image_size = {size}
pad = 0
[tasks]
way = 5
shot = 1
query = 19
rotations = true
train_tasks = {train}
test_tasks = {test}
val_tasks = 0
[kernel]
depth = 2
[compute]
tile_size = 256
plan = "mnk"
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4, help="image size (no padding)")
    ap.add_argument("--train-tasks", type=int, default=40, help="5-way 1-shot 19-query tasks (100 images each)")
    ap.add_argument("--test-tasks", type=int, default=400, help="test tasks (evaluation split; images shared)")
    ap.add_argument("--keep", help="build the store here and keep it (default: a temporary folder)")
    a = ap.parse_args()
    tmp = Path(a.keep or tempfile.mkdtemp(prefix="mnkpipe-evalmem-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        cfg, store = tmp / "config.toml", tmp / "store.zarr"
        cfg.write_text(CONFIG.format(size=a.size, train=a.train_tasks, test=a.test_tasks))
        t0 = time.time()
        subprocess.run([str(Path(sys.executable).with_name("mnkpipe")), "compute-kernel", "--config", str(cfg),
                        "--store", str(store), "--no-progress"], check=True)
        kernel_s = time.time() - t0
        st = open_store(store)
        n, gram_bytes = st.n, st.array("gram").nbytes
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.time()
        evaluate(store, train_counts=[a.train_tasks], seeds=1, out=tmp / "results", methods=["mnk", "r_t"],
                 cpus=os.cpu_count(), progress=False)
        wall = time.time() - t0
        driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        (phi,) = (tmp / "results" / "phi").iterdir()
        workers = zarr.open_group(str(phi), mode="r")["mnk"].attrs["progress"]["workers"]
        m = int(zarr.open_group(str(phi), mode="r")["mnk"].shape[0])
        row = {"N": n, "train_images": st.manifest["n_train_images"], "gram_GB": gram_bytes / 1e9, "phi_M": m,
               "driver_peak_MiB": driver, "driver_before_evaluate_MiB": rss0,
               "worker_peak_MiB": max(w["rss_mb"] for w in workers.values()), "workers": len(workers),
               "evaluate_s": wall, "compute_kernel_s": kernel_s}
        print(json.dumps(row, indent=1))
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
