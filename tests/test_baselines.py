"""MAML / iMAML baselines: exact meta-gradients on tiny float64 nets, and the training loop contract."""
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import crash_after_saving
from support.numerics import rel_norm

from mnkpipe.baselines import (BaselineSettings, imaml_hypergrad, imaml_inner, make_convnet, maml_inner,
                               maml_meta_loss, run_baseline)
from mnkpipe.baselines.maml import task_loss


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def tiny_net(seed=0):
    torch.manual_seed(seed)
    model = make_convnet(in_channels=1, way=2, blocks=1, filters=2, image_size=8).double().train()
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    return model, params, buffers


def tiny_task(gen, n_s=4, n_q=6):
    xs = torch.randn(n_s, 1, 8, 8, generator=gen, dtype=torch.float64)
    xq = torch.randn(n_q, 1, 8, 8, generator=gen, dtype=torch.float64)
    return xs, torch.arange(n_s) % 2, xq, torch.arange(n_q) % 2


def shift(params, d, eps):
    return {k: (v.detach() + eps * d[k]) for k, v in params.items()}


def test_convnet_shapes():
    net = make_convnet(in_channels=3, way=5, blocks=4, filters=8, image_size=32)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    # the net fits any image size: pooling stops once the side is 1 (the README's 4 blocks on 12x12 smoke images)
    for size, blocks, side in [(12, 4, 1), (28, 4, 1), (32, 6, 1), (1, 2, 1), (16, 2, 4)]:
        net = make_convnet(in_channels=1, way=5, blocks=blocks, filters=8, image_size=size)
        assert net[-1].in_features == 8 * side * side
        assert net(torch.zeros(2, 1, size, size)).shape == (2, 5)


def test_maml_meta_gradient_matches_finite_differences():
    model, params, buffers = tiny_net()
    gen = torch.Generator().manual_seed(1)
    tasks = [tiny_task(gen) for _ in range(2)]
    kw = dict(steps=3, lr=0.5)
    grads = dict(zip(params, torch.autograd.grad(maml_meta_loss(model, params, buffers, tasks, **kw),
                                                 list(params.values()))))
    an, fd, h = [], [], 1e-5
    for _ in range(4):
        d = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
        an.append(sum((grads[k] * d[k]).sum() for k in params))
        fp = maml_meta_loss(model, shift(params, d, h), buffers, tasks, **kw).detach()
        fm = maml_meta_loss(model, shift(params, d, -h), buffers, tasks, **kw).detach()
        fd.append((fp - fm) / (2 * h))
    assert rel_norm(torch.stack(fd), torch.stack(an)) < 1e-4
    # first order drops the second-order terms: a different gradient
    fo = torch.autograd.grad(maml_meta_loss(model, params, buffers, tasks, first_order=True, **kw),
                             list(params.values()))
    so = torch.cat([g.flatten() for g in grads.values()])
    assert rel_norm(torch.cat([g.flatten() for g in fo]), so) > 1e-3
    # maml_inner with steps=0 is the identity, one step is one SGD step
    xs, ys = tasks[0][:2]
    w1 = maml_inner(model, params, buffers, xs, ys, steps=1, lr=0.5, create_graph=False)
    g = torch.autograd.grad(task_loss(model, params, buffers, xs, ys), list(params.values()))
    for (k, v), gi in zip(params.items(), g):
        torch.testing.assert_close(w1[k], v - 0.5 * gi)


def flat_tools(w):
    keys, shapes, sizes = list(w), [v.shape for v in w.values()], [v.numel() for v in w.values()]
    def flat(d):
        return torch.cat([d[k].detach().flatten() for k in keys])

    def unflat(f):
        return {k: c.view(s) for k, c, s in zip(keys, torch.split(f, sizes), shapes)}

    return flat, unflat


