"""Meta-training, validation-based model selection and test evaluation for the MAML / iMAML baselines."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from . import checkpoint
from .convnet import make_convnet
from .imaml import imaml_hypergrad, imaml_inner
from .maml import maml_inner, maml_meta_loss, task_loss

BASELINE_METHODS = ("maml", "imaml")
BN_MODES = {
    "batch": "BatchNorm runs in train mode at test time: adaptation steps normalise with the statistics of the "
             "task's support batch and query predictions with the statistics of the task's whole query batch "
             "(transductive, as in MAML's reference code); running statistics are not used.",
    "running": "BatchNorm runs in eval mode at test time: adaptation and query predictions use the running "
               "statistics accumulated during meta-training (non-transductive; each query image is classified "
               "independently of the others).",
}
BASELINE_CHECKPOINT = "checkpoint.pt"


@dataclass
class BaselineSettings:
    blocks: int = 4
    filters: int = 64
    inner_lr: float = 0.1       # MAML inner SGD step
    inner_steps: int = 5        # MAML inner steps
    imaml_lam: float = 2.0      # iMAML proximal strength lambda
    imaml_steps: int = 16       # iMAML inner gradient steps
    imaml_lr: float = 0.1       # iMAML inner step size
    cg_steps: int = 5           # iMAML conjugate-gradient iterations
    outer_lr: float = 1e-3      # Adam
    meta_batch: int = 20
    meta_steps: int = 200       # CPU-sized default; the reference used many more
    eval_every: int = 25
    first_order: bool = False
    bn_mode: str = "batch"      # "batch" or "running", see BN_MODES

    def validate(self, where: str = "[baselines]") -> None:
        """Raise ValueError naming the first setting out of its range."""
        checks = [("blocks", self.blocks >= 1, ">= 1"), ("filters", self.filters >= 1, ">= 1"),
                  ("inner_lr", self.inner_lr > 0, "> 0"), ("inner_steps", self.inner_steps >= 1, ">= 1"),
                  ("imaml_lam", self.imaml_lam > 0, "> 0"), ("imaml_steps", self.imaml_steps >= 1, ">= 1"),
                  ("imaml_lr", self.imaml_lr > 0, "> 0"), ("cg_steps", self.cg_steps >= 1, ">= 1"),
                  ("outer_lr", self.outer_lr > 0, "> 0"), ("meta_batch", self.meta_batch >= 1, ">= 1"),
                  ("meta_steps", self.meta_steps >= 1, ">= 1"), ("eval_every", self.eval_every >= 1, ">= 1"),
                  ("bn_mode", self.bn_mode in BN_MODES, "one of " + ", ".join(BN_MODES))]
        for key, ok, rule in checks:
            if not ok:
                raise ValueError(f"{where} {key} = {getattr(self, key)!r}: must be {rule}")


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a usable GPU, else 'cpu'; 'cuda' without one is an error."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {device!r}: choose auto, cpu or cuda")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no usable CUDA device (use --device cpu or auto)")
    return device


def _task(X, tasks, t, device):
    """(xs, ys, xq, yq) tensors of task t."""
    def lab(a):
        return torch.as_tensor(np.asarray(a[t]), dtype=torch.long, device=device)

    return X[lab(tasks.support)], lab(tasks.support_labels), X[lab(tasks.query)], lab(tasks.query_labels)


def _adapt(method, model, params, buffers, xs, ys, s: BaselineSettings) -> dict:
    """Task-adapted weights: MAML inner SGD from params, or iMAML proximal inner solve around params."""
    if method == "maml":
        w = maml_inner(model, params, buffers, xs, ys, steps=s.inner_steps, lr=s.inner_lr, create_graph=False)
        return {k: v.detach() for k, v in w.items()}
    return imaml_inner(model, params, buffers, xs, ys, lam=s.imaml_lam, steps=s.imaml_steps, lr=s.imaml_lr)


def task_accuracies(method, model, params, buffers, X, tasks, s: BaselineSettings, device="cpu") -> np.ndarray:
    """acc_t = mean_q [argmax f_{w_t}(x_q) == y_q], w_t adapted on task t's support; one entry per task."""
    buffers = {k: v.clone() for k, v in buffers.items()}  # train-mode BN would update the caller's running stats
    model.train(s.bn_mode == "batch")
    accs = []
    try:
        for t in range(len(tasks.support)):
            xs, ys, xq, yq = _task(X, tasks, t, device)
            w = _adapt(method, model, params, buffers, xs, ys, s)
            with torch.no_grad():
                pred = functional_call(model, (w, buffers), (xq,)).argmax(1)
            accs.append((pred == yq).double().mean().item())
    finally:
        model.train()
    return np.asarray(accs)


