"""No bad input slips through (issue 10): a clear error naming the option or key, exit != 0, no traceback, nothing
written; splits that cannot leak; where the data is found."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mnkpipe.cli import main
from mnkpipe.data import DataError, resolve_data_root
from mnkpipe.pipeline.config import ConfigError, ExperimentConfig, load_config
from mnkpipe.pipeline.experiment import build_experiment

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.toml"


def run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def assert_refused(r, *words):
    """Exit code != 0, the offending option/key named, no traceback."""
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output and not isinstance(r.exception, (AssertionError, TypeError, KeyError)), r.output
    for w in words:
        assert w in r.output, (w, r.output)


@pytest.mark.parametrize("args, named", [
    (["--tile-size", "0"], "--tile-size"),
    (["--cpus", "-1"], "--cpus"),
    (["--cpus", "0"], "--cpus"),
    (["--gpus", "-2"], "--gpus"),
])
def test_compute_kernel_bad_numbers_write_nothing(tmp_path, omniglot_root, args, named):
    store = tmp_path / "s.zarr"
    r = run("compute-kernel", "--config", SMOKE, "--store", store, "--data", omniglot_root, "--no-progress", *args)
    assert_refused(r, named)
    assert list(tmp_path.iterdir()) == []


def test_verify_bad_cpus(tmp_path):
    store = tmp_path / "s.zarr"
    store.mkdir()
    assert_refused(run("verify", "--repair", "--cpus", "-1", store), "--cpus")
    assert not Path(f"{store}.lock").exists()


@pytest.mark.parametrize("args, named", [(["--n", "0"], "--n"), (["--depth", "1"], "--depth"),
                                         (["--depth", "5000"], "--depth"), (["--size", "0"], "--size"),
                                         (["--n", "100000"], "--n 100000: the quick look has 46")])
def test_gram_bad_numbers(omniglot_root, args, named):
    assert_refused(run("gram", "--data", omniglot_root, *args), named)


def test_empty_toml_names_the_missing_tables(tmp_path, omniglot_root):
    cfg = tmp_path / "empty.toml"
    cfg.write_text("")
    store = tmp_path / "s.zarr"
    r = run("compute-kernel", "--config", cfg, "--store", store, "--data", omniglot_root, "--no-progress")
    assert_refused(r, "empty.toml", "[tasks]", "[kernel]")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.toml"]


def test_optional_embedding_and_baselines_tables(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(SMOKE.read_text() + '\n[embedding]\nlayer = 2\n[baselines]\nmeta_steps = 3\n')
    assert load_config(cfg).kernel.depth == 3
    cfg.write_text('embedding = 3\n' + SMOKE.read_text())
    with pytest.raises(ConfigError, match=r"\[embedding\] must be a table"):
        load_config(cfg)


def test_gram_block_takes_only_in_range_integer_indices(tmp_path, omniglot_root):
    from mnkpipe.pipeline.driver import prepare_store
    st = prepare_store(load_config(SMOKE), tmp_path / "s.zarr", data=str(omniglot_root))  # no tile computed yet
    assert np.isnan(st.gram_block([0, 83], [5])).all()
    for rows, named in [(np.ones(84, bool), "boolean mask"), (slice(0, 4), "slice"), ([0, 84], r"\[0, 84\)"),
                        ([-1], r"\[0, 84\)"), ([[0, 1]], "1-D"), ([0.5], "integer")]:
        with pytest.raises(ValueError, match=named):
            st.gram_block(rows, [0])
        with pytest.raises(ValueError, match="cols"):
            st.gram_block([0], rows)


def _config(tmp_path, **data) -> ExperimentConfig:
    cfg = load_config(SMOKE)
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


@pytest.mark.parametrize("train, test", [("evaluation", "evaluation"), ("background", "background_small1")])
def test_train_and_test_classes_must_be_disjoint(tmp_path, omniglot_root, train, test):
    cfg = _config(tmp_path, train_split=train, test_split=test, image_size=14, pad=16)
    with pytest.raises(ConfigError, match=f"train_split = '{train}', test_split = '{test}': training and test tasks "
                                          "share"):
        build_experiment(cfg, str(omniglot_root))


def test_lake_runs_refuse_a_training_split_with_evaluation_alphabets(omniglot_root):
    cfg = load_config(SMOKE)
    cfg.data.train_split = "evaluation"
    cfg.tasks.protocol, cfg.tasks.way, cfg.tasks.shot, cfg.tasks.val_tasks = "lake-runs", 20, 1, 0
    with pytest.raises(ConfigError, match=r"runs are drawn from the evaluation alphabets.*20 of them"):
        build_experiment(cfg, str(omniglot_root))


def test_rotated_validation_characters_never_train(omniglot_root):
    cfg = load_config(SMOKE)
    cfg.tasks.rotations = True
    exp = build_experiment(cfg, str(omniglot_root))
    meta = exp.episodes.meta
    base = lambda names: {n.split("/rot")[0] for n in names}  # noqa: E731
    assert base(meta["val_class_names"]) and not base(meta["val_class_names"]) & base(meta["train_class_names"])


def test_data_root_default_and_its_error(tmp_path, monkeypatch, omniglot_root):
    monkeypatch.delenv("MNKPIPE_DATA", raising=False)
    monkeypatch.setenv("MNKPIPE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"cache/omniglot .*does not exist.*mnkpipe data download"):
        resolve_data_root(None)
    r = run("data", "info")
    assert_refused(r, "mnkpipe data download", "MNKPIPE_DATA")
    default = tmp_path / "cache" / "omniglot"
    default.mkdir(parents=True)
    for z in omniglot_root.glob("*.zip"):
        (default / z.name).symlink_to(z)
    assert resolve_data_root(None) == default
    r = run("data", "download")  # every file present: nothing fetched, the default folder is used
    assert r.exit_code == 0 and str(default / "images_background.zip") in r.output
    r = run("data", "info")
    assert r.exit_code == 0 and "background_small1" in r.output and "2720" in r.output


def test_data_info_describes_a_class_folder_dataset(tmp_path):
    root = tmp_path / "shapes"
    for split, classes in (("train", ["circle", "square", "star"]), ("test", ["moon", "sun"])):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(4 if split == "train" else 2):
                Image.fromarray(np.full((6, 6), 40 * i, np.uint8)).save(root / split / c / f"{i}.png")
    r = run("data", "info", "--data", root)
    assert r.exit_code == 0, r.output
    rows = {line.split()[0]: line.split()[1:4] for line in r.output.splitlines()[1:]}
    assert rows == {"train": ["0", "3", "12"], "test": ["0", "2", "4"]}
    shutil.rmtree(root / "test")
    r = run("data", "info", "--data", root / "train")  # the class folders themselves: one split
    assert r.exit_code == 0 and r.output.splitlines()[1].split()[:4] == [".", "0", "3", "12"]


# -- bad numbers: every count, size and real option or key --------------------------------------------------------
@pytest.mark.parametrize("key, value", [
    ("val_tasks", -1), ("train_classes", -5), ("val_classes", -3), ("seed", -1), ("train_tasks", 0),
    ("test_tasks", -2), ("way", 1), ("shot", 0), ("query", -1)])
def test_negative_task_counts_are_refused_naming_the_key(tmp_path, omniglot_root, key, value):
    """Today val_tasks = -1 and train_classes = -5 run as if 0 (silently), seed = -1 fails in numpy's words."""
    text = SMOKE.read_text().replace("[tasks]\n", f"[tasks]\n{key} = {value}\n")
    text = "\n".join(line for line in text.splitlines() if not line.startswith(f"{key} = ") or str(value) in line)
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    r = run("compute-kernel", "--config", cfg, "--store", tmp_path / "s.zarr", "--data", omniglot_root, "--no-progress")
    assert_refused(r, "c.toml", f"[tasks] {key}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]


@pytest.mark.parametrize("table, key, value", [("kernel", "depth", 1), ("kernel", "depth", 5000),
                                               ("data", "image_size", 2), ("data", "pad", -4),
                                               ("compute", "tile_size", -8)])
def test_absurd_sizes_in_a_config_are_refused_naming_the_key(tmp_path, table, key, value):
    cfg = tmp_path / "c.toml"
    cfg.write_text(SMOKE.read_text().replace(f"[{table}]\n", f"[{table}]\n{key} = {value}\n", 1)
                   .replace(f"\n{key} = ", f"\n# {key} = ").replace(f"# {key} = {value}", f"{key} = {value}", 1))
    with pytest.raises(ConfigError, match=rf"c\.toml.*\[{table}\] {key}"):
        load_config(cfg)


@pytest.mark.parametrize("value", ["nan", "inf", "-1e-3"])
def test_evaluate_refuses_a_ridge_that_is_not_finite_and_non_negative(tmp_path, value):
    store = tmp_path / "s.zarr"
    store.mkdir()
    r = run("evaluate", "--store", store, "--ridge", value, "--no-progress")
    assert_refused(r, "--ridge")
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"] and not any(store.iterdir())
