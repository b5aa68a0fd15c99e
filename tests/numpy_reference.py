"""Independent numpy references: a two-layer tanh MLP with MSE, written by hand.

Nothing here calls keras_sam or Keras; tests compare the package against it.
"""

from __future__ import annotations

import numpy as np

# Parameter order matches the Keras model built by `keras_mlp`:
# [kernel1, bias1, kernel2, bias2].
NON_ADAPTIVE = (False, True, False, True)


def init_params(n_in: int = 3, n_hidden: int = 4, n_out: int = 2, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [
        rng.normal(size=(n_in, n_hidden)) * 0.7,
        rng.normal(size=(n_hidden,)) * 0.1,
        rng.normal(size=(n_hidden, n_out)) * 0.7,
        rng.normal(size=(n_out,)) * 0.1,
    ]


def loss_and_grads(params, x, y, sample_weight=None):
    """Keras' MSE with `sum_over_batch_size`: mean_i( w_i * mean_j (out_ij - y_ij)^2 )."""
    W1, b1, W2, b2 = params
    n, m = y.shape
    w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=float)
    h = np.tanh(x @ W1 + b1)
    out = h @ W2 + b2
    per_sample = ((out - y) ** 2).mean(axis=1)
    loss = (w * per_sample).sum() / n
    dout = 2.0 * (out - y) * w[:, None] / (n * m)
    gW2 = h.T @ dout
    gb2 = dout.sum(0)
    dh = (dout @ W2.T) * (1.0 - h**2)
    gW1 = x.T @ dh
    gb1 = dh.sum(0)
    return loss, [gW1, gb1, gW2, gb2], per_sample


def global_norm(tensors) -> float:
    return float(np.sqrt(sum((t**2).sum() for t in tensors)))


def sam_epsilon(grads, rho):
    norm = global_norm(grads)
    return [rho * g / norm for g in grads]


def asam_epsilon(params, grads, rho, eta):
    scales = [
        np.ones_like(p) if fixed else np.abs(p) + eta
        for p, fixed in zip(params, NON_ADAPTIVE)
    ]
    norm = global_norm([t * g for t, g in zip(scales, grads)])
    return [rho * t**2 * g / norm for t, g in zip(scales, grads)]


def sam_sgd_step(params, x, y, lr, epsilon_fn, sample_weight=None):
    """One step: ascent gradient at w, ε, gradient at w + ε, plain SGD from w."""
    _, g, _ = loss_and_grads(params, x, y, sample_weight)
    eps = epsilon_fn(params, g)
    _, g_sam, _ = loss_and_grads([p + e for p, e in zip(params, eps)], x, y, sample_weight)
    return [p - lr * gs for p, gs in zip(params, g_sam)]