@pytest.mark.parametrize("smooth", [False, True])
def test_imaml_hypergradient_matches_exact_solve(smooth):
    """v from CG == (I + H/lam)^-1 g with the full Hessian; on a smooth net (Softplus, avg-pool), where the inner
    problem can be solved to round-off, v is also the true gradient of L_q(w*(theta)) (implicit-function theorem).
    With max-pool the inner objective has kinks and fixed-step gradient descent does not settle."""
    model, theta, buffers = tiny_net(seed=2)
    if smooth:
        model[2], model[3] = torch.nn.Softplus(beta=2), torch.nn.AvgPool2d(2)
    gen = torch.Generator().manual_seed(3)
    xs, ys, xq, yq = tiny_task(gen)
    lam = 2.0

    def inner(th):
        return imaml_inner(model, th, buffers, xs, ys, lam=lam, steps=400 if smooth else 16, lr=0.1)

    w = inner(theta)
    flat, unflat = flat_tools(w)
    flat_w = flat(w)

    def grad_at(x, y):
        wr = flat_w.clone().requires_grad_()
        return torch.autograd.grad(task_loss(model, unflat(wr), buffers, x, y), wr)[0]

    if smooth:  # the inner solve converged: grad L_s(w) + lam (w - theta) = 0
        assert float(torch.linalg.norm(grad_at(xs, ys) + lam * (flat_w - flat(theta)))) < 1e-10

    H = torch.autograd.functional.hessian(lambda f: task_loss(model, unflat(f), buffers, xs, ys), flat_w)
    A = torch.eye(len(flat_w), dtype=H.dtype) + H / lam
    assert torch.linalg.eigvalsh(A).min() > 0
    g = grad_at(xq, yq)
    v_exact = torch.linalg.solve(A, g)

    def hyper(n):
        return flat(imaml_hypergrad(model, w, buffers, xs, ys, xq, yq, lam=lam, cg_steps=n))

    assert rel_norm(hyper(3 * len(flat_w)), v_exact) < 1e-6
    # truncated CG: the A-norm error falls at every iteration; 5 iterations (the protocol's) already get close
    a_err = [float((hyper(n) - v_exact) @ A @ (hyper(n) - v_exact)) for n in range(6)]
    assert all(b < a for a, b in zip(a_err, a_err[1:])), a_err
    assert rel_norm(hyper(0), v_exact) == 1.0 and rel_norm(hyper(5), v_exact) < 0.15, rel_norm(hyper(5), v_exact)

    if smooth:  # d/dtheta L_q(w*(theta)) = v, by central differences along random directions
        h, an, fd = 1e-5, [], []
        for _ in range(3):
            d = unflat(torch.randn(len(flat_w), generator=gen, dtype=torch.float64))
            an.append(v_exact @ flat(d))
            fp = task_loss(model, inner(shift(theta, d, h)), buffers, xq, yq).detach()
            fm = task_loss(model, inner(shift(theta, d, -h)), buffers, xq, yq).detach()
            fd.append((fp - fm) / (2 * h))
        assert rel_norm(torch.stack(fd), torch.stack(an)) < 1e-4


# ---------------------------------------------------------------- run_baseline on a tiny easy problem

def make_problem(seed=0, n_img=160, size=8):
    """4 classes = a bright top / bottom / left / right half under unit noise. Tasks: 2 of the 4 classes in a random
    label order (so the support set must be used), 1 shot, 3 queries per class; 10 train, 20 val, 20 test tasks."""
    rng = np.random.default_rng(seed)
    cls = np.arange(n_img) % 4
    half = size // 2
    pattern = np.zeros((4, size, size))
    pattern[0, :half], pattern[1, half:], pattern[2, :, :half], pattern[3, :, half:] = 1, 1, 1, 1
    images = rng.normal(size=(n_img, 1, size, size)) + pattern[cls][:, None]
    by_class = [np.flatnonzero(cls == c) for c in range(4)]

    def tasks(n):
        sup, qry = [], []
        for _ in range(n):
            pick = [rng.choice(by_class[c], size=4, replace=False) for c in rng.choice(4, size=2, replace=False)]
            sup.append([p[0] for p in pick])
            qry.append([i for p in pick for i in p[1:]])
        return SimpleNamespace(support=np.array(sup), support_labels=np.tile([0, 1], (n, 1)),
                               query=np.array(qry), query_labels=np.tile([0, 0, 0, 1, 1, 1], (n, 1)))

    return images.astype(np.float32), tasks(10), tasks(20), tasks(20)


