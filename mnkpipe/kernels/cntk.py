"""The public CNTK entry point: input checks, scale maps, and the choice of backend."""

import numpy as np

from .scales import normalise, pow2_scale, scale_maps

BACKENDS = ("auto", "reference", "cpu", "cupy")


def check_images(x, name: str = "x") -> np.ndarray:
    """x as a finite (N, C, H, W) float array, or ValueError that says what is wrong with it."""
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W); got ndim={x.ndim} with shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{name} must be numeric; got dtype {x.dtype}")
    if min(x.shape[1:]) < 1:
        raise ValueError(f"{name} has an empty channel or spatial axis: shape {x.shape}")
    bad = ~np.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} has {int(bad.sum())} non-finite values (NaN or inf), the first at index {first}")
    return x


def resolve_backend(backend: str) -> str:
    """'auto' -> 'cupy' when a GPU is usable, else 'cpu'; other names are checked and returned."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown CNTK backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        from .cntk_cupy import available
        return "cupy" if available() else "cpu"
    return backend


def cntk_block(x1, l1, x2, l2, *, depth: int, gap: bool = True, fix: bool = False, upper: bool = False,
               backend: str = "cpu") -> np.ndarray:
    """K[i, j] = K(x1_i, x2_j) from images and their precomputed scale maps l = scale_maps(x, depth).

    K(x, z) = m_x m_z K(x / m_x, z / m_z) with powers of two m = pow2_scale(x): exact, and it keeps the float32
    backends inside their range for any finite input (CupyCNTK does the same on its resident images)."""
    for name, l in (("l1", l1), ("l2", l2)):  # shallower maps would silently give a shallower kernel
        if np.ndim(l) != 4 or np.shape(l)[1] < depth - 1:
            raise ValueError(f"{name} holds scale maps of {np.shape(l)[1] if np.ndim(l) == 4 else '?'} layers "
                             f"(shape {np.shape(l)}), but depth {depth} needs {depth - 1}: make them with "
                             f"scale_maps(x, {depth})")
    backend = resolve_backend(backend)
    if backend == "cupy":
        from .cntk_cupy import cntk_block_cupy
        return cntk_block_cupy(x1, l1, x2, l2, depth=depth, gap=gap, fix=fix, upper=upper)
    m1, m2 = pow2_scale(x1), pow2_scale(x2)
    dtype = np.float64 if backend == "reference" else np.float32
    x1, l1, x2, l2 = (normalise(a, m, dtype) for a, m in ((x1, m1), (l1, m1), (x2, m2), (l2, m2)))
    if backend == "reference":
        from .cntk_reference import cntk_pair
        k = np.empty((len(x1), len(x2)))
        for i in range(len(x1)):
            for j in range(i if upper else 0, len(x2)):
                k[i, j] = cntk_pair(x1[i], x2[j], l1[i], l2[j], depth=depth, gap=gap, fix=fix)
                if upper:
                    k[j, i] = k[i, j]
    else:
        from .cntk_cpu import cntk_block_cpu
        k = cntk_block_cpu(x1, l1, x2, l2, depth=depth, gap=gap, fix=fix, upper=upper)
    return k * np.outer(m1, m2)


def cntk(x1, x2=None, *, depth: int, gap: bool = True, fix: bool = False, backend: str = "auto") -> np.ndarray:
    """Gram K[i, j] = CNTK(x1_i, x2_j) (docs/math.md eqs. (1)-(6)), float64 (N1, N2); x2=None: symmetric, upper
    triangle only."""
    if int(depth) != depth or depth < 2:
        raise ValueError(f"depth must be an integer >= 2 (depth - 1 conv layers); got {depth!r}")
    x1 = check_images(x1, "x1")
    l1 = scale_maps(x1, depth)
    if x2 is None:
        return cntk_block(x1, l1, x1, l1, depth=depth, gap=gap, fix=fix, upper=True, backend=backend)
    x2 = check_images(x2, "x2")
    if x2.shape[1:] != x1.shape[1:]:
        raise ValueError(f"x1 and x2 must have the same (C, H, W); got {x1.shape[1:]} and {x2.shape[1:]}")
    return cntk_block(x1, l1, x2, scale_maps(x2, depth), depth=depth, gap=gap, fix=fix, backend=backend)
