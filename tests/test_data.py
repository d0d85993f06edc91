"""Tests of mnkpipe.data loaders, preprocessing and dataset operations on the real Omniglot files."""

from __future__ import annotations

import io
import os
import shutil
import socket
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mnkpipe.data import (
    DataError,
    ImageDataset,
    concat,
    download_omniglot,
    fit_standardiser,
    load_image_folder,
    load_lake_runs,
    load_omniglot,
    omniglot_info,
    resolve_data_root,
    standardise_and_pad,
)
from mnkpipe.data import _io

SMALL1 = "background_small1"


@pytest.fixture(scope="module")
def root(omniglot_root) -> Path:
    return omniglot_root


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never touch ~/.cache from tests: the default cache goes to a per-test folder."""
    monkeypatch.setenv("MNKPIPE_CACHE", str(tmp_path / "default-cache"))


@pytest.fixture(scope="module")
def small1(root, tmp_path_factory) -> ImageDataset:
    return load_omniglot(root, SMALL1, cache_dir=tmp_path_factory.mktemp("cache"))


def _png_bytes(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- Omniglot


def test_small1_counts_shapes_and_values(small1):
    ds = small1
    assert ds.images.shape == (2720, 1, 28, 28) and ds.images.dtype == np.float32
    assert ds.labels.dtype == np.int64 and len(ds) == 2720
    assert ds.n_classes == 136 and len(ds.groups) == 136 and len({*ds.groups}) == 5
    assert np.all(ds.class_counts() == 20)
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
    assert ds.images.min() == 0.0 and ds.images.max() == 1.0
    assert ds.images.mean() > 0.8  # white background = 1, ink = 0
    # classes sorted by (alphabet, character); group = alphabet
    assert ds.classes == sorted(ds.classes)
    assert [c.split("/")[0] for c in ds.classes] == ds.groups
    assert ds.classes[0] == "Balinese/character01"
    assert ds.paths[0] == "images_background_small1.zip:images_background_small1/Balinese/character01/0108_01.png"
    # images grouped by class, sorted by file name within each class
    assert np.all(np.diff(ds.labels) >= 0)
    first = [p for p, lab in zip(ds.paths, ds.labels) if lab == 0]
    assert first == sorted(first) and len(first) == 20


def test_extracted_folder_gives_identical_arrays(root, small1, tmp_path):
    wanted = ["Greek/character05", "Latin/character01", "Latin/character02"]
    with zipfile.ZipFile(root / "images_background_small1.zip") as zf:
        for name in zf.namelist():
            parts = name.split("/")
            if len(parts) == 4 and parts[3] and "/".join(parts[1:3]) in wanted:
                dest = tmp_path / "data" / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(zf.read(name))
    ds = load_omniglot(tmp_path / "data", SMALL1, cache_dir=False)
    assert ds.classes == wanted and ds.groups == ["Greek", "Latin", "Latin"]
    ref = small1.subset_classes([small1.classes.index(c) for c in wanted])
    np.testing.assert_array_equal(ds.images, ref.images)
    np.testing.assert_array_equal(ds.labels, ref.labels)
    assert ds.paths[0] == "images_background_small1/Greek/character05/0398_01.png"


def test_alphabets_filter(root, small1):
    ds = load_omniglot(root, SMALL1, alphabets=["Latin"], cache_dir=False)
    ids = [i for i, g in enumerate(small1.groups) if g == "Latin"]
    assert ds.n_classes == len(ids) == 26 and set(ds.groups) == {"Latin"}
    np.testing.assert_array_equal(ds.images, small1.subset_classes(ids).images)
    with pytest.raises(DataError, match="Klingon"):
        load_omniglot(root, SMALL1, alphabets=["Klingon"], cache_dir=False)


def test_cache_hit_decodes_no_png(root, tmp_path):
    zpath = tmp_path / "data" / "images_background_small1.zip"
    zpath.parent.mkdir()
    shutil.copy(root / zpath.name, zpath)
    cache = tmp_path / "cache"
    n0 = _io.decode_count()
    a = load_omniglot(zpath.parent, SMALL1, alphabets=["Latin"], cache_dir=cache)
    assert _io.decode_count() - n0 == 26 * 20
    files = list(cache.glob("*.npz"))
    assert len(files) == 1
    n1 = _io.decode_count()
    b = load_omniglot(zpath.parent, SMALL1, alphabets=["Latin"], cache_dir=cache)
    assert _io.decode_count() == n1  # second call: no PNG decoded
    for f in ("images", "labels"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert (a.classes, a.groups, a.paths) == (b.classes, b.groups, b.paths)
    assert b.images.dtype == np.float32
    # another image_size is another key
    load_omniglot(zpath.parent, SMALL1, alphabets=["Latin"], image_size=20, cache_dir=cache)
    assert _io.decode_count() - n1 == 26 * 20 and len(list(cache.glob("*.npz"))) == 2
    # a changed source file (mtime) invalidates the entry
    st = zpath.stat()
    os.utime(zpath, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    n2 = _io.decode_count()
    load_omniglot(zpath.parent, SMALL1, alphabets=["Latin"], cache_dir=cache)
    assert _io.decode_count() - n2 == 26 * 20
    # default cache dir comes from $MNKPIPE_CACHE (set per test by the autouse fixture)
    load_omniglot(zpath.parent, SMALL1, alphabets=["Latin"], image_size=8)
    assert list((tmp_path / "default-cache").glob("omniglot-*.npz"))


def test_original_size_is_binary(root, tmp_path):
    ds = load_omniglot(root, SMALL1, alphabets=["Latin"], image_size=None, cache_dir=False)
    assert ds.images.shape == (520, 1, 105, 105)
    assert set(np.unique(ds.images)) == {0.0, 1.0}


def test_info_counts_from_listing(root):
    n0 = _io.decode_count()
    info = {d["split"]: d for d in omniglot_info(root)}
    assert _io.decode_count() == n0
    got = {k: (v["alphabets"], v["characters"], v["images"]) for k, v in info.items()}
    assert got == {
        "background": (30, 964, 19280),
        "evaluation": (20, 659, 13180),
        "background_small1": (5, 136, 2720),
        "background_small2": (5, 156, 3120),
    }


def test_resolve_data_root(root, tmp_path, monkeypatch):
    assert resolve_data_root(root) == root
    monkeypatch.setenv("MNKPIPE_DATA", str(root))
    assert resolve_data_root(None) == root
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_data_root(missing)
    monkeypatch.setenv("MNKPIPE_DATA", str(missing))
    with pytest.raises(DataError, match=r"nowhere.*MNKPIPE_DATA"):
        resolve_data_root(None)
    monkeypatch.delenv("MNKPIPE_DATA")
    with pytest.raises(DataError, match="MNKPIPE_DATA"):
        resolve_data_root(None)


def test_missing_split_and_bad_args(tmp_path):
    with pytest.raises(FileNotFoundError, match="images_evaluation.zip"):
        load_omniglot(tmp_path, "evaluation")
    with pytest.raises(DataError, match="unknown Omniglot split"):
        load_omniglot(tmp_path, "train")
    with pytest.raises(DataError, match="image_size"):
        load_omniglot(tmp_path, "evaluation", image_size=0)


# ----------------------------------------------------------------------------------------- Lake runs


def test_lake_runs(root, tmp_path):
    ds, tasks = load_lake_runs(root, cache_dir=tmp_path)
    assert ds.images.shape == (800, 1, 28, 28) and ds.n_classes == 400
    assert (tasks.n_tasks, tasks.way, tasks.shot, tasks.n_query) == (20, 20, 1, 1)
    assert tasks.support.shape == tasks.query.shape == (20, 20)
    with zipfile.ZipFile(root / "all_runs.zip") as zf:
        for r in range(20):
            run = f"run{r + 1:02d}"
            lines = zf.read(f"{run}/class_labels.txt").decode().split()
            pairs = list(zip(lines[0::2], lines[1::2]))
            np.testing.assert_array_equal(tasks.support_labels[r], np.arange(20))
            for c in range(20):
                assert ds.paths[tasks.support[r, c]] == f"all_runs.zip:{run}/training/class{c + 1:02d}.png"
            for j, (item, cls) in enumerate(pairs):
                assert ds.paths[tasks.query[r, j]] == f"all_runs.zip:{item}"
                assert tasks.query_labels[r, j] == int(cls[-6:-4]) - 1
                # the query image's dataset label is the class of its matching training image
                k = tasks.classes[r, tasks.query_labels[r, j]]
                assert ds.labels[tasks.query[r, j]] == k and ds.classes[k] == cls[:-4].replace("/training", "")
        # pixels: one test item decoded independently
        img = Image.open(io.BytesIO(zf.read("run07/test/item13.png"))).convert("L").resize((28, 28), Image.LANCZOS)
        idx = ds.paths.index("all_runs.zip:run07/test/item13.png")
        np.testing.assert_array_equal(ds.images[idx, 0], np.asarray(img, dtype=np.float32) / 255)
    assert np.all(np.bincount(ds.labels) == 2)
    n0 = _io.decode_count()
    ds2, tasks2 = load_lake_runs(root, cache_dir=tmp_path)
    assert _io.decode_count() == n0
    np.testing.assert_array_equal(ds2.images, ds.images)
    np.testing.assert_array_equal(tasks2.query, tasks.query)


def test_lake_runs_extracted_folder_matches_zip(root, tmp_path):
    with zipfile.ZipFile(root / "all_runs.zip") as zf:
        zf.extractall(tmp_path / "data" / "all_runs")
    ds_zip, t_zip = load_lake_runs(root, cache_dir=False)
    ds_dir, t_dir = load_lake_runs(tmp_path / "data", cache_dir=False)
    np.testing.assert_array_equal(ds_dir.images, ds_zip.images)
    np.testing.assert_array_equal(ds_dir.labels, ds_zip.labels)
    for f in ("support", "support_labels", "query", "query_labels", "classes"):
        np.testing.assert_array_equal(getattr(t_dir, f), getattr(t_zip, f))
    (tmp_path / "data" / "all_runs" / "run05" / "class_labels.txt").write_text("run05/test/item01.png nonsense\n")
    with pytest.raises(DataError, match=r"run05/class_labels\.txt line 1"):
        load_lake_runs(tmp_path / "data", cache_dir=False)


# -------------------------------------------------------------------------------------- image folders


def _glyph(seed: int, size: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((size, size)) > 0.5).astype(np.uint8) * 255


def _write_class(folder: Path, n: int, seed: int, ext: str = "png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    fmt = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "bmp": "BMP"}[ext]
    for i in range(n):
        (folder / f"img{i:02d}.{ext}").write_bytes(_png_bytes(_glyph(seed * 100 + i), fmt))


def test_image_folder_flat_layout(tmp_path):
    root = tmp_path / "flat"
    _write_class(root / "cat", 3, 1)
    _write_class(root / "ant", 2, 2, "jpg")
    _write_class(root / "bee", 4, 3, "bmp")
    (root / "cat" / ".DS_Store").write_bytes(b"junk")  # hidden: skipped
    (root / "README.md").write_text("files directly in root are ignored")
    ds = load_image_folder(root, image_size=16, cache_dir=False)
    assert ds.classes == ["ant", "bee", "cat"] and ds.groups == ["", "", ""]
    assert ds.images.shape == (9, 1, 16, 16) and ds.images.dtype == np.float32
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1, 1, 1, 2, 2, 2])
    assert ds.paths[2].endswith("bee/img00.bmp")
    # bmp is lossless: the original pixels come back at image_size=None
    raw = load_image_folder(root, image_size=None, cache_dir=False)
    np.testing.assert_array_equal(raw.images[2, 0], _glyph(300) / 255.0)
    rgb = load_image_folder(root, image_size=16, grayscale=False, cache_dir=False)
    assert rgb.images.shape == (9, 3, 16, 16)


def test_image_folder_nested_layout_and_zip(tmp_path):
    root = tmp_path / "nested"
    _write_class(root / "Zeta" / "character02", 2, 1)
    _write_class(root / "Zeta" / "character01", 3, 2)
    _write_class(root / "Alpha" / "character01", 2, 3)
    ds = load_image_folder(root, image_size=10, cache_dir=tmp_path / "c")
    assert ds.classes == ["Alpha/character01", "Zeta/character01", "Zeta/character02"]
    assert ds.groups == ["Alpha", "Zeta", "Zeta"]
    np.testing.assert_array_equal(np.bincount(ds.labels), [2, 3, 2])
    n0 = _io.decode_count()
    again = load_image_folder(root, image_size=10, cache_dir=tmp_path / "c")
    assert _io.decode_count() == n0
    np.testing.assert_array_equal(again.images, ds.images)
    # the same tree zipped, inside a top folder named like the zip
    zpath = tmp_path / "nested.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(root.rglob("*.png")):
            zf.write(f, "nested/" + f.relative_to(root).as_posix())
    dz = load_image_folder(zpath, image_size=10, cache_dir=False)
    assert dz.classes == ds.classes
    np.testing.assert_array_equal(dz.images, ds.images)


def test_image_folder_corrupt_png_named(tmp_path):
    root = tmp_path / "d"
    _write_class(root / "a", 2, 1)
    bad = root / "a" / "img99.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png at all")
    with pytest.raises(DataError, match="img99.png"):
        load_image_folder(root, cache_dir=False)


def test_image_folder_truncated_png_named(tmp_path):
    root = tmp_path / "d"
    _write_class(root / "a", 2, 1)
    data = _png_bytes(_glyph(7, 64))
    (root / "a" / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.png"):
        load_image_folder(root, cache_dir=False)


def test_image_folder_non_image_file_named(tmp_path):
    root = tmp_path / "d"
    _write_class(root / "a", 2, 1)
    (root / "a" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt"):
        load_image_folder(root, cache_dir=False)


def test_image_folder_empty_class_named(tmp_path):
    root = tmp_path / "d"
    _write_class(root / "a", 2, 1)
    (root / "lonely").mkdir()
    with pytest.raises(DataError, match=r"empty class folder .*lonely"):
        load_image_folder(root, cache_dir=False)
    nested = tmp_path / "n"
    _write_class(nested / "G" / "c1", 2, 1)
    (nested / "G" / "c2").mkdir()
    with pytest.raises(DataError, match=r"empty class folder .*G/c2"):
        load_image_folder(nested, cache_dir=False)


def test_image_folder_no_classes_and_mixed(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "x.png").write_bytes(_png_bytes(_glyph(1)))
    with pytest.raises(DataError, match=r"no class folders .*x\.png"):
        load_image_folder(root, cache_dir=False)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_image_folder(tmp_path / "missing")
    mixed = tmp_path / "m"
    _write_class(mixed / "flatclass", 2, 1)
    _write_class(mixed / "Group" / "c", 2, 2)
    with pytest.raises(DataError, match="mixed folder layout"):
        load_image_folder(mixed, cache_dir=False)


def test_corrupt_png_in_omniglot_zip_named(tmp_path):
    zpath = tmp_path / "images_background_small2.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("images_background_small2/A/character01/0001_01.png", _png_bytes(_glyph(1)))
        zf.writestr("images_background_small2/A/character01/0001_02.png", b"garbage")
    with pytest.raises(DataError, match=r"images_background_small2\.zip:.*0001_02\.png"):
        load_omniglot(tmp_path, "background_small2", cache_dir=False)


# ----------------------------------------------------------------------------------------- preprocess


def test_standardiser_uses_given_images_only():
    rng = np.random.default_rng(0)
    train = rng.random((10, 1, 28, 28)).astype(np.float32)
    test = rng.random((5, 1, 28, 28)).astype(np.float32) + 3.0
    mean, std = fit_standardiser(train)
    assert isinstance(mean, float) and isinstance(std, float)
    assert mean == pytest.approx(train.astype(np.float64).mean(), rel=1e-12)
    assert std == pytest.approx(train.astype(np.float64).std(), rel=1e-12)
    z = standardise_and_pad(train, mean, std, pad=None)
    assert z.dtype == np.float32 and abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-5
    zt = standardise_and_pad(test, mean, std, pad=None)
    assert zt.mean() > 5  # test images are transformed with the training statistics, not their own
    with pytest.raises(DataError):
        fit_standardiser(np.ones((2, 1, 4, 4)))


def test_pad_geometry():
    x = np.random.default_rng(1).random((3, 1, 28, 28)).astype(np.float32)
    out = standardise_and_pad(x, 0.5, 0.25, pad=32)
    assert out.shape == (3, 1, 32, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, :, 2:30, 2:30], (x - 0.5) / 0.25, rtol=1e-6)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert np.all(out[:, :, border] == 0)
    assert standardise_and_pad(x, 0.5, 0.25, pad=28).shape == (3, 1, 28, 28)
    odd = standardise_and_pad(x, 0.0, 1.0, pad=31)
    np.testing.assert_array_equal(odd[:, :, 1:29, 1:29], x)
    with pytest.raises(DataError, match="pad=20"):
        standardise_and_pad(x, 0.0, 1.0, pad=20)


# ------------------------------------------------------------------------------------ dataset methods


def test_rotations_quadruple_classes(small1):
    ds = small1.subset_classes([0, 5])
    rot = ds.with_rotations()
    assert rot.n_classes == 8 and len(rot) == 4 * len(ds)
    assert rot.classes[:2] == ds.classes and rot.classes[2] == ds.classes[0] + "/rot90"
    assert rot.classes[7] == ds.classes[1] + "/rot270" and rot.groups == ds.groups * 4
    np.testing.assert_array_equal(np.bincount(rot.labels), [20] * 8)
    n = len(ds)
    np.testing.assert_array_equal(rot.images[:n], ds.images)
    np.testing.assert_array_equal(rot.images[n:2 * n], np.rot90(ds.images, 1, axes=(2, 3)))
    np.testing.assert_array_equal(rot.images[2 * n:3 * n], ds.images[:, :, ::-1, ::-1])
    np.testing.assert_array_equal(rot.labels[n:2 * n], ds.labels + 2)


def test_subset_and_concat(small1):
    a = small1.subset_classes([3, 1])
    assert a.classes == [small1.classes[3], small1.classes[1]] and len(a) == 40
    np.testing.assert_array_equal(a.images[a.labels == 0], small1.images[small1.labels == 3])
    b = small1.subset_classes([7])
    c = concat(a, b)
    assert c.classes == a.classes + b.classes and len(c) == 60
    np.testing.assert_array_equal(c.labels[40:], 2)
    with pytest.raises(DataError, match="occur in both"):
        concat(a, a)
    with pytest.raises(DataError, match="duplicates"):
        small1.subset_classes([1, 1])


# ------------------------------------------------------------------------------------------ download


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_download_failure_names_url(tmp_path):
    base = f"http://127.0.0.1:{_closed_port()}/omniglot/"
    t0 = time.monotonic()
    with pytest.raises(DataError) as err:
        download_omniglot(tmp_path, progress=False, timeout=2, base_url=base, files=["all_runs.zip"])
    assert time.monotonic() - t0 < 10
    msg = str(err.value)
    assert base + "one-shot-classification/all_runs.zip" in msg and "by hand" in msg
    assert not list(tmp_path.iterdir())  # no .part left behind


def test_download_skips_present_files(tmp_path):
    for name in ("images_background.zip", "images_evaluation.zip", "images_background_small1.zip",
                 "images_background_small2.zip", "all_runs.zip"):
        (tmp_path / name).write_bytes(b"already here")
    base = f"http://127.0.0.1:{_closed_port()}/"
    paths = download_omniglot(tmp_path, progress=False, timeout=2, base_url=base)
    assert [p.name for p in paths][:2] == ["images_background.zip", "images_evaluation.zip"] and len(paths) == 5


def test_image_folder_follows_symlinked_class_folders_and_refuses_a_loop(tmp_path):
    """A class folder that is a symlink (e.g. to shared storage) is loaded like any other, never skipped."""
    root, elsewhere = tmp_path / "flat", tmp_path / "elsewhere"
    _write_class(root / "ant", 2, 1)
    _write_class(elsewhere / "bee", 3, 2)
    (root / "bee").symlink_to(elsewhere / "bee", target_is_directory=True)
    ds = load_image_folder(root, image_size=8, cache_dir=False)
    assert ds.classes == ["ant", "bee"] and np.bincount(ds.labels).tolist() == [2, 3]
    (root / "ant" / "loop").symlink_to(root, target_is_directory=True)
    with pytest.raises(DataError, match=r"ant/loop.*loop"):
        load_image_folder(root, image_size=8, cache_dir=False)


def test_sixteen_bit_and_alpha_drawings_decode_as_omniglot_looks(tmp_path):
    """16-bit pixels are scaled by their bit depth (not clipped at 255), and a drawing held in the alpha channel
    (constant colour, strokes opaque) is composited on white: dark strokes on white, like Omniglot."""
    ramp = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    x = _io.decode_image(_png_bytes(ramp), "ramp.png", None)
    np.testing.assert_allclose(x[0] / 255.0, ramp / 65535.0, atol=1 / 255)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[2:6, 3, 3] = 255  # black, opaque strokes; transparent elsewhere
    x = _io.decode_image(_png_bytes(rgba), "alpha.png", None)
    assert x[0, 3, 3] == 0 and x[0, 0, 0] == 255
    la = np.zeros((8, 8, 2), np.uint8)
    la[2:6, 3, 1] = 255
    x = _io.decode_image(_png_bytes(la), "la.png", None)
    assert x[0, 3, 3] == 0 and x[0, 0, 0] == 255


def test_download_fetches_into_place_through_pooch(tmp_path):
    """A served file lands under its name, with no temporary file left; a non-official base URL is not hash-checked."""
    import http.server
    import threading
    served = tmp_path / "served" / "one-shot-classification"
    served.mkdir(parents=True)
    (served / "all_runs.zip").write_bytes(b"zip bytes")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(tmp_path / "served"), **k)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        root = tmp_path / "data"
        paths = download_omniglot(root, progress=False, timeout=5, files=["all_runs.zip"],
                                  base_url=f"http://127.0.0.1:{server.server_address[1]}/")
    finally:
        server.shutdown()
    assert paths == [root / "all_runs.zip"] and paths[0].read_bytes() == b"zip bytes"
    assert sorted(p.name for p in root.iterdir()) == ["all_runs.zip"]
