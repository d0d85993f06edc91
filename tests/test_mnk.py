"""Meta Neural Kernel (docs/math.md eqs. (7)-(14)) against a dense brute force built from explicit finite features."""

import itertools

import numpy as np
import pytest

from mnkpipe.kernels.mnk import (
    INF,
    accuracy,
    centred_onehot,
    centroid_targets,
    cosine_normalised,
    inner_operator,
    mnk_fit,
    mnk_train_matrix,
    nearest_support,
    phi_block,
    phi_cross,
    phi_diag,
    phi_test,
    phi_tile,
    ridged_cosine_normalised,
    support_regression,
    task_ops,
    with_targets,
)

WAY, N_S, N_Q = 3, 3, 4
N_POOL, DIM = 60, 64


# ---------------------------------------------------------------------------------------------- fixtures / helpers


def expm(a: np.ndarray) -> np.ndarray:
    """Matrix exponential by scaling and squaring a Taylor series (independent of the module's eigh route)."""
    norm = np.abs(a).sum(axis=1).max()
    s = max(0, int(np.ceil(np.log2(norm))) + 1) if norm > 0 else 0
    b = a / 2.0**s
    out, term = np.eye(len(a)), np.eye(len(a))
    for k in range(1, 30):
        term = term @ b / k
        out = out + term
    for _ in range(s):
        out = out @ out
    return out


def make_pool(seed=0, dim=DIM):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(N_POOL, dim)) * rng.uniform(0.5, 2.0, size=(N_POOL, 1))


