"""The Meta Neural Kernel (docs/math.md eqs. (7)-(14)) on top of a base-kernel block reader; pure numpy, no I/O.

The base kernel K is reached only through ``kb(rows, cols) -> (len(rows), len(cols))`` float64 blocks of a pool
of N images. Every function below reads whole blocks, and only these entries are ever read: train x train,
test x train, and within each test task its own (query + support) x support block (plus the query diagonal, taken
from ``k_diag`` / ``kb.diag`` when given). Test x test across different tasks is never read.

Phi_ab depends only on tasks a and b, so Phi_train for a subset of training tasks is the corresponding sub-block
of the full Phi_train, and a tile of Phi_train is assembled from ``phi_block`` calls on the overlapping tasks
(``phi_tile``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

INF = float("inf")

# How lambda enters (docs/conventions.md): "formulas" = docs/math.md (lambda once, normalisation of the unridged
# matrices); "authors" = the authors' meta_cntk.py with kernel_ridge and both normalisations on:
# base kernel n(K + lambda I), r_tau solved with n(K + lambda I)'_tau + lambda I, T_tau = n(K + lambda I)'_tau^+
# without ridge, meta kernel n(Phi + lambda I) solved with + lambda I again.
CONVENTIONS = ("formulas", "authors")

BlockReader = Callable[[np.ndarray, np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------------------------------------------
# small pieces


def _idx(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D index array; got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integers; got dtype {a.dtype}")
    return a.astype(np.intp)


def _read(kb: BlockReader, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    out = np.asarray(kb(rows, cols), dtype=np.float64)
    if out.shape != (len(rows), len(cols)):
        raise ValueError(f"block reader returned shape {out.shape}; expected {(len(rows), len(cols))}")
    return out


def _spectral(lam: np.ndarray, t: float, ridge: float) -> np.ndarray:
    """f(lam) = (1 - exp(-t lam)) / (lam + ridge); t = inf: 1 / (lam + ridge) (pseudo-inverse when ridge = 0).

    Eigenvalues are clipped at 0 (the matrices are PSD up to rounding); with ridge = 0 eigenvalues <= tiny
    (n * eps * max) take their limit: t for finite t, 0 (pseudo-inverse) for t = inf.
    """
    if not t > 0:
        raise ValueError(f"time / learning-rate parameter must be > 0; got {t}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0; got {ridge}")
    lam = np.clip(np.asarray(lam, dtype=np.float64), 0.0, None)
    tiny = lam.size * np.finfo(np.float64).eps * (lam.max() if lam.size else 0.0)
    small = lam <= tiny
    den = lam + ridge
    if ridge > 0:
        small = np.zeros_like(small)
    safe = np.where(small, 1.0, den)
    if np.isinf(t):
        return np.where(small, 0.0, 1.0 / safe)
    return np.where(small, t, -np.expm1(-t * lam) / safe)


def _spectral_apply(m: np.ndarray, t: float, ridge: float) -> np.ndarray:
    """U f(lam) U^T for the symmetric m = U diag(lam) U^T (f from _spectral); symmetric by construction."""
    m = np.asarray(m, dtype=np.float64)
    if m.shape[0] == 0:
        return np.zeros_like(m)
    lam, u = np.linalg.eigh(0.5 * (m + m.T))
    return (u * _spectral(lam, t, ridge)) @ u.T


def _inv_sqrt(d: np.ndarray, scale: float) -> np.ndarray:
    """1 / sqrt(d), and 0 where d <= 1e-12 * scale (a residual feature that vanishes normalises to 0)."""
    d = np.asarray(d, dtype=np.float64)
    ok = d > 1e-12 * scale
    return np.where(ok, 1.0 / np.sqrt(np.where(ok, d, 1.0)), 0.0)


# ----------------------------------------------------------------------------------------------------------------
# labels, inner loop, base-kernel normalisation


def centred_onehot(labels, way: int) -> np.ndarray:
    """Y[i, c] = 1 - 1/C if c = labels[i] else -1/C (C = way): the centred one-hot labels Y, Y'
    (docs/math.md eq. (13))."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D; got shape {labels.shape}")
    if way < 1:
        raise ValueError(f"way must be >= 1; got {way}")
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= way):
        raise ValueError(f"labels must be integers in [0, {way}); got {labels}")
    y = np.full((labels.size, way), -1.0 / way)
    y[np.arange(labels.size), labels] += 1.0
    return y


