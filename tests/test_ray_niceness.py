"""The private Ray instance's workers run at the driver's priority (Ray's default is nice 15), unless the user sets
RAY_worker_niceness."""

import os
import subprocess
import sys

PROBE = """
import os, ray
from mnkpipe.pipeline.ray_session import start_ray, stop_ray
start_ray(None, cpus=1)
print("nice", ray.get(ray.remote(lambda: os.nice(0)).remote()), flush=True)
stop_ray()
"""


def niceness(env: dict) -> int:
    r = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split("nice")[-1])


def test_workers_run_at_normal_priority_unless_the_user_says_otherwise():
    env = {k: v for k, v in os.environ.items() if k != "RAY_worker_niceness"}
    env["RAY_AUTH_MODE"] = "disabled"
    assert niceness(env) == 0
    assert niceness(dict(env, RAY_worker_niceness="7")) == 7