def make_tasks(n_tasks, seed=1):
    """Disjoint tasks: (support idx, support labels, query idx, query labels)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(N_POOL)
    out = []
    for t in range(n_tasks):
        idx = perm[t * (N_S + N_Q):(t + 1) * (N_S + N_Q)]
        out.append((idx[:N_S], np.arange(N_S) % WAY, idx[N_S:], rng.integers(0, WAY, size=N_Q)))
    return out


def reader(k):
    def kb(rows, cols):
        return k[np.ix_(np.asarray(rows), np.asarray(cols))]
    return kb


def build(feats, specs, *, eta=INF, ridge=1e-5, with_diag=True):
    k = feats @ feats.T
    kb = reader(k)
    ops = [task_ops(kb, s, sl, q, ql, way=WAY, eta=eta, ridge=ridge, k_diag=np.diag(k) if with_diag else None)
           for s, sl, q, ql in specs]
    return kb, ops


def brute_T(k_ss, eta, ridge):
    if np.isinf(eta):
        return np.linalg.inv(k_ss + ridge * np.eye(len(k_ss)))
    return np.linalg.pinv(k_ss) @ (np.eye(len(k_ss)) - expm(-eta * k_ss))


def brute_psi(feats, spec, eta, ridge):
    """psi_tau(x) = phi(x) - K(x, X'_tau) T_tau phi(X'_tau) for x in X_tau, and r_tau(X_tau)."""
    s, sl, q, _ = spec
    k = feats @ feats.T
    t = brute_T(k[np.ix_(s, s)], eta, ridge)
    psi = feats[q] - k[np.ix_(q, s)] @ t @ feats[s]
    r = k[np.ix_(q, s)] @ t @ centred_onehot(sl, WAY)
    return psi, r


def brute_predict(feats, train_specs, test_spec, *, eta, ridge, t_outer, normalise):
    psis, rs = zip(*(brute_psi(feats, sp, eta, ridge) for sp in train_specs))
    psi_tr, r_tr = np.concatenate(psis), np.concatenate(rs)
    y_tr = np.concatenate([centred_onehot(sp[3], WAY) for sp in train_specs])
    psi_t, r_t = brute_psi(feats, test_spec, eta, ridge)
    if normalise:
        psi_tr = psi_tr / np.linalg.norm(psi_tr, axis=1, keepdims=True)
        psi_t = psi_t / np.linalg.norm(psi_t, axis=1, keepdims=True)
    phi = psi_tr @ psi_tr.T
    m = len(phi)
    e = np.eye(m) if np.isinf(t_outer) else np.eye(m) - expm(-t_outer * phi)
    return r_t + (psi_t @ psi_tr.T) @ np.linalg.inv(phi + ridge * np.eye(m)) @ e @ (y_tr - r_tr)


# ---------------------------------------------------------------------------------------------- small pieces


def predict(kb, train, test, fit=None, **fit_settings):
    """F(X_t) = r_t(X_t) + phi_test @ alpha, composed as evaluate composes it (alpha from mnk_fit on Phi_train)."""
    fit = fit or mnk_fit(train, mnk_train_matrix(kb, train), **fit_settings)
    return test.r_q + phi_test(kb, train, test, fit) @ fit.alpha


def test_centred_onehot_and_accuracy():
    y = centred_onehot(np.array([0, 2]), 3)
    np.testing.assert_allclose(y, [[2 / 3, -1 / 3, -1 / 3], [-1 / 3, -1 / 3, 2 / 3]])
    np.testing.assert_allclose(y.sum(axis=1), 0, atol=1e-15)
    with pytest.raises(ValueError):
        centred_onehot(np.array([3]), 3)
    assert accuracy(y, np.array([0, 2])) == 1.0
    assert accuracy(y, np.array([1, 2])) == 0.5


def test_inner_operator_against_dense_formula():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(5, 8))
    k = a @ a.T
    for eta in (0.05, 0.7, 3.0):
        np.testing.assert_allclose(inner_operator(k, eta=eta), brute_T(k, eta, 0.0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(inner_operator(k, ridge=1e-3), np.linalg.inv(k + 1e-3 * np.eye(5)), rtol=1e-9)
    np.testing.assert_allclose(inner_operator(k, ridge=0.0), np.linalg.pinv(k), rtol=1e-9)


def test_inner_operator_singular_limits():
    k = np.diag([2.0, 0.0])
    eta = 0.4
    np.testing.assert_allclose(inner_operator(k, eta=eta), np.diag([-np.expm1(-2 * eta) / 2, eta]), rtol=1e-14)
    np.testing.assert_allclose(inner_operator(k, ridge=0.0), np.diag([0.5, 0.0]), rtol=1e-14)


def test_inner_operator_eta_to_infinity():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(4, 10))
    k = a @ a.T  # well conditioned: smallest eigenvalue O(1)
    assert np.linalg.eigvalsh(k).min() > 0.5
    limit = inner_operator(k, eta=INF, ridge=0.0)
    errs = [np.abs(inner_operator(k, eta=eta) - limit).max() for eta in (0.01, 0.1, 1.0)]
    assert errs[0] > errs[1] > errs[2]
    np.testing.assert_allclose(inner_operator(k, eta=1e4), limit, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(inner_operator(k, eta=INF, ridge=1e-12), limit, rtol=1e-9)


def test_cosine_normalised_reader():
    feats = make_pool()
    k = feats @ feats.T
    kbn = cosine_normalised(reader(k), np.diag(k))
    fn = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    rows, cols = np.array([3, 1, 7]), np.array([0, 7, 59, 3])
    np.testing.assert_allclose(kbn(rows, cols), (fn @ fn.T)[np.ix_(rows, cols)], rtol=1e-12)
    np.testing.assert_array_equal(kbn.diag, np.ones(N_POOL))


def test_task_ops_support_regression():
    feats = make_pool()
    spec = make_tasks(1)[0]
    kb, (op,) = build(feats, [spec])
    psi, r = brute_psi(feats, spec, INF, 1e-5)
    np.testing.assert_allclose(op.r_q, r, rtol=1e-10)
    np.testing.assert_allclose(support_regression(op.k_qs, op.T, op.y_s), r, rtol=1e-10)
    np.testing.assert_allclose(phi_diag(kb, op), (psi**2).sum(axis=1), rtol=1e-9)


# ---------------------------------------------------------------------------------------------- Phi


def test_phi_blocks_match_psi_features():
    feats = make_pool()
    specs = make_tasks(3)
    for eta in (INF, 0.3):
        kb, ops = build(feats, specs, eta=eta)
        psi = [brute_psi(feats, sp, eta, 1e-5)[0] for sp in specs]
        for i, j in itertools.product(range(3), repeat=2):
            np.testing.assert_allclose(phi_block(kb, ops[i], ops[j]), psi[i] @ psi[j].T, rtol=1e-8, atol=1e-9)
            np.testing.assert_allclose(phi_block(kb, ops[i], ops[j]), phi_block(kb, ops[j], ops[i]).T,
                                       rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(phi_diag(kb, ops[0]), np.diag(phi_block(kb, ops[0], ops[0])), rtol=1e-9)


def test_phi_train_symmetric_psd_and_subsets():
    feats = make_pool(dim=8)  # low rank: Phi_train is singular, still PSD
    specs = make_tasks(5)
    kb, ops = build(feats, specs)
    phi = mnk_train_matrix(kb, ops)
    assert phi.shape == (5 * N_Q, 5 * N_Q)
    np.testing.assert_array_equal(phi, phi.T)
    lam = np.linalg.eigvalsh(phi)
    assert lam.min() > -1e-9 * lam.max()
    # a subset of tasks gives the sub-block
    sub = [0, 2, 3]
    pos = np.concatenate([np.arange(i * N_Q, (i + 1) * N_Q) for i in sub])
    np.testing.assert_allclose(mnk_train_matrix(kb, [ops[i] for i in sub]), phi[np.ix_(pos, pos)],
                               rtol=1e-12, atol=1e-12)
    # tiles that straddle task boundaries, and row subsets of phi_cross
    for rows, cols in [(slice(0, 20), slice(0, 20)), (slice(3, 11), slice(6, 19)), (slice(5, 6), slice(0, 1))]:
        np.testing.assert_allclose(phi_tile(kb, ops, rows, cols), phi[rows, cols], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(phi_cross(kb, ops[1], ops, rows=[3, 0]), phi[[N_Q + 3, N_Q], :],
                               rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------- prediction


@pytest.mark.parametrize("normalise", [False, True])
@pytest.mark.parametrize("eta", [INF, 0.3])
@pytest.mark.parametrize("t_outer", [INF, 0.05])
@pytest.mark.parametrize("cosine_k", [False, True])
def test_predict_matches_brute_force(normalise, eta, t_outer, cosine_k):
    feats = make_pool()
    if cosine_k:
        feats_used = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    else:
        feats_used = feats
    specs = make_tasks(6)
    train_specs, test_specs = specs[:4], specs[4:]
    k = feats @ feats.T
    kb = cosine_normalised(reader(k), np.diag(k)) if cosine_k else reader(k)
    mk = lambda sp: task_ops(kb, *sp, way=WAY, eta=eta, k_diag=None if cosine_k else np.diag(k))  # noqa: E731
    train = [mk(sp) for sp in train_specs]
    phi_train = mnk_train_matrix(kb, train)
    fit = mnk_fit(train, phi_train, t_outer=t_outer, normalise_phi=normalise)
    for sp in test_specs:
        test = mk(sp)
        want = brute_predict(feats_used, train_specs, sp, eta=eta, ridge=1e-5, t_outer=t_outer, normalise=normalise)
        got = predict(kb, train, test, fit)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7 * np.abs(want).max())


@pytest.mark.parametrize("normalise", [False, True])
def test_tiny_outer_time_reduces_to_support_regression(normalise):
    feats = make_pool()
    specs = make_tasks(2)
    kb, (train, test) = build(feats, specs)
    pred = predict(kb, [train], test, t_outer=1e-12, normalise_phi=normalise)
    np.testing.assert_allclose(pred, test.r_q, rtol=0, atol=1e-9 * np.abs(test.r_q).max())


def test_mnk_fits_training_queries():
    """Predicting a training task itself with t_outer = inf and tiny ridge interpolates its query labels."""
    feats = make_pool()
    specs = make_tasks(3)
    kb, ops = build(feats, specs)
    pred = predict(kb, ops, ops[1], ridge=1e-10, normalise_phi=False)
    np.testing.assert_allclose(pred, ops[1].y_q, atol=1e-5)
    assert accuracy(pred, specs[1][3]) == 1.0


# ---------------------------------------------------------------------------------------------- what is read


class Recorder:
    """Wraps a block reader and records every (rows, cols) it is asked for; keeps the wrapped reader's .diag."""

    def __init__(self, kb):
        self.kb, self.calls = kb, []
        if hasattr(kb, "diag"):
            self.diag = kb.diag

    def __call__(self, rows, cols):
        self.calls.append((np.array(rows), np.array(cols)))
        return self.kb(rows, cols)


