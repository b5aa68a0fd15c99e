"""Perturbation math shared by every method, written once in `keras.ops`.

All functions take and return lists aligned with a list of variables, where an
entry may be ``None`` (a variable that got no gradient): such entries are left
out of every norm and get no perturbation. Norms are computed in float32 whatever
the variables' dtype, and a zero norm gives a zero perturbation, never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from keras import ops

Tensor = Any


def global_norm(tensors: Sequence[Tensor | None]) -> Tensor:
    """‖t‖₂ over all non-``None`` tensors together, as a float32 scalar."""
    squares = [ops.sum(ops.square(ops.cast(t, "float32"))) for t in tensors if t is not None]
    if not squares:
        return ops.zeros((), "float32")
    return ops.sqrt(ops.sum(ops.stack(squares)))


def safe_ratio(numerator: Tensor, norm: Tensor) -> Tensor:
    """``numerator / norm`` where ``norm > 0``, else 0 (no NaN for a zero gradient)."""
    positive = ops.greater(norm, 0.0)
    return ops.where(positive, numerator / ops.where(positive, norm, 1.0), 0.0)


def dual_vector(
    grads: Sequence[Tensor | None],
    rho: Tensor,
    scales: Sequence[Tensor | None] | None = None,
) -> list[Tensor | None]:
    r"""The perturbation ε that maximizes the linearized loss in a ρ-ball.

    With an element-wise scaling operator T (``scales``; T = 1 when ``None``):

    .. math::

        \epsilon = \rho \, \frac{T^2 g}{\lVert T g \rVert_2}

    T = 1 is SAM's ε = ρ g/‖g‖ (Foret et al. 2020); T_w = |w| + η is ASAM's
    adaptive ball (Kwon et al. 2021). The norm runs over all given tensors at once.

    Args:
        grads: ascent gradients; ``None`` entries get ``None``.
        rho: radius ρ (a scalar).
        scales: per-tensor T, or ``None`` entries / ``None`` for T = 1.

    Returns:
        A list of ε tensors (float32) aligned with ``grads``.
    """
    if scales is None:
        scales = [None] * len(grads)
    scaled = [
        None if g is None else _times(ops.cast(g, "float32"), t)
        for g, t in zip(grads, scales)
    ]
    factor = safe_ratio(ops.cast(rho, "float32"), global_norm(scaled))
    return [
        None if tg is None else _times(tg, t) * factor for tg, t in zip(scaled, scales)
    ]


def add_perturbation(
    values: Sequence[Tensor], perturbation: Sequence[Tensor | None]
) -> list[Tensor]:
    """w + ε, in each variable's own dtype; ``None`` entries leave w unchanged."""
    return [
        w if e is None else w + ops.cast(e, w.dtype) for w, e in zip(values, perturbation)
    ]


def all_finite(tensors: Sequence[Tensor | None]) -> Tensor:
    """True when every entry of every non-``None`` tensor is finite."""
    checks = [ops.all(ops.isfinite(t)) for t in tensors if t is not None]
    if not checks:
        return ops.convert_to_tensor(True)
    return ops.all(ops.stack(checks))


def _times(tensor: Tensor, scale: Tensor | None) -> Tensor:
    return tensor if scale is None else tensor * ops.cast(scale, tensor.dtype)