def inner_operator(k_ss, *, eta: float = INF, ridge: float = 1e-5) -> np.ndarray:
    """T_tau = K'_tau^+ (I - exp(-eta K'_tau)) for finite eta (no ridge); eta = inf: T_tau = (K'_tau + ridge I)^-1
    (docs/math.md eq. (7))."""
    k_ss = np.asarray(k_ss, dtype=np.float64)
    if k_ss.ndim != 2 or k_ss.shape[0] != k_ss.shape[1]:
        raise ValueError(f"K'_tau must be square; got shape {k_ss.shape}")
    return _spectral_apply(k_ss, eta, ridge if np.isinf(eta) else 0.0)


def cosine_normalised(kb: BlockReader, diag) -> BlockReader:
    """kb'(r, c) = K(r, c) / sqrt(K_rr K_cc) (docs/math.md eq. (14)) with diag = (K_ii) over the whole pool; the
    result has .diag = ones."""
    diag = np.asarray(diag, dtype=np.float64)
    if diag.ndim != 1:
        raise ValueError(f"diag must be 1-D over the pool; got shape {diag.shape}")
    if not (diag > 0).all():
        bad = np.flatnonzero(~(diag > 0))
        raise ValueError(f"cosine normalisation needs K_ii > 0; {bad.size} entries are not, the first at {bad[0]}")
    s = 1.0 / np.sqrt(diag)

    def kb_normalised(rows, cols):
        rows, cols = np.asarray(rows, dtype=np.intp), np.asarray(cols, dtype=np.intp)
        return _read(kb, rows, cols) * s[rows][:, None] * s[cols][None, :]

    kb_normalised.diag = np.ones_like(diag)
    return kb_normalised


def ridged_cosine_normalised(kb: BlockReader, diag, ridge: float) -> BlockReader:
    """kb'(r, c) = (K(r, c) + ridge [r = c]) / sqrt((K_rr + ridge)(K_cc + ridge)): n(K + ridge I) over the pool, the
    authors' base kernel (ridge on the diagonal of the pool, one entry per distinct image); .diag = ones."""
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0; got {ridge}")

    def kb_ridged(rows, cols):
        rows, cols = np.asarray(rows, dtype=np.intp), np.asarray(cols, dtype=np.intp)
        return _read(kb, rows, cols) + ridge * (rows[:, None] == cols[None, :])

    return cosine_normalised(kb_ridged, np.asarray(diag, dtype=np.float64) + ridge)


def _check_conventions(conventions: str) -> None:
    if conventions not in CONVENTIONS:
        raise ValueError(f"conventions must be one of {', '.join(CONVENTIONS)}; got {conventions!r}")


def support_regression(k_xs, T, y_s) -> np.ndarray:
    """r_tau(X) = K(X, X'_tau) T_tau Y'_tau (docs/math.md eq. (10))."""
    return np.asarray(k_xs, dtype=np.float64) @ (np.asarray(T) @ np.asarray(y_s, dtype=np.float64))


def centroid_targets(emb, labels) -> np.ndarray:
    """Y[i] = mean of emb[j] over the images j with labels[j] = labels[i]: each image's class centroid in its task
    (docs/math.md eq. (15))."""
    emb, labels = np.asarray(emb, dtype=np.float64), np.asarray(labels)
    if emb.ndim != 2 or len(emb) != len(labels):
        raise ValueError(f"embeddings {emb.shape} and labels {labels.shape} do not match")
    classes, inverse = np.unique(labels, return_inverse=True)
    sums = np.zeros((len(classes), emb.shape[1]))
    np.add.at(sums, inverse, emb)
    return (sums / np.bincount(inverse)[:, None])[inverse]


def nearest_support(scores, support_targets, support_labels) -> np.ndarray:
    """Predicted label of each row of F: the label of the nearest support target, argmin_j ||F(x) - Y'_j||
    (docs/math.md eq. (16))."""
    f, y = np.asarray(scores, dtype=np.float64), np.asarray(support_targets, dtype=np.float64)
    d = (f * f).sum(1)[:, None] - 2 * f @ y.T + (y * y).sum(1)[None, :]
    return np.asarray(support_labels)[d.argmin(1)]


# ----------------------------------------------------------------------------------------------------------------
# tasks


