"""The baselines runner on real smoke stores (built without Ray): tied to the store, recorded fully, bad input
refused."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mnkpipe.cli import main
from mnkpipe.evaluation.baselines_run import baseline_settings, run_baselines
from mnkpipe.pipeline.local import compute_local
from mnkpipe.store import open_store

REPO = Path(__file__).resolve().parents[1]
SMOKE = (REPO / "configs" / "smoke.toml").read_text()


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def build(path: Path, omniglot_root, seed: int) -> Path:
    """A real smoke store (its Gram computed in-process) whose episodes are drawn with [tasks] seed = seed."""
    cfg = path.parent / f"smoke-seed{seed}.toml"
    cfg.write_text(SMOKE.replace("seed = 0", f"seed = {seed}"))
    compute_local(cfg, path, data=str(omniglot_root), progress=False)
    return path


TINY = dict(blocks=2, filters=4, meta_steps=2, eval_every=1, meta_batch=2, inner_steps=1, imaml_steps=2, cg_steps=2)


def run(store, out, seeds=1):
    return run_baselines(store, methods=["maml"], train_counts=[1, 2], seeds=seeds,
                         settings=baseline_settings(None, **TINY), out=out, progress=False, device="cpu")


def test_rebuilt_store_never_reuses_checkpoints_or_merges_results(tmp_path, omniglot_root):
    store, out = tmp_path / "s.zarr", tmp_path / "res"
    build(store, omniglot_root, seed=0)
    a = run(store, out, seeds=2)
    m = a["methods"]["maml"]
    assert np.asarray(m["per_seed"]).shape[:2] == (2, 2)  # [count][seed][test task]
    assert np.allclose(np.mean(m["per_seed"], axis=(1, 2)), m["mean"])
    assert m["seeds"] == 2 and m["hyperparameters"]["device"] == "cpu" and m["hyperparameters"]["filters"] == 4
    assert a["fingerprint"] == open_store(store).manifest["fingerprint"]
    dirs_a = sorted(p.name for p in (out / "checkpoints").iterdir())
    results_a = (out / "results.json").read_bytes()

    shutil.rmtree(store)
    build(store, omniglot_root, seed=1)  # same path, other tasks
    with pytest.raises(ValueError, match="refusing to merge"):
        run(store, out)
    assert (out / "results.json").read_bytes() == results_a  # nothing merged
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == dirs_a  # nothing written

    (out / "results.json").unlink()  # the old checkpoints stay: they must not be reused
    b = run(store, out)
    dirs_b = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert set(dirs_a) < set(dirs_b) and len(dirs_b) == 2 * len(dirs_a) - 2  # seed 0's two new folders
    fresh = run(store, tmp_path / "fresh")
    assert b["methods"]["maml"]["per_task"] == fresh["methods"]["maml"]["per_task"]
    assert b["fingerprint"] != a["fingerprint"]

    # a checkpoint of store A put where store B's belongs is refused on load
    new = sorted(set(dirs_b) - set(dirs_a))
    old_same_run = [d for d in dirs_a if d.rsplit("-", 1)[0] == new[0].rsplit("-", 1)[0]][0]
    shutil.copy(out / "checkpoints" / old_same_run / "checkpoint.pt", out / "checkpoints" / new[0] / "checkpoint.pt")
    (out / "results.json").unlink()
    with pytest.raises(ValueError, match="different run"):
        run(store, out)


@pytest.fixture(scope="module")
def smoke_store(tmp_path_factory, omniglot_root):
    return build(tmp_path_factory.mktemp("bl") / "smoke.zarr", omniglot_root, seed=0)


BAD_TOML = {
    'first_order = "false"': ["first_order", "bool"],
    'filters = "many"': ["filters", "int"],
    "meta_steps = 2.7": ["meta_steps", "int"],
    "meta_steps = 0": ["meta_steps", ">= 1"],
    'bn_mode = "eval"': ["bn_mode", "batch, running"],
    "blocks = [": ["not valid TOML"],
    "reptile = 1": ["unknown key 'reptile'"],
}


@pytest.mark.parametrize("line", list(BAD_TOML))
def test_bad_baselines_toml_is_refused_through_the_cli(smoke_store, tmp_path, line):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f"[baselines]\n{line}\n")
    out = tmp_path / "res"
    r = CliRunner().invoke(main, ["baselines", "--store", str(smoke_store), "--config", str(cfg), "--out", str(out)])
    assert r.exit_code != 0 and isinstance(r.exception, SystemExit) and "Traceback" not in r.output, r.output
    for word in BAD_TOML[line] + [str(cfg)]:
        assert word in r.output, (word, r.output)
    assert not out.exists()


@pytest.mark.parametrize("args, words", [(["--seeds", "0"], ["--seeds"]), (["--meta-steps", "-3"], ["--meta-steps"]),
                                         (["--device", "tpu"], ["--device"]), (["--methods", "reptile"], ["reptile"])])
def test_bad_options_are_refused_through_the_cli(smoke_store, tmp_path, args, words):
    out = tmp_path / "res"
    r = CliRunner().invoke(main, ["baselines", "--store", str(smoke_store), "--out", str(out)] + args)
    assert r.exit_code != 0 and isinstance(r.exception, SystemExit), r.output
    assert "Traceback" not in r.output and all(w in r.output for w in words), r.output
    assert not out.exists()


def test_readme_command_fits_the_smoke_images(smoke_store, tmp_path):
    """README: `mnkpipe baselines --store runs/smoke.zarr --config configs/omniglot-5w1s-cpu.toml` (4 pooling blocks
    on 12x12 images); here with fewer meta-steps, one count and one method to keep it fast."""
    out = tmp_path / "res"
    r = CliRunner().invoke(main, ["baselines", "--store", str(smoke_store), "--config",
                                  str(REPO / "configs" / "omniglot-5w1s-cpu.toml"), "--meta-steps", "2",
                                  "--train-tasks", "1", "--methods", "maml", "--device", "cpu", "--no-progress",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    saved = json.loads((out / "results.json").read_text())["methods"]["maml"]
    assert saved["hyperparameters"]["blocks"] == 4 and saved["hyperparameters"]["device"] == "cpu"
    assert len(saved["per_seed"][0]) == 1


def test_fewer_meta_steps_than_a_checkpoint_holds_select_only_among_those_steps(smoke_store, tmp_path):
    """A 4-step checkpoint asked for 2 steps gives exactly a fresh 2-step run's curve, selection and test accuracy
    when its best step is within the 2; otherwise, and for a step it was never validated at, a clear refusal."""
    from dataclasses import replace

    from mnkpipe.baselines.train import run_baseline
    store = open_store(smoke_store)
    ep, val_images = store.episodes(), store.array("val_images")[...]
    images = np.concatenate([store.images(), val_images])
    val = ep.val.remap(np.arange(len(val_images)) + store.n)
    long = baseline_settings(None, **dict(TINY, meta_steps=4, eval_every=2))
    run = dict(images=images, train=ep.train.subset([0, 1]), val=val, test=ep.test, way=ep.way, progress=False)
    seen = set()
    for seed in range(4):
        ckpt = tmp_path / f"seed{seed}"
        first = run_baseline("maml", settings=long, seed=seed, checkpoint_dir=ckpt, **run)
        with pytest.raises(ValueError, match=r"seed\d+/checkpoint\.pt holds a run of 4 meta-steps.*not validated at "
                                             r"step 3.*ask for 4 meta-steps or more"):
            run_baseline("maml", settings=replace(long, meta_steps=3), seed=seed, checkpoint_dir=ckpt, **run)
        short = replace(long, meta_steps=2)
        if first["best_step"] > 2:
            seen.add("refused")
            with pytest.raises(ValueError, match="best validation step is 4, after step 2"):
                run_baseline("maml", settings=short, seed=seed, checkpoint_dir=ckpt, **run)
            continue
        seen.add("selected")
        fresh = run_baseline("maml", settings=short, seed=seed, checkpoint_dir=None, **run)
        again = run_baseline("maml", settings=short, seed=seed, checkpoint_dir=ckpt, **run)
        assert again["val_curve"] == fresh["val_curve"] == [(2, first["val_curve"][0][1])]
        assert again["best_step"] == fresh["best_step"] == 2
        assert np.array_equal(again["test_acc"], fresh["test_acc"])
    assert seen == {"refused", "selected"}
