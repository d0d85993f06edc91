"""Stores on S3-compatible object storage: where --store points, the driver lock by conditional writes, and Zarr
arrays on a real SeaweedFS server (tests/support/seaweed.py)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import obstore
import pytest
import zarr

from mnkpipe.store import StoreError, StoreLockedError
from mnkpipe.store.paths import store_location
from mnkpipe.store.location import ObjectLock, object_store, parse_location, probe_conditional_writes, zarr_store
from support.seaweed import start_seaweed


@pytest.fixture(scope="module")
def s3():
    server = start_seaweed()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch):
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    return s3


def test_locations(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_location("runs/x.zarr").path == tmp_path / "runs" / "x.zarr"
    assert parse_location("file:///data/x.zarr").path.as_posix() == "/data/x.zarr"
    assert store_location(f"file://{tmp_path}/runs/x.zarr") == tmp_path / "runs" / "x.zarr"  # not ./file:/...
    s3 = parse_location("s3://bucket/runs/x.zarr/")
    assert (s3.bucket, s3.prefix, s3.url) == ("bucket", "runs/x.zarr", "s3://bucket/runs/x.zarr")
    assert s3.sibling("-results").url == "s3://bucket/runs/x.zarr-results"
    for bad in ("gs://bucket/x", "http://host/x", "az://c/x"):
        with pytest.raises(StoreError, match="not supported"):
            parse_location(bad)
    for bad in ("s3://bucket", "s3://bucket/", "s3:///x"):
        with pytest.raises(StoreError, match="bucket and a prefix"):
            parse_location(bad)
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "gs:").exists()


def test_zarr_tiles_round_trip(s3_env):
    loc = parse_location("s3://mnkpipe-test/zarr/one.zarr")
    g = zarr.create_group(zarr_store(loc, read_only=False))
    a = g.create_array("gram", shape=(6, 6), chunks=(3, 3), dtype="f8", fill_value=np.nan,
                       config={"write_empty_chunks": True})
    a[0:3, 3:6] = np.arange(9.0).reshape(3, 3)
    back = zarr.open_group(zarr_store(loc), mode="r")["gram"]
    assert np.array_equal(back[0:3, 3:6], np.arange(9.0).reshape(3, 3)) and np.isnan(back[3:6, 0:3]).all()
    keys = {o["path"] for o in obstore.list(object_store(loc)).collect()}
    assert keys == {"zarr.json", "gram/zarr.json", "gram/c/0/1"}  # one object per written tile


def test_probe_passes_on_a_server_that_honours_conditional_writes(s3_env):
    probe_conditional_writes(parse_location("s3://mnkpipe-test/probe/x.zarr"))
    assert not list(obstore.list(object_store(parse_location("s3://mnkpipe-test/p/x"), prefix="probe")).collect())


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(s3_env):
    loc = parse_location("s3://mnkpipe-test/locks/a.zarr")
    with ObjectLock(loc, command="first") as first:
        with pytest.raises(StoreLockedError, match="being computed by another driver"):
            ObjectLock(loc).acquire()
        with pytest.raises(StoreLockedError):
            ObjectLock(loc, break_lock=True).acquire()  # alive on this host: never broken
        assert ObjectLock(loc).owner()["token"] == first.me["token"]
    assert ObjectLock(loc).owner() is None
    stale = dict(ObjectLock(loc).me, pid=_dead_pid())
    obstore.put(object_store(loc, prefix=""), "locks/a.zarr.lock", json.dumps(stale).encode())
    with ObjectLock(loc) as taker:
        assert taker.replaced["pid"] == stale["pid"]


def test_lock_never_removes_an_object_it_did_not_write(s3_env):
    loc = parse_location("s3://mnkpipe-test/locks/b.zarr")
    store = object_store(loc, prefix="")
    obstore.put(store, "locks/b.zarr.lock", b"my notes, not a lock")
    for breaking in (False, True):
        with pytest.raises(StoreLockedError, match="not an mnkpipe lock"):
            ObjectLock(loc, break_lock=breaking).acquire()
    assert bytes(obstore.get(store, "locks/b.zarr.lock").bytes()) == b"my notes, not a lock"


def test_lock_from_another_host_needs_break_lock(s3_env):
    loc = parse_location("s3://mnkpipe-test/locks/c.zarr")
    other = dict(ObjectLock(loc).me, host="some-other-host", pid=1)
    obstore.put(object_store(loc, prefix=""), "locks/c.zarr.lock", json.dumps(other).encode())
    with pytest.raises(StoreLockedError, match="--break-lock"):
        ObjectLock(loc).acquire()
    with ObjectLock(loc, break_lock=True) as taker:
        assert taker.replaced["host"] == "some-other-host"


def test_racing_drivers_exactly_one_wins_a_stale_lock(s3_env, tmp_path):
    loc = parse_location("s3://mnkpipe-test/locks/race.zarr")
    stale = dict(ObjectLock(loc).me, pid=_dead_pid())
    obstore.put(object_store(loc, prefix=""), "locks/race.zarr.lock", json.dumps(stale).encode())
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import os, time
        from mnkpipe.store import StoreLockedError
        from mnkpipe.store.location import ObjectLock, parse_location
        lock = ObjectLock(parse_location("{loc.url}"))
        while not os.path.exists("{go}"):
            time.sleep(0.01)
        try:
            lock.acquire()
        except StoreLockedError:
            print("locked"); raise SystemExit(0)
        print("won"); time.sleep(4); lock.release()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=os.environ)
             for _ in range(6)]
    go.touch()
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert sorted(outs) == ["locked"] * 5 + ["won"], outs
    assert ObjectLock(loc).owner() is None


def test_probe_refuses_a_server_that_ignores_conditional_writes(monkeypatch):
    from support.naive_s3 import start_naive_s3
    server, endpoint = start_naive_s3()
    try:
        for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                     "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(StoreError, match="ignores conditional writes"):
            probe_conditional_writes(parse_location("s3://plain/runs/x.zarr"))
    finally:
        server.shutdown()


@pytest.mark.parametrize("url", ["s3://bucket/runs/x.zarr", "gs://bucket/x.zarr"])
@pytest.mark.parametrize("command", [["compute-kernel", "--config", "configs/smoke.toml", "--store"], ["status"],
                                     ["verify"], ["evaluate", "--store"], ["report", "--store"]])
def test_a_url_store_is_never_a_local_folder(tmp_path, command, url):
    """A URL --store never becomes a local folder (before, s3://... made one named `s3:`): a scheme not supported is
    refused by name; every command takes s3:// and names the URL it cannot reach (no server here). Nothing is
    written."""
    from click.testing import CliRunner

    from mnkpipe.cli import main
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [a if a != "configs/smoke.toml" else os.path.join(repo, a) for a in command]
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        r = CliRunner().invoke(main, [*cmd, url])
    finally:
        os.chdir(here)
    assert r.exit_code != 0 and url in r.output and "Traceback" not in r.output, r.output
    assert os.listdir(tmp_path) == []