def test_never_reads_test_x_test_across_tasks():
    feats = make_pool()
    k = feats @ feats.T
    specs = make_tasks(7)
    train_specs, test_specs = specs[:4], specs[4:]
    diag = np.diag(k)
    for kb_inner, kd in [(reader(k), diag), (cosine_normalised(reader(k), diag), None)]:
        rec = Recorder(kb_inner)
        train = [task_ops(rec, *sp, way=WAY, k_diag=kd) for sp in train_specs]
        tests = [task_ops(rec, *sp, way=WAY, k_diag=kd) for sp in test_specs]
        phi_train = mnk_train_matrix(rec, train)
        fit = mnk_fit(train, phi_train)
        for t in tests:
            predict(rec, train, t, fit)
            predict(rec, train, t, mnk_fit(train, phi_train, t_outer=0.5))
        owner = np.full(N_POOL, -1)  # -1 train / unused, else test task number
        q_of = np.full(N_POOL, False)
        for n, (s, _, q, _) in enumerate(test_specs):
            owner[s], owner[q] = n, n
            q_of[q] = True
        n_entries = 0
        for rows, cols in rec.calls:
            orow, ocol = owner[rows][:, None], owner[cols][None, :]
            both_test = (orow >= 0) & (ocol >= 0)
            assert not (both_test & (orow != ocol)).any(), "read a test x test entry across different test tasks"
            # within a test task only (query + support) x support: no query x query, not even its diagonal
            assert not (both_test & q_of[rows][:, None] & q_of[cols][None, :]).any()
            n_entries += rows.size * cols.size
        assert n_entries > 0
        # every call is a block, never element by element
        assert all(rows.size * cols.size > 1 for rows, cols in rec.calls)


