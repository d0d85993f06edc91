"""The validation tasks' base kernel, for choosing the ridge on held-out tasks (docs/math.md sec. 2.5).

The Gram covers the pool (training and test images); the validation tasks (training-split classes no training task
uses) are outside it. Choosing the ridge on them needs K(validation image, training image) and K within the
validation images: about nv x (n_train + nv / 2) entries, computed here once per store with the store's kernel
settings (the same CPU code as the Gram's tiles) and kept under <results>/validation/<key>.npz, keyed by the store's
Gram key. In the combined reader, validation image v has index n + v (n: the pool size), as the baselines stack them.
"""

from pathlib import Path

import numpy as np

from ..files import atomic_write
from ..kernels import cntk_block, scale_maps
from ..keys import settings_key
from .derived import held, store_gram_key

FORMAT = "mnkpipe-validation-kernel/1"


def train_image_indices(store) -> np.ndarray:
    """Sorted pool indices of every image of every training task (support and query)."""
    return store.episodes().train.image_ids()


def validation_kernel_path(results: Path, store) -> Path:
    return Path(results) / "validation" / f"{settings_key({'format': FORMAT, 'gram_key': store_gram_key(store)})}.npz"


def validation_kernel(results: Path, store, progress: bool = True) -> dict:
    """{"train": pool indices T, "vt": K(V, X_T), "vv": K(V, V)} of the store's validation images V, computed once
    (under the item's lock, written whole) and read back on later calls."""
    path = validation_kernel_path(results, store)
    with held(Path(results), path):
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            arrays = _compute(store, progress)
            atomic_write(path, lambda f: np.savez(f, **arrays))
        with np.load(path) as z:
            return {k: z[k] for k in ("train", "vt", "vv")}


def _compute(store, progress: bool) -> dict:
    """K(V, X_T) and K(V, V) with the store's [kernel] settings, on the CPU backend, in row blocks."""
    from tqdm import tqdm
    k = store.manifest["config"]["kernel"]
    depth, gap, fix = int(k["depth"]), bool(k["gap"]), bool(k["fix"])
    train = train_image_indices(store)
    v = store.array("val_images")[...]
    lv = scale_maps(v, depth)
    xt, lt = store.images(train), store.scales(train)
    vt = np.empty((len(v), len(train)))
    step = store.tile_size
    for b in tqdm(range(0, len(v), step), desc="validation kernel", disable=not progress):
        rows = slice(b, b + step)
        vt[rows] = cntk_block(v[rows], lv[rows], xt, lt, depth=depth, gap=gap, fix=fix, backend="cpu")
    vv = cntk_block(v, lv, v, lv, depth=depth, gap=gap, fix=fix, upper=True, backend="cpu")
    return {"train": train, "vt": vt, "vv": vv}


class WithValidation:
    """The block reader K(rows, cols) over the pool (indices < n, from the Gram reader `gram`) and the validation
    images (index n + v): pool x pool from the Gram, validation x training images and validation x validation from
    the validation kernel; a validation x test entry was never computed and raises ValueError. .diag covers both."""

    def __init__(self, gram, n: int, vk: dict):
        self.gram, self.n, self.vt, self.vv = gram, n, vk["vt"], vk["vv"]
        self.col = np.full(n, -1, np.intp)
        self.col[vk["train"]] = np.arange(len(vk["train"]))
        self.diag = np.concatenate([gram.diag, np.diag(self.vv)])

    def _vt(self, v: np.ndarray, pool: np.ndarray) -> np.ndarray:
        c = self.col[pool]
        if (c < 0).any():
            raise ValueError(f"K(validation, pool image {pool[c < 0][0]}) was not computed: only training images")
        return self.vt[np.ix_(v, c)]

    def __call__(self, rows, cols) -> np.ndarray:
        rows, cols = np.asarray(rows, np.intp), np.asarray(cols, np.intp)
        out = np.empty((len(rows), len(cols)))
        rp, cp = rows < self.n, cols < self.n
        rv, cv = ~rp, ~cp
        if rp.any() and cp.any():
            out[np.ix_(rp, cp)] = self.gram(rows[rp], cols[cp])
        if rv.any() and cp.any():
            out[np.ix_(rv, cp)] = self._vt(rows[rv] - self.n, cols[cp])
        if rp.any() and cv.any():
            out[np.ix_(rp, cv)] = self._vt(cols[cv] - self.n, rows[rp]).T
        if rv.any() and cv.any():
            out[np.ix_(rv, cv)] = self.vv[np.ix_(rows[rv] - self.n, cols[cv] - self.n)]
        return out
