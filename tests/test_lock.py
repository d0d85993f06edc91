"""The store lock: only mnkpipe's lock files are ever removed, a live owner is never broken, a stale lock is taken
over by exactly one of many racing drivers on different hosts, and a full disk leaves no private file behind."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from mnkpipe.cli import main
from mnkpipe.pipeline.inspect import format_status, store_status
from mnkpipe.store import StoreLock, StoreLockedError
from mnkpipe.store.lock import LOCK_FORMAT

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.toml"
TWO_HOURS_AGO = time.time() - 7200


def lock_of(store: Path) -> Path:
    return Path(f"{store}.lock")


def mnkpipe_lock(host: str, pid: int) -> str:
    return json.dumps({"format": LOCK_FORMAT, "host": host, "pid": pid, "started": "2026-01-01T00:00:00+0000",
                       "command": "mnkpipe compute-kernel", "token": uuid.uuid4().hex})


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def old_file(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    os.utime(path, (TWO_HOURS_AGO, TWO_HOURS_AGO))


@pytest.mark.parametrize("content", [b"my notes: buy milk\n", b"", b"{not json", b"\xff\xfe\x00",
                                     b'{"host": "x", "pid": 1, "started": "", "command": ""}',
                                     b'{"format": "mnkpipe-lock/1", "host": "x"}'])
def test_a_lock_file_mnkpipe_did_not_write_is_never_removed(tmp_path, omniglot_root, content):
    store = tmp_path / "s.zarr"
    old_file(lock_of(store), content)
    for break_lock in (False, True):
        with pytest.raises(StoreLockedError, match=r"s\.zarr\.lock exists but is not an mnkpipe lock file"):
            StoreLock(store, break_lock=break_lock).acquire()
    args = ["compute-kernel", "--config", str(SMOKE), "--store", str(store), "--data", str(omniglot_root),
            "--no-progress", "--break-lock"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "s.zarr.lock exists but is not an mnkpipe lock file" in r.output
    assert "Traceback" not in r.output and not store.exists()
    assert lock_of(store).read_bytes() == content and sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr.lock"]


def test_status_names_a_lock_file_that_is_not_mnkpipes(tmp_path):
    store = tmp_path / "s.zarr"
    store.mkdir()
    (store / "zarr.json").write_text("{}")
    old_file(lock_of(store), b"notes")
    from mnkpipe.pipeline.inspect import lock_status
    s = lock_status(store)
    assert s["state"] == "foreign" and s["path"] == str(lock_of(store))
    text = format_status({"store": str(store), "array": "gram", "n_images": 1, "tile_size": 1, "tiles_done": 0,
                          "tiles_total": 0, "pairs_done": 0, "pairs_total": 0, "rate_pairs_per_s": None,
                          "eta_s": None, "lock": s, "workers": {}, "meta_kernels": []})
    assert "is not an mnkpipe lock file" in text
    assert store_status  # the same lock_status is what `mnkpipe status` shows


def test_a_stale_mnkpipe_lock_on_this_host_is_taken_over(tmp_path):
    store = tmp_path / "s.zarr"
    lock_of(store).write_text(mnkpipe_lock(socket.gethostname(), dead_pid()))
    with StoreLock(store) as taken:
        assert taken.replaced["format"] == LOCK_FORMAT
        assert json.loads(lock_of(store).read_text())["pid"] == os.getpid()
    assert not lock_of(store).exists() and list(tmp_path.iterdir()) == []


def test_break_lock_never_takes_over_a_live_owner_on_this_host(tmp_path):
    store = tmp_path / "s.zarr"
    with StoreLock(store, command="the live driver"):
        held = lock_of(store).read_text()
        with pytest.raises(StoreLockedError, match="runs on this host: --break-lock does not take over a live"):
            StoreLock(store, break_lock=True).acquire()
        assert lock_of(store).read_text() == held


def test_a_lock_from_another_host_needs_break_lock(tmp_path):
    store = tmp_path / "s.zarr"
    lock_of(store).write_text(mnkpipe_lock("some-other-host", 12345))
    with pytest.raises(StoreLockedError, match="on another host.*--break-lock"):
        StoreLock(store).acquire()
    with StoreLock(store, break_lock=True) as taken:
        assert taken.replaced["host"] == "some-other-host"


# Racers on "different hosts": each in its own UTS namespace (its own kernel host name) and PID namespace (its pid
# is 1 or 2, the same in all of them), so no host-local fact tells them apart; they share only the file system.
RACER = str(REPO / "tests" / "support" / "lock_racer.py")


def namespaces_work() -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "--uts", "--pid", "--fork", "--mount-proc", "sh", "-c", "hostname probe-host"],
                       capture_output=True, check=False)
    return r.returncode == 0


@pytest.mark.skipif(not namespaces_work(), reason="needs unshare --uts --pid (root) to give racers their own hosts")
def test_racers_on_different_hosts_breaking_one_stale_lock_end_with_one_owner(tmp_path):
    store = tmp_path / "race.zarr"
    lock_of(store).write_text(mnkpipe_lock("a-host-that-died", 4242))
    go, release = tmp_path / "go", tmp_path / "release"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen(["unshare", "--uts", "--pid", "--fork", "--mount-proc", "sh", "-c",
                               f'hostname racer{i} && exec "$0" "$1" "$2" "$3" "$4" "$5"', sys.executable, RACER,
                               str(store), str(go), str(release), "--break-lock"],
                              env=env, stdout=subprocess.PIPE, text=True)
             for i in range(4)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["READY"] * 4
        go.touch()
        outs = [p.stdout.readline().strip() for p in procs]
        owner = json.loads(lock_of(store).read_text())
    finally:
        release.touch()
        for p in procs:
            p.wait(timeout=60)
    won = [o for o in outs if o.startswith("WON")]
    assert len(won) == 1 and outs.count("LOCKED") == 3, outs
    _, host, pid = won[0].split()
    assert (owner["host"], owner["pid"]) == (host, int(pid)) and host.startswith("racer")
    assert not lock_of(store).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["go", "release"]


def tiny_tmpfs(where: Path) -> bool:
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True,
                          check=False).returncode == 0


def test_a_full_disk_is_named_and_leaves_no_private_lock_file(tmp_path, omniglot_root):
    disk = tmp_path / "disk"
    if tiny_tmpfs(disk):
        try:
            fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
            try:  # fill it up
                while os.write(fd, b"\0" * 4096):
                    pass
            except OSError:
                pass
            finally:
                os.close(fd)
            store = disk / "s.zarr"
            with pytest.raises(OSError, match=r"cannot write the lock file .*s\.zarr\.lock: No space left"):
                StoreLock(store).acquire()
            r = CliRunner().invoke(main, ["compute-kernel", "--config", str(SMOKE), "--store", str(store), "--data",
                                          str(omniglot_root), "--no-progress"])
            assert r.exit_code == 1 and "s.zarr.lock" in r.output and "No space left" in r.output, r.output
            assert "Traceback" not in r.output
            assert sorted(p.name for p in disk.iterdir()) == ["filler"]
        finally:
            subprocess.run(["umount", str(disk)], check=False)
    else:  # not root: a file-size limit makes the write fail the same way (EFBIG)
        store = tmp_path / "s.zarr"
        code = ("import resource, signal, sys\nfrom mnkpipe.store import StoreLock\n"
                "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\nresource.setrlimit(resource.RLIMIT_FSIZE, (16, 16))\n"
                "try:\n    StoreLock(sys.argv[1]).acquire()\nexcept OSError as e:\n    print(e)\n")
        r = subprocess.run([sys.executable, "-c", code, str(store)], capture_output=True, text=True, check=False,
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert "cannot write the lock file" in r.stdout and "s.zarr.lock" in r.stdout, r.stdout + r.stderr
        assert list(tmp_path.iterdir()) == []