def test_without_diag_reads_only_within_task_query_block():
    feats = make_pool()
    k = feats @ feats.T
    specs = make_tasks(3)
    rec = Recorder(reader(k))
    train = [task_ops(rec, *sp, way=WAY) for sp in specs[:2]]
    test = task_ops(rec, *specs[2], way=WAY)
    assert test.q_diag is None
    got = predict(rec, train, test)
    kb, ops = build(feats, specs)
    np.testing.assert_allclose(got, predict(kb, ops[:2], ops[2]), rtol=1e-12)
    q = set(specs[2][2].tolist())
    test_idx = q | set(specs[2][0].tolist())
    qq = [c for c in rec.calls if set(c[0].tolist()) <= test_idx and set(c[1].tolist()) <= test_idx
          and set(c[0].tolist()) & q and set(c[1].tolist()) & q]
    assert len(qq) == 1 and set(qq[0][0].tolist()) == q == set(qq[0][1].tolist())


# ---------------------------------------------------------------------------------------------- label embeddings


def brute_embedding_predict(feats, emb, train_specs, test_spec, *, ridge, normalise):
    """docs/math.md eq. (15) densely: training targets = class centroids of the embeddings in each task (support and
    query), test support targets = the support embeddings; F = r_t + psi_t psi_tr^T (Phi + lambda I)^-1 (Y - R)."""
    k = feats @ feats.T
    psi_tr, resid = [], []
    for s, sl, q, ql in train_specs:
        labels = np.concatenate([sl, ql])
        idx = np.concatenate([s, q])
        cent = {c: emb[idx[labels == c]].mean(0) for c in np.unique(labels)}
        t = np.linalg.inv(k[np.ix_(s, s)] + ridge * np.eye(len(s)))
        psi_tr.append(feats[q] - k[np.ix_(q, s)] @ t @ feats[s])
        y_s, y_q = np.stack([cent[c] for c in sl]), np.stack([cent[c] for c in ql])
        resid.append(y_q - k[np.ix_(q, s)] @ t @ y_s)
    psi_tr, resid = np.concatenate(psi_tr), np.concatenate(resid)
    s, sl, q, _ = test_spec
    t = np.linalg.inv(k[np.ix_(s, s)] + ridge * np.eye(len(s)))
    psi_t = feats[q] - k[np.ix_(q, s)] @ t @ feats[s]
    r_t = k[np.ix_(q, s)] @ t @ emb[s]
    if normalise:
        psi_tr = psi_tr / np.linalg.norm(psi_tr, axis=1, keepdims=True)
        psi_t = psi_t / np.linalg.norm(psi_t, axis=1, keepdims=True)
    phi = psi_tr @ psi_tr.T
    f = r_t + psi_t @ psi_tr.T @ np.linalg.solve(phi + ridge * np.eye(len(phi)), resid)
    d = ((f[:, None, :] - emb[s][None, :, :]) ** 2).sum(-1)  # nearest test-support embedding
    return f, sl[d.argmin(1)], r_t


