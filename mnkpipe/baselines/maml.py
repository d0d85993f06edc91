"""MAML (Finn et al. 2017), second order by default, written with torch.func.functional_call.

BatchNorm: whatever mode `model` is in is used. In train mode (what meta-training uses) every forward
normalises with its own batch statistics and updates the running statistics in `buffers` in place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call


def task_loss(model, params, buffers, x, y) -> torch.Tensor:
    """L(w; x, y) = mean cross-entropy of f_w(x) against y."""
    return F.cross_entropy(functional_call(model, (params, buffers), (x,)), y)


def maml_inner(model, params, buffers, xs, ys, *, steps, lr, create_graph) -> dict:
    """w_0 = params, w_{k+1} = w_k - lr * grad L_support(w_k); returns w_steps (differentiable wrt params if
    create_graph)."""
    w = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()}
    with torch.enable_grad():
        for _ in range(steps):
            grads = torch.autograd.grad(task_loss(model, w, buffers, xs, ys), list(w.values()),
                                        create_graph=create_graph)
            w = {k: v - lr * g for (k, v), g in zip(w.items(), grads)}
    return w


def maml_meta_loss(model, params, buffers, tasks, *, steps, lr, first_order=False) -> torch.Tensor:
    """(1/B) sum_tasks L_query(w_steps(params)); its gradient wrt params is the MAML meta-gradient.

    tasks: iterable of (xs, ys, xq, yq). first_order drops the second-order terms (FOMAML: dw/dparams := I).
    """
    losses = [task_loss(model, maml_inner(model, params, buffers, xs, ys, steps=steps, lr=lr,
                                          create_graph=not first_order), buffers, xq, yq)
              for xs, ys, xq, yq in tasks]
    return torch.stack(losses).mean()