TINY = BaselineSettings(blocks=1, filters=4, inner_steps=2, imaml_steps=4, cg_steps=3, outer_lr=1e-2,
                        meta_batch=4, meta_steps=20, eval_every=5)


@pytest.fixture(scope="module")
def problem():
    return make_problem()


@pytest.fixture(scope="module")
def maml_run(problem):
    return run_baseline("maml", *problem, way=2, settings=TINY, seed=0, progress=False)


def assert_same_run(a, b, test=True):
    assert a["val_curve"] == b["val_curve"] and a["best_step"] == b["best_step"]
    for k in a["best_params"]:
        assert torch.equal(a["best_params"][k], b["best_params"][k]), k
    if test:
        np.testing.assert_array_equal(a["test_acc"], b["test_acc"])


def test_run_baseline_maml_learns_and_is_deterministic(problem, maml_run):
    r = maml_run
    assert r["method"] == "maml" and r["test_acc"].shape == (20,)
    assert r["test_acc"].mean() > 0.7  # chance is 0.5; the initial net (no meta-training) gets about 0.54
    assert [s for s, _ in r["val_curve"]] == [5, 10, 15, 20]
    assert len({a for _, a in r["val_curve"]}) > 1  # a curve with something to select from
    assert r["best_val_acc"] == max(a for _, a in r["val_curve"])
    assert r["best_step"] == next(s for s, a in r["val_curve"] if a == r["best_val_acc"])
    assert "BatchNorm" in r["bn_mode"] and r["settings"]["meta_steps"] == 20
    assert_same_run(r, run_baseline("maml", *problem, way=2, settings=TINY, seed=0, progress=False))


def test_selection_never_looks_at_test(problem, maml_run):
    images, tr, va, te = problem
    rng = np.random.default_rng(9)
    garbage = SimpleNamespace(support=te.support, support_labels=te.support_labels, query=te.query,
                              query_labels=rng.permuted(te.query_labels, axis=1))
    r = run_baseline("maml", images, tr, va, garbage, way=2, settings=TINY, seed=0, progress=False)
    assert_same_run(r, maml_run, test=False)
    assert not np.array_equal(r["test_acc"], maml_run["test_acc"])  # the garbage did reach the test scoring


def test_resume_equals_uninterrupted(problem, maml_run, tmp_path, monkeypatch):
    saves = crash_after_saving(monkeypatch, "step", 10)
    with pytest.raises(KeyboardInterrupt):
        run_baseline("maml", *problem, way=2, settings=TINY, seed=0, checkpoint_dir=tmp_path, progress=False)
    assert saves == [5, 10] and not list(tmp_path.glob("*.tmp*"))
    r = run_baseline("maml", *problem, way=2, settings=TINY, seed=0, checkpoint_dir=tmp_path, progress=False)
    assert saves == [5, 10, 15, 20]
    assert_same_run(r, maml_run)
    # a finished checkpoint gives the same result again; a different run refuses it
    assert_same_run(run_baseline("maml", *problem, way=2, settings=TINY, seed=0, checkpoint_dir=tmp_path,
                                 progress=False), maml_run)
    with pytest.raises(ValueError, match="different run"):
        run_baseline("maml", *problem, way=2, settings=TINY, seed=1, checkpoint_dir=tmp_path, progress=False)


@pytest.mark.parametrize("bn_mode", ["batch", "running"])
def test_run_baseline_imaml(problem, bn_mode):
    r = run_baseline("imaml", *problem, way=2, settings=replace(TINY, bn_mode=bn_mode), seed=0, progress=False)
    assert r["method"] == "imaml" and r["test_acc"].shape == (20,)
    assert r["test_acc"].mean() > 0.65
    assert ("running statistics accumulated" in r["bn_mode"]) == (bn_mode == "running")


def test_run_baseline_rejects_unknown_method(problem):
    with pytest.raises(ValueError, match="maml, imaml"):
        run_baseline("reptile", *problem, way=2, settings=TINY, progress=False)
    with pytest.raises(ValueError, match="bn_mode"):
        run_baseline("maml", *problem, way=2, settings=replace(TINY, bn_mode="eval"), progress=False)