def _meta_step(method, model, params, buffers, batch, s: BaselineSettings) -> float | None:
    """Accumulate the batch's mean meta-gradient into params[k].grad; returns the mean query loss (MAML) or None."""
    n = len(batch)
    if method == "maml":
        total = 0.0
        for task in batch:  # one backward per task keeps one task's graph in memory at a time
            loss = maml_meta_loss(model, params, buffers, [task], steps=s.inner_steps, lr=s.inner_lr,
                                  first_order=s.first_order) / n
            loss.backward()
            total += loss.item()
        return total
    for xs, ys, xq, yq in batch:
        w = imaml_inner(model, params, buffers, xs, ys, lam=s.imaml_lam, steps=s.imaml_steps, lr=s.imaml_lr)
        if s.first_order:  # first-order iMAML: v = g = dL_query/dw, i.e. (I + H/lam)^-1 replaced by I
            wl = {k: v.requires_grad_() for k, v in w.items()}
            v = dict(zip(wl, torch.autograd.grad(task_loss(model, wl, buffers, xq, yq), list(wl.values()))))
        else:
            v = imaml_hypergrad(model, w, buffers, xs, ys, xq, yq, lam=s.imaml_lam, cg_steps=s.cg_steps)
        for k, p in params.items():
            p.grad = v[k] / n if p.grad is None else p.grad + v[k] / n
    return None


def shorter_run(ckpt: Path, st: dict, steps: int) -> tuple[list, list]:
    """The validation and test curves of the first `steps` meta-steps of the longer run in checkpoint st, whose
    selection (argmax of the validation curve) is then the checkpoint's best: ValueError naming the checkpoint when the
    run was not validated at step `steps`, or when its best step lies beyond (earlier parameters are not kept)."""
    curve = [(k, a) for k, a in st["curve"] if k <= steps]
    test_curve = [(k, a) for k, a in st["test_curve"] if k <= steps]
    why = None
    if steps not in {k for k, _ in st["curve"]}:
        why = f"it was not validated at step {steps} (validated at {', '.join(str(k) for k, _ in st['curve'])})"
    elif st["best_step"] > steps:
        why = (f"its best validation step is {st['best_step']}, after step {steps}, and the parameters of earlier "
               "steps are not kept")
    if why:
        raise ValueError(f"checkpoint {ckpt} holds a run of {st['step']} meta-steps, more than the {steps} asked for, "
                         f"and cannot give a {steps}-step run's selection: {why}; ask for {st['step']} meta-steps or "
                         "more, or use another --out")
    return curve, test_curve


def chosen_on_test(test_curve) -> tuple[int, np.ndarray]:
    """(k*, acc(k*)) with k* = argmax over the evaluated steps k of the mean test accuracy (first on ties): the
    notebook's selection, on the test tasks themselves, so biased upwards."""
    if not test_curve:
        raise ValueError("no evaluated step: the run holds no test curve to select from")
    means = [float(np.mean(a)) for _, a in test_curve]
    k, acc = test_curve[int(np.argmax(means))]
    return int(k), np.asarray(acc)