@dataclass
class TaskOps:
    """One task tau, precomputed once: indices, T_tau, K(X_tau, X'_tau), K'_tau, Y'_tau, Y_tau, r_tau(X_tau)."""

    support: np.ndarray  # (n_s,) pool indices of X'_tau
    query: np.ndarray  # (n_q,) pool indices of X_tau
    T: np.ndarray  # (n_s, n_s) inner operator T_tau (inside Phi)
    R: np.ndarray  # (n_s, n_s) operator of r_tau(X) = K(X, X'_tau) R Y'_tau: T_tau, or the ridged one ("authors")
    k_qs: np.ndarray  # (n_q, n_s) K(X_tau, X'_tau)
    k_ss: np.ndarray  # (n_s, n_s) K'_tau = K(X'_tau, X'_tau)
    y_s: np.ndarray  # (n_s, D) targets Y'_tau: centred one-hot (D = way), or label embeddings (with_targets)
    y_q: np.ndarray  # (n_q, D) targets Y_tau
    r_q: np.ndarray  # (n_q, D) r_tau(X_tau)
    q_diag: np.ndarray | None  # (n_q,) K(x, x) for x in X_tau, or None (then read from kb on demand)

    @property
    def n_q(self) -> int:
        return len(self.query)

    @property
    def way(self) -> int:
        """Target dimension D: the number of ways for one-hot targets."""
        return self.y_s.shape[1]

    @property
    def u_q(self) -> np.ndarray:
        """K(X_tau, X'_tau) T_tau, shape (n_q, n_s)."""
        return self.k_qs @ self.T


def task_ops(kb: BlockReader, support, support_labels, query, query_labels, *, way: int, eta: float = INF,
             ridge: float = 1e-5, k_diag=None, conventions: str = "formulas") -> TaskOps:
    """TaskOps of tau from one read of K([X_tau; X'_tau], X'_tau): T_tau, r_tau(X_tau) = K(X_tau, X'_tau) T_tau Y'_tau.

    k_diag: K_ii over the pool (defaults to kb.diag, which cosine_normalised provides); without either, phi_diag
    reads the within-task block K(X_tau, X_tau) for its diagonal. conventions="authors" (kb the authors' base kernel,
    ridged_cosine_normalised): T_tau = K'^+ (I - exp(-eta K')) with no ridge at any eta, while r_tau uses
    R = (K' + ridge I)^-1 (I - exp(-eta K')), the KernelRidge solve of the authors' code.
    """
    _check_conventions(conventions)
    support, query = _idx(support, "support"), _idx(query, "query")
    y_s, y_q = centred_onehot(support_labels, way), centred_onehot(query_labels, way)
    if len(y_s) != len(support) or len(y_q) != len(query):
        raise ValueError("support/query labels must match the support/query index arrays in length")
    n_q = len(query)
    blk = _read(kb, np.concatenate([query, support]), support)
    k_qs, k_ss = blk[:n_q], blk[n_q:]
    k_ss = 0.5 * (k_ss + k_ss.T)
    if conventions == "authors":
        T, R = _spectral_apply(k_ss, eta, 0.0), _spectral_apply(k_ss, eta, ridge)
    else:
        T = R = inner_operator(k_ss, eta=eta, ridge=ridge)
    if k_diag is None:
        k_diag = getattr(kb, "diag", None)
    q_diag = None if k_diag is None else np.asarray(k_diag, dtype=np.float64)[query]
    return TaskOps(support=support, query=query, T=T, R=R, k_qs=k_qs, k_ss=k_ss, y_s=y_s, y_q=y_q,
                   r_q=support_regression(k_qs, R, y_s), q_diag=q_diag)


def with_targets(op: TaskOps, y_s, y_q) -> TaskOps:
    """The task with other regression targets Y'_tau, Y_tau (e.g. label embeddings) and r_tau(X_tau) = K T Y'_tau."""
    y_s, y_q = np.asarray(y_s, dtype=np.float64), np.asarray(y_q, dtype=np.float64)
    if y_s.shape[0] != len(op.support) or y_q.shape[0] != op.n_q or y_s.shape[1:] != y_q.shape[1:]:
        raise ValueError(f"targets {y_s.shape} / {y_q.shape} do not fit {len(op.support)} support and {op.n_q} "
                         "query images with one target dimension")
    return replace(op, y_s=y_s, y_q=y_q, r_q=support_regression(op.k_qs, op.R, y_s))


# ----------------------------------------------------------------------------------------------------------------
# the meta kernel Phi


