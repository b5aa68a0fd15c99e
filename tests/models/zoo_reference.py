"""Numpy references of the variant zoo, from the update rules and the authors' code.

Nothing here calls keras_sam or Keras. Every function runs plain SGD (learning rate
``lr``, or ``lr(t)``) on the two-layer tanh MLP of `tests.numpy_reference`, full
batch, for ``steps`` steps, and returns the final parameters.
"""

from __future__ import annotations

import itertools

import numpy as np

from tests import numpy_reference as ref


def _dot(a, b):
    return float(sum((x * y).sum() for x, y in zip(a, b)))


def _norm(a):
    return ref.global_norm(a)


def _grads(params, x, y, sample_weight=None):
    return ref.loss_and_grads(params, x, y, sample_weight)[1]


def _at(params, eps):
    return [p + e for p, e in zip(params, eps)]


def _sgd(params, grads, lr):
    return [p - lr * g for p, g in zip(params, grads)]


def gsam(params, x, y, lr, rho, alpha, steps, rho_of_lr=None):
    """g_s − α g⊥ (juntang-zhuang/GSAM); ``rho_of_lr(lr_t)`` overrides ``rho``."""
    for t in range(steps):
        lr_t = lr(t) if callable(lr) else lr
        rho_t = rho if rho_of_lr is None else rho_of_lr(lr_t)
        g = _grads(params, x, y)
        gs = _grads(_at(params, ref.sam_epsilon(g, rho_t)), x, y)
        cos = _dot(g, gs) / (_norm(gs) * _norm(g) + 1e-12)
        g_perp = [a - cos * _norm(g) * b / (_norm(gs) + 1e-12) for a, b in zip(g, gs)]
        params = _sgd(params, [b - alpha * c for b, c in zip(gs, g_perp)], lr_t)
    return params


def looksam(params, x, y, lr, rho, alpha, k, steps):
    """A SAM step at t ≡ 0 (mod k) storing ĝ_v; g + α‖g‖ĝ_v otherwise (global norms)."""
    direction = None
    for t in range(steps):
        g = _grads(params, x, y)
        if t % k == 0:
            gs = _grads(_at(params, ref.sam_epsilon(g, rho)), x, y)
            coefficient = _dot(gs, g) / (_norm(g) ** 2 + 1e-12)
            gv = [a - coefficient * b for a, b in zip(gs, g)]
            direction = [v / _norm(gv) for v in gv]
            step = gs
        else:
            step = [a + alpha * _norm(g) * d for a, d in zip(g, direction)]
        params = _sgd(params, step, lr)
    return params


def friendly_sam(params, x, y, lr, rho, sigma, lmbda, steps):
    """d = g − σm, then m = λm + (1 − λ)g; m = d = g at the first step (nblt/F-SAM)."""
    m = None
    for _ in range(steps):
        g = _grads(params, x, y)
        if m is None:
            m, d = g, g
        else:
            d = [a - sigma * b for a, b in zip(g, m)]
            m = [lmbda * b + (1 - lmbda) * a for a, b in zip(g, m)]
        gs = _grads(_at(params, ref.sam_epsilon(d, rho)), x, y)
        params = _sgd(params, gs, lr)
    return params


def wsam(params, x, y, lr, rho, gamma, steps):
    """SGD with g, then w −= lr_t·γ/(1 − γ)·(g_s − g) (WeightedSAM, decoupled)."""
    for t in range(steps):
        lr_t = lr(t) if callable(lr) else lr
        g = _grads(params, x, y)
        gs = _grads(_at(params, ref.sam_epsilon(g, rho)), x, y)
        params = _sgd(params, g, lr_t)
        params = [p - lr_t * gamma / (1 - gamma) * (b - a) for p, a, b in zip(params, g, gs)]
    return params


def esam(params, x, y, lr, rho, gamma, steps):
    """ESAM with β = 1 (no random draw): SDS keeps the samples whose loss increase is
    strictly above the ⌊γ|B|⌋-th largest; the mean loss over them at w + ε."""
    n = int(np.floor(gamma * len(x)))
    for _ in range(steps):
        _, g, clean = ref.loss_and_grads(params, x, y)
        perturbed = _at(params, ref.sam_epsilon(g, rho))
        increase = ref.loss_and_grads(perturbed, x, y)[2] - clean
        threshold = np.sort(increase)[::-1][n - 1]
        kept = increase > threshold
        params = _sgd(params, _grads(perturbed, x[kept], y[kept]), lr)
    return params


def sam_splits(params, x, y, lr, rho, splits, steps):
    """SAM with each contiguous part's own ε; parts' gradients averaged by size."""
    bounds = [(j * len(x)) // splits for j in range(splits + 1)]
    for _ in range(steps):
        total = [np.zeros_like(p) for p in params]
        for start, stop in itertools.pairwise(bounds):
            xs, ys = x[start:stop], y[start:stop]
            g = _grads(params, xs, ys)
            gs = _grads(_at(params, ref.sam_epsilon(g, rho)), xs, ys)
            total = [t + (stop - start) / len(x) * a for t, a in zip(total, gs)]
        params = _sgd(params, total, lr)
    return params


def sam_filtered(params, x, y, lr, rho, perturbed, steps):
    """SAM where only ``perturbed[i]`` variables get ε (and count in ‖g‖)."""
    for _ in range(steps):
        g = _grads(params, x, y)
        kept = [a for a, keep in zip(g, perturbed) if keep]
        scale = rho / _norm(kept)
        eps = [a * scale if keep else 0 * a for a, keep in zip(g, perturbed)]
        params = _sgd(params, _grads(_at(params, eps), x, y), lr)
    return params
