"""A small CNTK Gram of real Omniglot images with its timing (the `mnkpipe gram` command)."""

import time

import numpy as np

from ..data import fit_standardiser, load_omniglot, resolve_data_root, standardise_and_pad
from ..kernels import cntk, resolve_backend
from ..memory import TooBigError


def omniglot_gram(data=None, *, n: int = 8, depth: int = 10, size: int = 28, backend: str = "auto") -> dict:
    """K of the first image of n different evaluation characters (two alphabets), standardised and padded by 4."""
    try:
        ds = load_omniglot(resolve_data_root(data), "evaluation", image_size=size, alphabets=["Angelic", "Keble"])
    except TooBigError as e:
        raise TooBigError(f"--size {size}: {e}") from None
    if n > ds.n_classes:
        raise ValueError(f"--n {n}: the quick look has {ds.n_classes} characters (alphabets Angelic and Keble); "
                         f"use --n {ds.n_classes} or fewer")
    first = [int(np.nonzero(ds.labels == c)[0][0]) for c in range(n)]
    mean, std = fit_standardiser(ds.images)
    x = standardise_and_pad(ds.images[first], mean, std, size + 4)
    backend = resolve_backend(backend)
    t = time.perf_counter()
    k = cntk(x, depth=depth, backend=backend)
    seconds = time.perf_counter() - t
    d = np.sqrt(np.diag(k))
    return {"gram": k, "cosine": k / np.outer(d, d), "names": [ds.paths[i].split(":")[-1] for i in first],
            "pairs": len(first) * (len(first) + 1) // 2, "seconds": seconds, "backend": backend,
            "diag_mean": float(np.diag(k).mean())}
