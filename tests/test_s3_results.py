"""evaluate, baselines, report and status on a store on S3, against a real SeaweedFS server (tests/support/seaweed.py):
results at <store>-results on the object store or in a local --out, read-only credentials that write nothing, a
fresh host that reuses what is there, and two runs that write results.json at once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import obstore
import pytest
from test_baselines_store import TINY

from mnkpipe.evaluation.baselines_run import baseline_settings, run_baselines
from mnkpipe.evaluation.mirror import Mirror, local_results, results_location
from mnkpipe.pipeline.local import compute_local
from mnkpipe.store.location import object_store, parse_location
from support.seaweed import commands_env, start_seaweed

BUCKET = "mnkpipe-results"
SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
URL = f"s3://{BUCKET}/runs/smoke.zarr"
EVALUATE = ["evaluate", "--store", URL, "--train-tasks", "1,2", "--seeds", "1", "--methods", "mnk,r_t", "--cpus", "2",
            "--no-progress"]


@pytest.fixture(scope="module")
def s3():
    server = start_seaweed(bucket=BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def env(s3, omniglot_root, tmp_path_factory):
    """The admin's AWS variables and a private MNKPIPE_CACHE, set in this process too while the module runs."""
    with commands_env(s3, MNKPIPE_DATA=str(omniglot_root), MNKPIPE_CACHE=str(tmp_path_factory.mktemp("cache"))) as env:
        yield env


@pytest.fixture(scope="module")
def store_url(env) -> str:
    compute_local(SMOKE, URL, progress=False)
    return URL


def cli(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mnkpipe.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600)


def objects(prefix: str = "") -> dict[str, tuple]:
    """{key: (ETag, last modified)} of every object in the bucket under prefix (an object written again with the
    same bytes keeps its ETag, not its time)."""
    store = object_store(parse_location(f"s3://{BUCKET}/x"), prefix="")
    return {o["path"]: (o["e_tag"], o["last_modified"]) for batch in obstore.list(store, prefix=prefix or None)
            for o in batch}


def results_json(url: str) -> dict:
    loc = parse_location(url)
    return json.loads(bytes(obstore.get(object_store(loc, prefix=""), f"{loc.prefix}/results.json").bytes()))


def test_read_only_credentials_evaluate_into_a_local_out_and_write_nothing(env, s3, store_url, tmp_path):
    before = objects()
    reader = dict(env, **s3.env("reader"))
    r = cli(reader, *EVALUATE, "--out", tmp_path / "res")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "res" / "results.json").read_text())
    assert res["store"] == store_url and {"mnk/onehot/K1", "r_t/onehot"} <= set(res["methods"])
    assert (tmp_path / "res" / "accuracy.png").is_file() and any((tmp_path / "res" / "phi").iterdir())
    r = cli(reader, *EVALUATE)  # the default: <store>-results on S3, which a reader may not write
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{store_url}-results" in r.stderr and "--out" in r.stderr, r.stderr
    assert objects() == before  # not one object written, changed or removed


def test_evaluate_baselines_and_report_keep_their_results_beside_the_store_on_s3(env, store_url, tmp_path):
    results, R = f"{store_url}-results", "runs/smoke.zarr-results/"
    store_before = objects("runs/smoke.zarr/")
    r = cli(env, *EVALUATE)
    assert r.returncode == 0, r.stderr
    assert f"-> {results}" in r.stdout and "MNK" in r.stdout, r.stdout
    res = results_json(results)
    assert res["store"] == store_url and {"mnk/onehot/K1", "r_t/onehot"} <= set(res["methods"])
    there = objects(R)
    phi = [k for k in there if k.startswith(f"{R}phi/") and k.endswith("/mnk_crc32/c/0/0")]
    assert phi and f"{R}accuracy.png" in there and f"{R}.mnkpipe-results" in there, sorted(there)
    assert not [k for k in there if "/.locks/" in k or "/.partial/" in k or k.endswith(".mnkpipe-mirror.json")]
    assert objects("runs/smoke.zarr/") == store_before  # nothing written into the store

    # a host without the local copy: it pulls what is there and reuses it, so no object is written again but the
    # results (results.json keeps its methods, written anew only for its date)
    env2 = dict(env, MNKPIPE_CACHE=str(tmp_path / "other-host"))
    r = cli(env2, *EVALUATE)
    assert r.returncode == 0, r.stderr
    again = objects(R)
    same = {k for k in there if again.get(k) == there[k]}
    assert set(there) - same <= {f"{R}{f}" for f in ("results.json", "results.md", "results.csv", "accuracy.png")}
    assert all(k in same for k in phi)

    os.environ["MNKPIPE_CACHE"] = str(tmp_path / "third-host")  # this process is yet another host
    try:
        run_baselines(store_url, methods=["maml"], train_counts=[1, 2], settings=baseline_settings(None, **TINY),
                      progress=False, device="cpu")
    finally:
        os.environ["MNKPIPE_CACHE"] = env["MNKPIPE_CACHE"]
    assert {"mnk/onehot/K1", "maml", "maml-test-selected"} <= set(results_json(results)["methods"])

    r = cli(env, "report", "--store", store_url)
    assert r.returncode == 0 and "MAML" in r.stdout and "MNK" in r.stdout, r.stdout + r.stderr
    assert f"figure: {results}/accuracy.png" in r.stdout
    r = cli(env, "status", store_url, "--json")
    assert r.returncode == 0, r.stderr
    groups = json.loads(r.stdout)["meta_kernels"]
    assert groups and all(g["tiles_done"] == g["tiles_total"] > 0 for g in groups), groups
    assert all(g["group"].startswith(f"{results}/phi/") for g in groups), groups