@pytest.mark.parametrize("normalise", [False, True])
def test_embedding_mode_prediction_matches_brute_force(normalise):
    feats = make_pool()
    emb = np.random.default_rng(9).normal(size=(N_POOL, 5))
    specs = make_tasks(6)
    kb, ops = build(feats, specs)
    train = []
    for op, (s, sl, q, ql) in zip(ops[:4], specs[:4]):
        y = centroid_targets(emb[np.concatenate([s, q])], np.concatenate([sl, ql]))
        train.append(with_targets(op, y[:len(s)], y[len(s):]))
    fit = mnk_fit(train, mnk_train_matrix(kb, train), normalise_phi=normalise)
    for op, spec in zip(ops[4:], specs[4:]):
        s, sl, q, ql = spec
        test = with_targets(op, emb[s], emb[q])
        want_f, want_labels, want_r = brute_embedding_predict(feats, emb, specs[:4], spec, ridge=1e-5,
                                                              normalise=normalise)
        got_f = predict(kb, train, test, fit)
        np.testing.assert_allclose(test.r_q, want_r, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(got_f, want_f, rtol=1e-6, atol=1e-7 * np.abs(want_f).max())
        np.testing.assert_array_equal(nearest_support(got_f, test.y_s, sl), want_labels)


def test_centroid_targets_and_nearest_support():
    emb = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0], [4.0, 0.0]])
    np.testing.assert_allclose(centroid_targets(emb, np.array([1, 1, 0, 1])),
                               [[2, 0], [2, 0], [10, 10], [2, 0]])
    support = np.array([[0.0, 0.0], [10.0, 10.0]])
    np.testing.assert_array_equal(nearest_support(np.array([[1.0, 1.0], [9.0, 8.0]]), support, np.array([4, 7])),
                                  [4, 7])


# ---------------------------------------------------------------------------------------------- authors' conventions


def authors_transcription(k, train, test, lam, eta, t_outer):
    """The authors' MetaCNTK (meta_cntk.py: kernel_ridge, normalize_NTK, normalize_metaNTK) step by step in numpy.

    k: the pool's raw Gram; train / test: lists of (support idx, Y'_tau, query idx, Y_tau). Returns F of the test
    tasks' queries, stacked.
    """
    def ridge_reg(m, coef):
        return m + coef * np.eye(len(m))

    def normalize_kernel(m):
        s = 1.0 / np.sqrt(np.diag(m))
        return m * np.outer(s, s)

    def time_evolution(m, t):
        return np.eye(len(m)) if np.isinf(t) else np.eye(len(m)) - expm(-t * m)

    def kernel_ridge(k_fit, y, k_pred, alpha):  # sklearn KernelRidge(alpha, kernel="precomputed"): fit, predict
        return k_pred @ np.linalg.solve(k_fit + alpha * np.eye(len(k_fit)), y)

    ntk = normalize_kernel(ridge_reg(k, lam))  # cal_NTKs(ridge=True): ntk_all = ntk_all_ridge = n(K + lam I)
    tasks = train + test
    ts = [np.linalg.pinv(ntk[np.ix_(s, s)]) @ time_evolution(ntk[np.ix_(s, s)], eta) for s, *_ in tasks]  # cal_Ts
    rs = [kernel_ridge(ntk[np.ix_(s, s)], time_evolution(ntk[np.ix_(s, s)], eta) @ ys, ntk[np.ix_(q, s)], lam)
          for s, ys, q, _ in tasks]  # get_SVM_NTK, train and test tasks

    def single_meta_ntk(i, j):
        (s1, _, q1, _), (s2, _, q2, _) = tasks[i], tasks[j]
        t1, t2 = ts[i], ts[j]
        return (ntk[np.ix_(q1, q2)] - ntk[np.ix_(q1, s1)] @ t1 @ ntk[np.ix_(s1, q2)]
                - ntk[np.ix_(q1, s2)] @ t2.T @ ntk[np.ix_(s2, q2)]
                + ntk[np.ix_(q1, s1)] @ t1 @ ntk[np.ix_(s1, s2)] @ t2.T @ ntk[np.ix_(s2, q2)])

    meta_all = np.block([[single_meta_ntk(i, j) for j in range(len(tasks))] for i in range(len(tasks))])
    n_train = sum(len(q) for _, _, q, _ in train)
    meta_all = normalize_kernel(ridge_reg(meta_all, lam))  # cal_metaNTKs(ridge=True), normalize_metaNTK
    meta_train, meta_test = meta_all[:n_train, :n_train], meta_all[n_train:, :n_train]
    ys = np.concatenate([y for _, _, _, y in train])
    eff_ys = time_evolution(meta_train, t_outer) @ (ys - np.concatenate(rs[:len(train)]))
    return kernel_ridge(meta_train, eff_ys, meta_test, lam) + np.concatenate(rs[len(train):])  # term13 + term2


