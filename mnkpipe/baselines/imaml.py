"""iMAML (Rajeswaran et al. 2019): proximal inner problem and implicit hypergradient by conjugate gradient."""
from __future__ import annotations

import torch

from .maml import task_loss


def _dot(a, b) -> torch.Tensor:
    """<a, b> = sum_i a_i . b_i over a list of tensors."""
    return sum((x * y).sum() for x, y in zip(a, b))


def imaml_inner(model, theta, buffers, xs, ys, *, lam, steps, lr) -> dict:
    """w_0 = theta, w_{k+1} = w_k - lr * (grad L_support(w_k) + lam (w_k - theta)).

    w_steps ~ argmin_w L_s(w) + lam/2 ||w - theta||^2."""
    theta = {k: v.detach() for k, v in theta.items()}
    w = {k: v.clone().requires_grad_() for k, v in theta.items()}
    with torch.enable_grad():
        for _ in range(steps):
            grads = torch.autograd.grad(task_loss(model, w, buffers, xs, ys), list(w.values()))
            w = {k: (v.detach() - lr * (g + lam * (v.detach() - theta[k]))).requires_grad_()
                 for (k, v), g in zip(w.items(), grads)}
    return {k: v.detach() for k, v in w.items()}


def imaml_hypergrad(model, w, buffers, xs, ys, xq, yq, *, lam, cg_steps) -> dict:
    """v = (I + H/lam)^-1 g by `cg_steps` of CG, g = dL_query/dw, H = d2L_support/dw2 at w (Hessian-vector products)."""
    keys = list(w)
    ws = [w[k].detach().requires_grad_() for k in keys]
    wd = dict(zip(keys, ws))
    with torch.enable_grad():
        g = list(torch.autograd.grad(task_loss(model, wd, buffers, xq, yq), ws))
        gs = torch.autograd.grad(task_loss(model, wd, buffers, xs, ys), ws, create_graph=True)

        def A(p):  # (I + H/lam) p
            hp = torch.autograd.grad(gs, ws, grad_outputs=p, retain_graph=True)
            return [pi + hi / lam for pi, hi in zip(p, hp)]

        x = [torch.zeros_like(gi) for gi in g]
        r = [gi.clone() for gi in g]
        p = [gi.clone() for gi in g]
        rs = _dot(r, r)
        tol = (torch.finfo(rs.dtype).eps * rs.sqrt()) ** 2  # stop early only once the residual is at round-off
        for _ in range(cg_steps):
            if rs <= tol:
                break
            ap = A(p)
            alpha = rs / _dot(p, ap)
            x = [xi + alpha * pi for xi, pi in zip(x, p)]
            r = [ri - alpha * api for ri, api in zip(r, ap)]
            rs_new = _dot(r, r)
            p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p)]
            rs = rs_new
    return {k: xi.detach() for k, xi in zip(keys, x)}
