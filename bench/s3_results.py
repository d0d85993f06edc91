"""evaluate with the store and its results on local disk and on a loopback S3 server (SeaweedFS), side by side.

    MNKPIPE_DATA=... .venv/bin/python bench/s3_results.py [--config configs/smoke.toml] [--repeats 3]
        [--phi-tile-size 4] [--train-tasks 1,2,4]

The smoke store is computed once on disk and once on S3. Each repeat then runs, in this order, four evaluates with
the same settings (methods mnk and r_t, one seed), each into results that do not exist yet, so each computes its
meta-kernel arrays:
  local      store and results on local disk
  s3-out     store on S3, results in a local --out
  s3         store on S3, results at <store>-results on S3 (a new local copy: pull, work, push)
  s3-reuse   the same results again from a new local copy (another host): pull, reuse, push what changed
and reports the median seconds of each, its ratio to `local` in the same repeat, and the requests to the object
store of the last repeat. One Ray instance (2 CPUs) serves every evaluate.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
from s3_vs_local import REQUESTS, count_requests  # noqa: E402 - this folder's request counter

sys.path.insert(0, str(REPO.parent / "tests"))
from support.seaweed import start_seaweed  # noqa: E402 - the tests' server helper

from mnkpipe.evaluation.evaluate import evaluate  # noqa: E402
from mnkpipe.pipeline.local import compute_local  # noqa: E402
from mnkpipe.pipeline.ray_session import start_ray, stop_ray  # noqa: E402

KINDS = ("local", "s3-out", "s3", "s3-reuse")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO.parent / "configs" / "smoke.toml"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--phi-tile-size", type=int, default=4)
    ap.add_argument("--train-tasks", default="1,2,4")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mnkpipe-s3-results-bench-"))
    server = start_seaweed(tmp / "weed", bucket="mnkpipe-bench")
    os.environ.update(server.env(), RAY_AUTH_MODE="disabled")
    count_requests()
    local_store, s3_store = tmp / "local.zarr", "s3://mnkpipe-bench/store.zarr"
    opts = dict(train_counts=[int(c) for c in a.train_tasks.split(",")], seeds=1, methods=["mnk", "r_t"],
                phi_tile_size=a.phi_tile_size, progress=False)
    seconds = {k: [] for k in KINDS}
    requests = {}
    try:
        compute_local(a.config, local_store, progress=False)
        compute_local(a.config, s3_store, progress=False)
        start_ray(None, cpus=2)
        for r in range(a.repeats):
            runs = {"local": (local_store, tmp / f"out-{r}", "a"), "s3-out": (s3_store, tmp / f"s3out-{r}", "b"),
                    "s3": (s3_store, f"s3://mnkpipe-bench/results-{r}", "c"),
                    "s3-reuse": (s3_store, f"s3://mnkpipe-bench/results-{r}", "d")}
            for kind, (store, out, host) in runs.items():
                os.environ["MNKPIPE_CACHE"] = str(tmp / f"cache-{r}-{host}")
                REQUESTS.clear()
                t0 = time.perf_counter()
                evaluate(store, out=out, **opts)
                seconds[kind].append(time.perf_counter() - t0)
                requests[kind] = dict(REQUESTS)
    finally:
        stop_ray()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"config {a.config}: evaluate --train-tasks {a.train_tasks} --seeds 1 --methods mnk,r_t "
          f"--phi-tile-size {a.phi_tile_size}; {a.repeats} repeats")
    print(f"{'kind':<10}{'median s':>10}{'x local':>9}  requests (last repeat)")
    for kind in KINDS:
        ratio = statistics.median(s / b for s, b in zip(seconds[kind], seconds["local"]))
        per = ", ".join(f"{k} {v}" for k, v in sorted(requests[kind].items())) or "-"
        print(f"{kind:<10}{statistics.median(seconds[kind]):>10.2f}{ratio:>9.2f}  {per}")


if __name__ == "__main__":
    main()