def run_baseline(method: str, images: np.ndarray, train, val, test, *, way: int, settings: BaselineSettings,
                 seed: int = 0, checkpoint_dir: str | os.PathLike | None = None, progress: bool = True,
                 device="cpu", run_key: dict | None = None) -> dict:
    """Meta-train theta with Adam on the train tasks, select theta* = argmax val accuracy; test accuracy of theta*.

    Every evaluated step is also scored on the test tasks (per task, in "test_curve" and the checkpoint); that curve
    never takes part in the selection (the notebook's test-set selection, biased, is computed from it elsewhere).
    A checkpoint saved before the test curve was kept has no test scores for its earlier steps and their weights are
    gone, so it is retrained from step 0 (same seed: the same run) and replaced.

    run_key: what ties a checkpoint to its data (e.g. the store's fingerprint and the training tasks); a checkpoint
    in checkpoint_dir is resumed only if it was written with the same method, seed, way, settings and run_key.
    """
    if method not in BASELINE_METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(BASELINE_METHODS)}")
    s = settings
    if s.bn_mode not in BN_MODES:
        raise ValueError(f"unknown bn_mode {s.bn_mode!r}; allowed: {', '.join(BN_MODES)}")
    t0 = time.perf_counter()
    n_img, channels, height, width = images.shape
    if height != width:
        raise ValueError(f"images must be square, got {height}x{width}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    X = torch.as_tensor(images, device=device)
    model = make_convnet(channels, way, s.blocks, s.filters, height).to(device=device, dtype=X.dtype)
    model.train()
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    opt = torch.optim.Adam(params.values(), lr=s.outer_lr)
    n_train = len(train.support)
    batch_size = min(s.meta_batch, n_train)
    step, curve, test_curve, best_acc, best_step = 0, [], [], -1.0, 0
    best_params = {k: v.detach().clone() for k, v in params.items()}
    best_buffers = {k: v.clone() for k, v in buffers.items()}

    ident = {"method": method, "seed": seed, "way": way,
             "settings": {k: v for k, v in asdict(s).items() if k != "meta_steps"}, "run_key": run_key or {}}
    ckpt = Path(checkpoint_dir) / BASELINE_CHECKPOINT if checkpoint_dir is not None else None
    st = torch.load(ckpt, map_location=device, weights_only=True) if ckpt is not None and ckpt.exists() else None
    if st is not None and st["ident"] != ident:
        raise ValueError(f"checkpoint {ckpt} was written by a different run: {st['ident']} != {ident}")
    if st is not None and "test_curve" not in st:
        print(f"checkpoint {ckpt} has no test-task scores per evaluated step: retraining it from step 0",
              file=sys.stderr, flush=True)
        st = None
    if st is not None:
        with torch.no_grad():
            for k in params:
                params[k].copy_(st["params"][k])
            for k in buffers:
                buffers[k].copy_(st["buffers"][k])
        opt.load_state_dict(st["opt"])
        step, curve, test_curve = st["step"], list(st["curve"]), list(st["test_curve"])
        best_acc, best_step = st["best_acc"], st["best_step"]
        best_params, best_buffers = st["best_params"], st["best_buffers"]
        if step > s.meta_steps:  # a longer run: its selection among the steps asked for, when it holds it
            curve, test_curve = shorter_run(ckpt, st, s.meta_steps)
        rng.bit_generator.state = st["np_rng"]
        torch.set_rng_state(st["torch_rng"].cpu())

    bar = tqdm(range(step, s.meta_steps), initial=min(step, s.meta_steps), total=s.meta_steps, disable=not progress,
               desc=f"{method} meta-train")
    for step in bar:
        idx = rng.choice(n_train, size=batch_size, replace=False)
        opt.zero_grad(set_to_none=True)
        loss = _meta_step(method, model, params, buffers, [_task(X, train, t, device) for t in idx], s)
        opt.step()
        done = step + 1
        if done % s.eval_every == 0 or done == s.meta_steps:
            acc = float(task_accuracies(method, model, params, buffers, X, val, s, device).mean())
            curve.append((done, acc))
            test_curve.append((done, task_accuracies(method, model, params, buffers, X, test, s, device).tolist()))
            if acc > best_acc:
                best_acc, best_step = acc, done
                best_params = {k: v.detach().clone() for k, v in params.items()}
                best_buffers = {k: v.clone() for k, v in buffers.items()}
            bar.set_postfix(val_acc=f"{acc:.3f}", best=f"{best_acc:.3f}@{best_step}",
                            **({} if loss is None else {"query_loss": f"{loss:.3f}"}))
            if ckpt is not None:
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                checkpoint.save_checkpoint(ckpt, {
                    "ident": ident, "step": done, "params": {k: v.detach() for k, v in params.items()},
                    "buffers": buffers, "opt": opt.state_dict(), "curve": curve, "test_curve": test_curve,
                    "best_acc": best_acc, "best_step": best_step, "best_params": best_params,
                    "best_buffers": best_buffers,
                    "np_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()})
    bar.close()

    test_acc = task_accuracies(method, model, best_params, best_buffers, X, test, s, device)
    return {"method": method, "test_acc": test_acc, "val_curve": curve, "best_step": best_step,
            "test_curve": [(k, np.asarray(a)) for k, a in test_curve],
            "best_val_acc": best_acc, "bn_mode": BN_MODES[s.bn_mode], "seconds": time.perf_counter() - t0,
            "settings": asdict(s), "best_params": best_params, "device": str(device)}