@pytest.mark.parametrize("eta,t_outer", [(INF, INF), (3.0, 5.0)])
@pytest.mark.parametrize("targets", ["onehot", "embedding"])
def test_authors_conventions_equal_a_transcription_of_their_code(eta, t_outer, targets):
    feats = make_pool(seed=4)
    k = feats @ feats.T
    specs = make_tasks(6, seed=5)
    lam = 1e-3
    emb = np.random.default_rng(6).normal(size=(N_POOL, 4))

    def targets_of(spec):
        s, sl, q, ql = spec
        if targets == "onehot":
            return centred_onehot(sl, WAY), centred_onehot(ql, WAY)
        return emb[s], emb[q]

    kb = ridged_cosine_normalised(reader(k), np.diag(k), lam)
    ops = [with_targets(task_ops(kb, *sp, way=WAY, eta=eta, ridge=lam, conventions="authors"), *targets_of(sp))
           for sp in specs]
    train, test = ops[:4], ops[4:]
    fit = mnk_fit(train, mnk_train_matrix(kb, train), ridge=lam, t_outer=t_outer, conventions="authors")
    got = np.concatenate([predict(kb, train, t, fit) for t in test])
    tasks = []
    for sp in specs:
        y_s, y_q = targets_of(sp)
        tasks.append((sp[0], y_s, sp[2], y_q))
    want = authors_transcription(k, tasks[:4], tasks[4:], lam, eta, t_outer)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10 * np.abs(want).max())
    # the conventions matter at this ridge: the formulas give another F
    kbn = cosine_normalised(reader(k), np.diag(k))
    ops_f = [with_targets(task_ops(kbn, *sp, way=WAY, eta=eta, ridge=lam), *targets_of(sp)) for sp in specs]
    fit_f = mnk_fit(ops_f[:4], mnk_train_matrix(kbn, ops_f[:4]), ridge=lam, t_outer=t_outer)
    other = np.concatenate([predict(kbn, ops_f[:4], t, fit_f) for t in ops_f[4:]])
    assert np.abs(other - want).max() > 1e4 * 1e-10 * np.abs(want).max()


def test_formulas_are_the_default_conventions():
    feats = make_pool()
    k = feats @ feats.T
    specs = make_tasks(5)
    kb = cosine_normalised(reader(k), np.diag(k))
    for conv in ({}, {"conventions": "formulas"}):
        ops = [task_ops(kb, *sp, way=WAY, **conv) for sp in specs]
        np.testing.assert_array_equal(ops[0].R, ops[0].T)
        got = predict(kb, ops[:4], ops[4], **conv)
        want = brute_predict(feats / np.linalg.norm(feats, axis=1, keepdims=True), specs[:4], specs[4], eta=INF,
                             ridge=1e-5, t_outer=INF, normalise=True)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7 * np.abs(want).max())
    with pytest.raises(ValueError, match="conventions must be one of formulas, authors"):
        task_ops(kb, *specs[0], way=WAY, conventions="paper")
    with pytest.raises(ValueError, match="normalise_phi"):
        mnk_fit(ops[:4], mnk_train_matrix(kb, ops[:4]), normalise_phi=False, conventions="authors")


def test_ridged_cosine_normalised_reader():
    feats = make_pool()
    k = feats @ feats.T
    kbr = ridged_cosine_normalised(reader(k), np.diag(k), 0.5)
    km = k + 0.5 * np.eye(N_POOL)
    want = km / np.sqrt(np.outer(np.diag(km), np.diag(km)))
    rows, cols = np.array([3, 7, 7, 0]), np.array([7, 1, 3])
    np.testing.assert_allclose(kbr(rows, cols), want[np.ix_(rows, cols)], rtol=1e-13)
    np.testing.assert_array_equal(kbr.diag, np.ones(N_POOL))