def _positions(sel, n: int) -> np.ndarray:
    if sel is None:
        return np.arange(n)
    if isinstance(sel, slice):
        return np.arange(n)[sel]
    return _idx(sel, "rows/cols")


def phi_block(kb: BlockReader, a: TaskOps, b: TaskOps, rows=None, cols=None) -> np.ndarray:
    """Phi_ab = K(X_a,X_b) - K(X_a,X'_a)T_a K(X'_a,X_b) - K(X_a,X'_b)T_b K(X'_b,X_b)
    + K(X_a,X'_a)T_a K(X'_a,X'_b)T_b K(X'_b,X_b).

    docs/math.md eq. (9). rows / cols (positions within a's / b's query set, index arrays or slices) restrict the
    block to a tile.
    One base-kernel read: K([X_a[rows]; X'_a], [X_b[cols]; X'_b]).
    """
    rows, cols = _positions(rows, a.n_q), _positions(cols, b.n_q)
    nr, nc = len(rows), len(cols)
    m = _read(kb, np.concatenate([a.query[rows], a.support]), np.concatenate([b.query[cols], b.support]))
    k_ab, k_asb = m[:nr, :nc], m[:nr, nc:]  # K(X_a, X_b), K(X_a, X'_b)
    k_sab, k_sasb = m[nr:, :nc], m[nr:, nc:]  # K(X'_a, X_b), K(X'_a, X'_b)
    ua = a.k_qs[rows] @ a.T  # K(X_a, X'_a) T_a
    vb = b.T @ b.k_qs[cols].T  # T_b K(X'_b, X_b)
    return k_ab - ua @ k_sab - k_asb @ vb + ua @ (k_sasb @ vb)


def phi_diag(kb: BlockReader, a: TaskOps) -> np.ndarray:
    """diag Phi_aa = K(x,x) - 2 K(x,X'_a)T_a K(X'_a,x) + K(x,X'_a)T_a K'_a T_a K(X'_a,x) for x in X_a (within-task).

    The diagonal of docs/math.md eq. (9) within one task."""
    q_diag = a.q_diag
    if q_diag is None:
        q_diag = np.diag(_read(kb, a.query, a.query)).copy()
    ua = a.u_q
    d = q_diag - 2.0 * np.einsum("ij,ij->i", ua, a.k_qs) + np.einsum("ij,ij->i", ua @ a.k_ss, ua)
    return np.clip(d, 0.0, None)


def _offsets(tasks: Sequence[TaskOps]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([t.n_q for t in tasks], dtype=np.int64)])


def phi_cross(kb: BlockReader, a: TaskOps, tasks: Sequence[TaskOps], rows=None) -> np.ndarray:
    """Phi(X_a, X_train) = [Phi_a1 ... Phi_an], shape (n_q(a) or len(rows), sum n_q): a's queries x stacked queries."""
    nr = len(_positions(rows, a.n_q))
    if not tasks:
        return np.zeros((nr, 0))
    return np.concatenate([phi_block(kb, a, b, rows=rows) for b in tasks], axis=1)


def phi_tile(kb: BlockReader, tasks: Sequence[TaskOps], rows: slice, cols: slice) -> np.ndarray:
    """Phi_train[rows, cols] (contiguous slices of the stacked queries), from phi_block on the overlapping tasks."""
    off = _offsets(tasks)
    total = int(off[-1])
    r0, r1, _ = rows.indices(total)
    c0, c1, _ = cols.indices(total)
    out = np.empty((max(r1 - r0, 0), max(c1 - c0, 0)))
    for i, a in enumerate(tasks):
        ra, rb = max(r0, off[i]), min(r1, off[i + 1])
        if ra >= rb:
            continue
        for j, b in enumerate(tasks):
            ca, cb = max(c0, off[j]), min(c1, off[j + 1])
            if ca >= cb:
                continue
            out[ra - r0:rb - r0, ca - c0:cb - c0] = phi_block(
                kb, a, b, rows=slice(ra - off[i], rb - off[i]), cols=slice(ca - off[j], cb - off[j]))
    return out


def mnk_train_matrix(kb: BlockReader, tasks: Sequence[TaskOps]) -> np.ndarray:
    """Phi_train = [Phi_ab]_{a,b} over the stacked training queries, (sum n_q)^2, symmetric (upper blocks read)."""
    off = _offsets(tasks)
    out = np.empty((int(off[-1]),) * 2)
    for i, a in enumerate(tasks):
        for j in range(i, len(tasks)):
            blk = phi_block(kb, a, tasks[j])
            if i == j:
                blk = 0.5 * (blk + blk.T)
            out[off[i]:off[i + 1], off[j]:off[j + 1]] = blk
            out[off[j]:off[j + 1], off[i]:off[i + 1]] = blk.T
    return out


