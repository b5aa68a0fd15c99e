"""Independent float64 NumPy references for the Momentum-SAM tests.

Written in the *naive* form of the paper (keep the clean weights, perturb them for the
gradient, step from the clean weights), not in the stored-perturbed form of the code under
test, so the two implementations only agree if the stored form is right.
"""

from __future__ import annotations

import numpy as np

A = np.diag([1.0, 10.0])  # the quadratic test case L(w) = 1/2 w^T A w


def global_norm(arrays):
    return float(np.sqrt(sum(float(np.sum(np.square(a))) for a in arrays)))


def linear_mse_grads(params, x, y):
    """Gradients of keras' "mse" (mean over all elements) for y_hat = x @ W + b."""
    kernel, bias = params
    residual = x @ kernel + bias - y
    scale = 2.0 / residual.size
    return [scale * x.T @ residual, scale * residual.sum(axis=0)]


def linear_mse(params, x, y):
    kernel, bias = params
    return float(np.mean(np.square(x @ kernel + bias - y)))


def msam_reference(
    params,
    grad_fn,
    batches,
    lr,
    momentum,
    rho,
    weight_decay=None,
    clip_global=None,
    accumulation=1,
):
    """SGD-flavour MSAM; returns the clean weights after every update and the final state.

    ``rho`` and ``lr`` may be callables of the update step. With ``accumulation`` = k the
    gradients of k consecutive batches (all taken at the same perturbed point) are averaged.
    """
    w = [np.asarray(p, np.float64).copy() for p in params]
    v = [np.zeros_like(p) for p in w]
    s = 0.0
    history = []
    acc = None
    micro = 0
    step = 0
    for batch in batches:
        perturbed = [wi - s * vi for wi, vi in zip(w, v)]
        g = grad_fn(perturbed, *batch)
        acc = g if acc is None else [a + gi for a, gi in zip(acc, g)]
        micro += 1
        if micro < accumulation:
            continue
        g = [a / accumulation for a in acc]
        acc, micro = None, 0
        if clip_global is not None:
            n = global_norm(g)
            if n > clip_global:
                g = [gi * clip_global / n for gi in g]
        lr_t = lr(step) if callable(lr) else lr
        rho_t = rho(step) if callable(rho) else rho
        if weight_decay:
            w = [wi - lr_t * weight_decay * wi for wi in w]
        v = [momentum * vi + gi for vi, gi in zip(v, g)]
        w = [wi - lr_t * vi for wi, vi in zip(w, v)]
        n = global_norm(v)
        s = rho_t / n if n > 0 else 0.0
        step += 1
        history.append([wi.copy() for wi in w])
    return {"w": w, "v": v, "s": s, "history": history}


def adamw_msam_reference(
    params, grad_fn, batches, lr, rho, beta_1=0.9, beta_2=0.999, eps=1e-7, wd=0.0,
    keras_eps=True,
):
    """AdamW-flavour MSAM (decay after the Adam step, as in the authors' code).

    ``keras_eps``: Keras' epsilon convention (m*alpha/(sqrt(v)+eps)); otherwise PyTorch's
    (bias-corrected sqrt(v) + eps).
    """
    w = [np.asarray(p, np.float64).copy() for p in params]
    m = [np.zeros_like(p) for p in w]
    v = [np.zeros_like(p) for p in w]
    nf = 0.0
    history = []
    for t, batch in enumerate(batches, start=1):
        g = grad_fn([wi - nf * mi for wi, mi in zip(w, m)], *batch)
        m = [beta_1 * mi + (1 - beta_1) * gi for mi, gi in zip(m, g)]
        v = [beta_2 * vi + (1 - beta_2) * gi**2 for vi, gi in zip(v, g)]
        bc1, bc2 = 1 - beta_1**t, 1 - beta_2**t
        if keras_eps:
            w = [
                wi - lr * np.sqrt(bc2) / bc1 * mi / (np.sqrt(vi) + eps)
                for wi, mi, vi in zip(w, m, v)
            ]
        else:
            w = [
                wi - lr / bc1 * mi / (np.sqrt(vi) / np.sqrt(bc2) + eps)
                for wi, mi, vi in zip(w, m, v)
            ]
        w = [wi * (1 - lr * wd) for wi in w]
        n = global_norm(m)
        rho_t = rho(t - 1) if callable(rho) else rho
        nf = rho_t / n if n > 0 else 0.0
        history.append([wi.copy() for wi in w])
    return {"w": w, "m": m, "s": nf, "history": history}
