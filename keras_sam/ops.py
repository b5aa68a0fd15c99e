"""Perturbation math shared by every method, written once in `keras.ops`.

All functions take and return lists aligned with a list of variables, where an
entry may be ``None`` (a variable that got no gradient): such entries are left
out of every norm and get no perturbation. Norms are computed in float32 whatever
the variables' dtype, and a zero norm gives a zero perturbation, never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from keras import ops, tree

Tensor = Any


def global_norm(tensors: Sequence[Tensor | None]) -> Tensor:
    """‖t‖₂ over all non-``None`` tensors together, as a float32 scalar.

    Examples:
        >>> from keras import ops
        >>> float(global_norm([ops.array([3.0]), None, ops.array([[4.0]])]))
        5.0
    """
    squares = [_sum_of_products(t, t) for t in tensors if t is not None]
    if not squares:
        return ops.zeros((), "float32")
    return ops.sqrt(ops.sum(ops.stack(squares)))


def safe_ratio(numerator: Tensor, norm: Tensor) -> Tensor:
    """``numerator / norm`` where ``norm > 0``, else 0 (no NaN for a zero gradient).

    Examples:
        >>> float(safe_ratio(1.0, 4.0)), float(safe_ratio(1.0, 0.0))
        (0.25, 0.0)
    """
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

    Examples:
        SAM, then ASAM's T = |w| + η with w = (1, 2), η = 0:

        >>> from keras import ops
        >>> g = [ops.array([3.0, 4.0]), None]
        >>> [e if e is None else ops.convert_to_numpy(e).tolist() for e in dual_vector(g, 0.5)]
        [[0.30000001192092896, 0.4000000059604645], None]
        >>> eps = dual_vector([ops.array([1.0, 1.0])], 1.0, scales=[ops.array([1.0, 2.0])])
        >>> [round(v, 4) for v in ops.convert_to_numpy(eps[0]).tolist()]
        [0.4472, 1.7889]
    """
    if scales is None:
        scales = [None] * len(grads)
    scaled = [
        None if g is None else _times(ops.cast(g, "float32"), t) for g, t in zip(grads, scales)
    ]
    factor = safe_ratio(ops.cast(rho, "float32"), global_norm(scaled))
    return [None if tg is None else _times(tg, t) * factor for tg, t in zip(scaled, scales)]


def add_perturbation(
    values: Sequence[Tensor], perturbation: Sequence[Tensor | None]
) -> list[Tensor]:
    """w + ε, in each variable's own dtype; ``None`` entries leave w unchanged.

    Examples:
        >>> from keras import backend, ops
        >>> w = [ops.array([1.0], "float16"), ops.array([2.0])]
        >>> [(backend.standardize_dtype(v.dtype), float(v[0]))
        ...  for v in add_perturbation(w, [ops.array([0.5]), None])]
        [('float16', 1.5), ('float32', 2.0)]
    """
    return [w if e is None else w + ops.cast(e, w.dtype) for w, e in zip(values, perturbation)]


def all_finite(tensors: Sequence[Tensor | None]) -> Tensor:
    """True when every entry of every non-``None`` tensor is finite.

    Examples:
        >>> from keras import ops
        >>> bool(all_finite([ops.array([1.0]), None]))
        True
        >>> bool(all_finite([ops.array([float("nan")])]))
        False
    """
    checks = [is_finite(t) for t in tensors if t is not None]
    if not checks:
        return ops.convert_to_tensor(True)
    return ops.all(ops.stack(checks))


def where_finite(gradient: Tensor, updated: Tensor, kept: Tensor) -> Tensor:
    """``updated`` where ``gradient`` is finite, ``kept`` where it is NaN or infinite,
    entry by entry (selected, so a NaN in ``updated`` does not pass). An element-wise
    skip of an update: it needs no reduction of ``gradient`` first, so a compiler can
    write each variable's update as soon as its gradient is computed.

    Examples:
        >>> from keras import ops
        >>> g = ops.array([1.0, float("nan"), float("inf")])
        >>> [float(x) for x in where_finite(g, 10.0 - g, ops.array([5.0, 6.0, 7.0]))]
        [9.0, 6.0, 7.0]
    """
    return ops.where(ops.isfinite(gradient), updated, kept)


def is_finite(tensor: Tensor) -> Tensor:
    """True when every entry of ``tensor`` is finite, read from the float32 sum of its
    entries (a NaN or an infinity makes the sum NaN or infinite; so does a sum past
    float32's largest value, which this counts as not finite).

    The sum is taken as dot products of the rows with ones, which read the tensor in
    place, as the norms do: XLA on a CPU reduced ``all(isfinite(t))`` through a tree
    of partial reductions whose boolean input it materialized (a quarter of a
    parameter copy per gradient, and updates delayed until it was done).

    Examples:
        >>> from keras import ops
        >>> bool(is_finite(ops.array([1.0, -1.0])))
        True
        >>> bool(is_finite(ops.array([1.0, float("inf")])))
        False
    """
    rows = _as_rows(tensor)
    return ops.isfinite(ops.sum(ops.matmul(rows, ops.ones((rows.shape[-1],), rows.dtype))))