def test_two_runs_pushing_results_json_at_once_keep_both_methods(env, store_url, tmp_path):
    """Run A pulls, run B pulls, writes and pushes its method, then A pushes: A's write is refused by its ETag, A
    merges its method into B's results.json and writes again; both methods are kept."""
    url = f"s3://{BUCKET}/merge/results"
    header = {"format": "mnkpipe-results/1", "fingerprint": "f", "config": {}, "methods": {"old": {"n": 0}}}
    first = Mirror(parse_location(url), progress=False)
    first.folder = tmp_path / "host0"
    first.pull()
    (first.folder / "results.json").write_text(json.dumps(header))
    first.push()
    a, b = (Mirror(parse_location(url), progress=False) for _ in range(2))
    a.folder, b.folder = tmp_path / "host-a", tmp_path / "host-b"
    a.pull()
    b.pull()
    for m, name in ((b, "from-b"), (a, "from-a")):
        res = json.loads((m.folder / "results.json").read_text())
        res["methods"][name] = {"n": 1}
        (m.folder / "results.json").write_text(json.dumps(res))
        m.push()
    assert set(results_json(url)["methods"]) == {"old", "from-a", "from-b"}
    other = dict(header, fingerprint="another store")
    b.pull()
    (b.folder / "results.json").write_text(json.dumps(other))
    c = Mirror(parse_location(url), progress=False)
    c.folder = tmp_path / "host-c"
    c.pull()
    (c.folder / "results.json").write_text(json.dumps(dict(header, methods={"c": {}})))
    c.push()
    with pytest.raises(ValueError, match="refusing to merge"):
        b.push()  # another store's results never merge into these


def test_results_prefixes_that_are_not_mnkpipes_or_inside_the_store_are_refused(env, store_url, tmp_path):
    foreign = object_store(parse_location(f"s3://{BUCKET}/theirs/x"), prefix="")
    obstore.put(foreign, "theirs/data.csv", b"a,b\n")
    before = objects()
    r = cli(env, "report", "--out", f"s3://{BUCKET}/theirs")
    assert r.returncode == 1 and "not make" in r.stderr and f"s3://{BUCKET}/theirs" in r.stderr, r.stderr
    with pytest.raises(ValueError, match="inside the store"):
        results_location(store_url, f"{store_url}/results")
    r = cli(env, "report", "--store", f"s3://{BUCKET}/none/store.zarr")  # no results there
    assert r.returncode == 1 and f"no results.json at s3://{BUCKET}/none/store.zarr-results" in r.stderr, r.stderr
    r = cli(env, "report", "--out", "gs://bucket/results")
    assert r.returncode != 0 and "--out gs://bucket/results" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert objects() == before


def test_a_failed_command_still_pushes_what_it_finished_and_a_pull_follows_removals(env, tmp_path):
    loc = parse_location(f"s3://{BUCKET}/failed/results")
    with pytest.raises(RuntimeError, match="stopped"):
        with local_results(loc, progress=False) as local:
            group = local.folder / "phi" / "g"
            group.mkdir(parents=True)
            (group / "zarr.json").write_text("{}")
            (local.folder / ".locks").mkdir()
            (local.folder / ".locks" / "phi-g.lock").write_text("")
            (group / f"c.{'0' * 32}.partial").write_text("")  # what killed writers leave
            (local.folder / ".results.json.x1y2.tmp").write_text("")
            raise RuntimeError("stopped")
    assert set(objects("failed/")) == {"failed/results/phi/g/zarr.json", "failed/results/.mnkpipe-results"}  # only
    obstore.delete(object_store(loc, prefix=""), "failed/results/phi/g/zarr.json")  # removed there by someone
    with local_results(loc, progress=False) as local:
        assert not (local.folder / "phi" / "g" / "zarr.json").exists()  # and so here, as this copy had it unchanged


def test_a_group_shared_with_the_workers_is_pushed_with_the_marker(env, tmp_path):
    """The workers write a meta-kernel group's tiles on S3 after its files were pushed: the marker goes with them,
    so a prefix whose run dies then is still known as mnkpipe's."""
    loc = parse_location(f"s3://{BUCKET}/shared/results")
    with local_results(loc, progress=False) as local:
        group = local.folder / "phi" / "h"
        group.mkdir(parents=True)
        (group / "zarr.json").write_text("{}")
        with local.shared(group) as target:
            assert target == f"s3://{BUCKET}/shared/results/phi/h"
            assert set(objects("shared/")) == {"shared/results/phi/h/zarr.json", "shared/results/.mnkpipe-results"}
