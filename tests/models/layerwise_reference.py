"""Numpy reference of one layer-wise SAM step on `numpy_reference`'s two-layer MLP.

Nothing here calls keras_sam or Keras.
"""

from __future__ import annotations

import numpy as np

from tests import numpy_reference as ref

# The MLP's layers, as positions in its parameter list [W1, b1, W2, b2].
UNITS = ((0, 1), (2, 3))


def layerwise_epsilon(grads, rho, chosen, radius="joint"):
    """ε on the chosen layers (indices into UNITS), zero elsewhere."""
    eps = [np.zeros_like(g) for g in grads]
    if radius in ("joint", "scaled"):
        positions = [p for u in chosen for p in UNITS[u]]
        norm = ref.global_norm([grads[p] for p in positions])
        if radius == "scaled":  # the same RMS per parameter as SAM's ρ-ball over all
            rho = rho * np.sqrt(sum(g.size for g in grads) / sum(grads[p].size for p in positions))
        for p in positions:
            eps[p] = rho * grads[p] / norm
    else:
        for u in chosen:
            norm = ref.global_norm([grads[p] for p in UNITS[u]])
            for p in UNITS[u]:
                eps[p] = rho * grads[p] / norm
    return eps


def layerwise_sgd_step(params, x, y, lr, rho, chosen, radius="joint", sample_weight=None):
    """One step with a fixed selection; returns the new parameters and the
    per-layer norms of the descent gradient (the ranking signal)."""
    eps_fn = lambda p, g: layerwise_epsilon(g, rho, chosen, radius)  # noqa: E731
    _, g, _ = ref.loss_and_grads(params, x, y, sample_weight)
    eps = eps_fn(params, g)
    _, g_sam, _ = ref.loss_and_grads([p + e for p, e in zip(params, eps)], x, y, sample_weight)
    new = [p - lr * gs for p, gs in zip(params, g_sam)]
    norms = [ref.global_norm([g_sam[p] for p in unit]) for unit in UNITS]
    return new, norms