# ----------------------------------------------------------------------------------------------------------------
# prediction


@dataclass
class MNKFit:
    """Test-independent part of MNK: alpha = (Phi_train + lambda I)^-1 E(Phi_train) (Y_train - R_train)."""

    alpha: np.ndarray  # (sum n_q, way), in the (optionally cosine-normalised) Phi coordinates
    phi_train_diag: np.ndarray  # (sum n_q,) diag of the raw Phi_train
    normalise_phi: bool
    ridge: float
    t_outer: float
    diag_shift: float = 0.0  # added to diag Phi before normalising: 0, or lambda for n(Phi + lambda I) ("authors")


def mnk_fit(train: Sequence[TaskOps], phi_train, *, ridge: float = 1e-5, t_outer: float = INF,
            normalise_phi: bool = True, phi_train_diag=None, conventions: str = "formulas") -> MNKFit:
    """alpha = (Phi_train + lambda I)^-1 (I - exp(-t_outer Phi_train)) (Y_train - R_train) (E = I for t_outer = inf).

    The fit of docs/math.md eq. (11). phi_train is the raw Phi_train; with normalise_phi,
    Phi_train_ij / sqrt(Phi_ii Phi_jj) is used instead (phi_train_diag: the raw diagonal, default diag(phi_train)).
    """
    # conventions="authors": n(Phi_train + lambda I) in place of n(Phi_train), then solved with + lambda I again.
    _check_conventions(conventions)
    if conventions == "authors" and not normalise_phi:
        raise ValueError('conventions="authors" is defined with the cosine-normalised meta kernel (normalise_phi)')
    shift = ridge if conventions == "authors" else 0.0
    phi = np.asarray(phi_train, dtype=np.float64)
    m = int(sum(t.n_q for t in train))
    if phi.shape != (m, m):
        raise ValueError(f"phi_train has shape {phi.shape}; the training tasks stack {m} queries")
    way = train[0].way if train else 0
    if any(t.way != way for t in train):
        raise ValueError("training tasks have different numbers of ways")
    d = np.diag(phi).copy() if phi_train_diag is None else np.asarray(phi_train_diag, dtype=np.float64)
    if m == 0:
        return MNKFit(np.zeros((0, way)), d, normalise_phi, ridge, t_outer, shift)
    if normalise_phi:
        s = _inv_sqrt(d + shift, d.max() + shift)
        phi = (phi + shift * np.eye(m)) * s[:, None] * s[None, :]
    resid = np.concatenate([t.y_q - t.r_q for t in train])
    phi = 0.5 * (phi + phi.T)
    if np.isinf(t_outer) and ridge > 0:
        alpha = np.linalg.solve(phi + ridge * np.eye(m), resid)
    else:
        alpha = _spectral_apply(phi, t_outer, ridge) @ resid
    return MNKFit(alpha, d, normalise_phi, ridge, t_outer, shift)


def phi_test(kb: BlockReader, train: Sequence[TaskOps], test: TaskOps, fit: MNKFit) -> np.ndarray:
    """Phi(X_t, X_train), cosine-normalised Phi_ti / sqrt(Phi_tt Phi_ii) when the fit is (meta term: this @ alpha).

    The prediction of docs/math.md eq. (11) is F(X_t) = r_t(X_t) + phi_test(...) @ fit.alpha (evaluate forms it once
    per test task for every label mode). Only test x train blocks and the test task's own blocks are read here.
    """
    phi_t = phi_cross(kb, test, train)
    if fit.normalise_phi:
        shift = fit.diag_shift  # the test rows are other rows of Phi: lambda I adds only to their diagonal
        scale = fit.phi_train_diag.max() + shift
        phi_t = (phi_t * _inv_sqrt(phi_diag(kb, test) + shift, scale)[:, None]
                 * _inv_sqrt(fit.phi_train_diag + shift, scale)[None, :])
    return phi_t


def accuracy(scores, labels) -> float:
    """mean over queries of [argmax_c F(x)_c = y]."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.ndim != 2 or len(scores) != len(labels):
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} do not match")
    return float(np.mean(np.argmax(scores, axis=1) == labels)) if len(labels) else float("nan")