def _sum_of_products(x: Tensor, y: Tensor) -> Tensor:
    """Σ x·y over every entry, as dot products of the rows of the tensors seen as
    float32 matrices (their last axis kept).

    XLA on a CPU materializes the products of ``sum(x * y)`` (or of a sum over rows
    first) as a temporary the size of ``x``: a parameter copy for a norm over the
    weights. A dot product reads both in place; row by row it also keeps the
    reduction parallel (one dot of the flattened tensors made Momentum-SAM's step
    on a 2.9M-weight MLP about 15 % slower; see docs/benchmarks, "Memory").
    """
    rows_x = _as_rows(x)
    rows_y = rows_x if y is x else _as_rows(y)
    return ops.sum(ops.einsum("ij,ij->i", rows_x, rows_y))


def _as_rows(tensor: Tensor) -> Tensor:
    last = tensor.shape[-1] if len(tensor.shape) and tensor.shape[-1] else 1
    return ops.reshape(ops.cast(tensor, "float32"), (-1, last))


def _times(tensor: Tensor, scale: Tensor | None) -> Tensor:
    return tensor if scale is None else tensor * ops.cast(scale, tensor.dtype)


def inner_product(a: Sequence[Tensor | None], b: Sequence[Tensor | None]) -> Tensor:
    """⟨a, b⟩ over all pairs where both entries are present, as a float32 scalar.

    Examples:
        >>> from keras import ops
        >>> a = [ops.array([1.0, 2.0]), None]
        >>> float(inner_product(a, [ops.array([3.0, 4.0]), ops.array([1.0])]))
        11.0
    """
    products = [_sum_of_products(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not products:
        return ops.zeros((), "float32")
    return ops.sum(ops.stack(products))


def surrogate_gap_descent(
    grads: Sequence[Tensor | None], sam_grads: Sequence[Tensor | None], alpha: float
) -> list[Tensor | None]:
    r"""GSAM's descent direction g_s − α g⊥ (Zhuang et al. 2022).

    .. math::

        \cos = \frac{\langle g, g_s \rangle}{\lVert g_s \rVert \lVert g \rVert + 10^{-12}},
        \quad
        g_\perp = g - \cos \lVert g \rVert \frac{g_s}{\lVert g_s \rVert + 10^{-12}}

    g⊥ is the part of the clean gradient g orthogonal to the perturbed one g_s.
    Entries without g_s are ``None``; without g, g_s is returned.

    Examples:
        >>> from keras import ops
        >>> d = surrogate_gap_descent([ops.array([1.0, 1.0])], [ops.array([2.0, 0.0])], alpha=0.5)
        >>> [round(v, 6) for v in ops.convert_to_numpy(d[0]).tolist()]
        [2.0, -0.5]
    """
    g_norm, s_norm = global_norm(grads), global_norm(sam_grads)
    cosine = inner_product(grads, sam_grads) / (s_norm * g_norm + 1e-12)
    along = cosine * g_norm / (s_norm + 1e-12)
    return [
        s if s is None or g is None else s - alpha * (g - along * s)
        for g, s in zip(grads, sam_grads)
    ]


def orthogonal_unit(
    sam_grads: Sequence[Tensor | None], grads: Sequence[Tensor | None]
) -> list[Tensor | None]:
    r"""LookSAM's ĝ_v: the unit vector of the part of g_s orthogonal to g.

    .. math::

        g_v = g_s - \frac{\langle g_s, g \rangle}{\lVert g \rVert^2 + 10^{-12}} g,
        \quad \hat g_v = g_v / \lVert g_v \rVert

    ĝ_v = 0 when g_v = 0. Entries missing in either list are ``None``.

    Examples:
        >>> from keras import ops
        >>> u = orthogonal_unit([ops.array([1.0, 1.0])], [ops.array([2.0, 0.0])])
        >>> [round(v, 6) for v in ops.convert_to_numpy(u[0]).tolist()]
        [0.0, 1.0]
    """
    coefficient = inner_product(sam_grads, grads) / (ops.square(global_norm(grads)) + 1e-12)
    orthogonal = [
        None if s is None or g is None else ops.cast(s, "float32") - coefficient * g
        for s, g in zip(sam_grads, grads)
    ]
    factor = safe_ratio(1.0, global_norm(orthogonal))
    return [None if v is None else v * factor for v in orthogonal]


def multiply_sample_weight(sample_weight: Any, factor: Tensor) -> Any:
    """Sample weights times a per-sample ``factor`` (broadcast over trailing axes);
    ``factor`` itself when there are no sample weights.

    Examples:
        >>> from keras import ops
        >>> weighted = multiply_sample_weight(ops.ones((2, 3)), ops.array([1.0, 2.0]))
        >>> ops.convert_to_numpy(weighted).tolist()
        [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
    """

    def times_factor(weight: Any) -> Tensor:
        weight = ops.cast(weight, "float32")
        return weight * ops.reshape(factor, [-1] + [1] * (len(weight.shape) - 1))

    if sample_weight is None:
        return factor
    return tree.map_structure(times_factor, sample_weight)
