r"""Measure what SAM optimizes: Hessian spectrum, worst-case and average sharpness,
loss landscapes.

Every function evaluates a model on fixed data in **inference mode** (BatchNorm
uses its moving statistics, Dropout is off), so the measure depends on the
weights alone, and returns NumPy arrays or Python floats. The loss is the mean
over all samples of the (sample-weighted) per-sample loss:

.. math::

    L(w) = \frac{1}{N} \sum_{i=1}^{N} s_i \, \ell(f_w(x_i), y_i)

with s_i the sample weights (1 without). ``data`` is an ``(x, y)`` or
``(x, y, sample_weight)`` tuple of arrays (cut into batches of ``batch_size``),
or a `tf.data.Dataset` or any iterable of such batches. ``loss`` is a Keras loss
object, name or function (a dict or list of them for a multi-output model,
summed). Derivatives are taken w.r.t. the model's trainable variables; Hessian
products use forward-over-reverse differentiation (never a dense Hessian).
Losses and products are accumulated in float32 (NumPy float64 for the
eigensolver); a mixed-precision model still runs its layers in their compute
dtype.

Works on TensorFlow, JAX and PyTorch, with BatchNorm, Dropout, multi-output models,
sample weights, mixed precision and inside a `tf.distribute` strategy scope (the
measure runs on one device).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops, tree

from keras_sam import backend
from keras_sam.validation import check_int, check_real

__all__ = [
    "average_sharpness",
    "hessian_eigenvalues",
    "hessian_trace",
    "loss_landscape",
    "plot_landscape",
    "worst_case_sharpness",
]

Batch = tuple[Any, Any, Any]


# --------------------------------------------------------------------------- public
def hessian_eigenvalues(
    model: keras.Model,
    data: Any,
    loss: Any,
    *,
    k: int = 1,
    max_iters: int = 100,
    tol: float = 1e-4,
    seed: int | None = None,
    return_eigenvectors: bool = False,
    batch_size: int = 256,
) -> Any:
    """The k largest eigenvalues of the Hessian of the mean loss, by Lanczos.

    Lanczos iteration with full reorthogonalization on Hessian-vector products;
    it stops when the k largest Ritz values change by less than ``tol``
    (relative) between iterations, or after ``max_iters`` products. For k > 1,
    Lanczos is restarted in the complement of the eigenvectors found, so that
    repeated eigenvalues are found with their multiplicity (each restart costs
    up to ``max_iters`` more products).

    Args:
        model: a built `keras.Model` (or a keras_sam wrapper).
        data: ``(x, y[, sample_weight])`` arrays or an iterable of such batches.
        loss: a Keras loss (object, name or function; dict/list per output).
        k: how many eigenvalues (int >= 1). Defaults to `1`.
        max_iters: at most this many Hessian-vector products (int >= 1).
        tol: relative change of the Ritz values that stops the iteration (> 0).
        seed: seed of the starting vector (``None``: random).
        return_eigenvectors: also return the eigenvectors, each a list of
            arrays shaped like the trainable variables.
        batch_size: batch size used to cut array ``data``.

    Returns:
        A float64 array of the k eigenvalues, largest first (or
        ``(eigenvalues, eigenvectors)``).

    Raises:
        ValueError: ``k`` or ``max_iters`` < 1, ``tol`` <= 0, empty data or a
            model without trainable variables.

    Examples:
        >>> import keras, numpy as np, keras_sam
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        >>> x, y = np.random.rand(64, 3), np.random.rand(64, 1)
        >>> values = keras_sam.sharpness.hessian_eigenvalues(model, (x, y), "mse", k=3)
        >>> len(values), bool(values[0] >= values[1] >= values[2] > 0)  # a convex loss
        (3, True)
    """
    k = check_int(k, "k", low=1)
    max_iters = check_int(max_iters, "max_iters", low=1)
    tol = check_real(tol, "tol", low=0.0, low_open=True)
    objective = _Objective(model, data, loss, batch_size)
    values, vectors = _top_eigenpairs(objective, k, max_iters, tol, np.random.default_rng(seed))
    if return_eigenvectors:
        return values, [objective.unflatten(v) for v in vectors.T]
    return values


def hessian_trace(
    model: keras.Model,
    data: Any,
    loss: Any,
    *,
    samples: int = 100,
    seed: int | None = None,
    return_std_error: bool = False,
    batch_size: int = 256,
) -> Any:
    """Hutchinson's estimate of the Hessian trace: the mean of vᵀHv over Rademacher v.

    Args:
        model: as in `hessian_eigenvalues`.
        data: as in `hessian_eigenvalues`.
        loss: as in `hessian_eigenvalues`.
        batch_size: as in `hessian_eigenvalues`.
        samples: the number of probes (int >= 1). Defaults to `100`.
        seed: seed of the probes.
        return_std_error: also return the standard error of the estimate.

    Returns:
        The estimate (a float), or ``(estimate, standard_error)``.

    Examples:
        >>> import keras, numpy as np, keras_sam
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        >>> x, y = np.random.rand(64, 3), np.random.rand(64, 1)
        >>> trace, error = keras_sam.sharpness.hessian_trace(model, (x, y), "mse",
        ...                                                  return_std_error=True)
        >>> bool(trace > 0 and error >= 0)
        True
    """
    samples = check_int(samples, "samples", low=1)
    objective = _Objective(model, data, loss, batch_size)
    rng = np.random.default_rng(seed)
    quadratic = []
    for _ in range(samples):
        probe = rng.choice([-1.0, 1.0], size=objective.size)
        quadratic.append(float(probe @ objective.hvp(probe)))
    estimate = float(np.mean(quadratic))
    error = float(np.std(quadratic, ddof=1) / np.sqrt(samples)) if samples > 1 else float("nan")
    return (estimate, error) if return_std_error else estimate


def worst_case_sharpness(
    model: keras.Model,
    data: Any,
    loss: Any,
    *,
    rho: float,
    m: int | None = None,
    adaptive: bool = False,
    steps: int = 1,
    batch_size: int = 256,
) -> float:
    r"""max over ‖δ‖ ≤ ρ of L(w + δ) − L(w), averaged over chunks of m samples.

    The maximum is estimated by ``steps`` of normalized, projected gradient
    ascent from δ = 0 with step size 2ρ/steps (one step is SAM's first-order
    δ = ρ g/‖g‖); the best iterate counts. ``adaptive=True`` measures in ASAM's
    ball ‖δ/|w|‖ ≤ ρ (elementwise scaling by |w|). With ``m`` the data is cut
    into consecutive chunks of m samples, each gets its own δ, and the
    sharpness is their mean: m-sharpness (Foret et al. 2021; Andriushchenko et
    al. 2023, arXiv 2302.07011). ``m=None`` takes all the data as one chunk.

    Args:
        model: as in `hessian_eigenvalues`.
        data: as in `hessian_eigenvalues`.
        loss: as in `hessian_eigenvalues`.
        batch_size: as in `hessian_eigenvalues`.
        rho: the radius ρ >= 0.
        m: the chunk size (int >= 1) or ``None``.
        adaptive: scale the ball by |w| elementwise.
        steps: gradient-ascent steps (int >= 1).

    Returns:
        The mean sharpness over chunks (a float).

    Examples:
        >>> import keras, numpy as np, keras_sam
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        >>> x, y = np.random.rand(64, 3), np.random.rand(64, 1)
        >>> sharpness = keras_sam.sharpness.worst_case_sharpness(
        ...     model, (x, y), "mse", rho=0.05, m=16)
        >>> bool(sharpness > 0)
        True
    """
    rho = check_real(rho, "rho", low=0.0)
    steps = check_int(steps, "steps", low=1)
    if m is not None:
        m = check_int(m, "m", low=1)
    chunks = [data] if m is None else _chunks(_concatenated(data, "data"), m)
    return float(
        np.mean(
            [
                _worst_case(_Objective(model, chunk, loss, batch_size), rho, adaptive, steps)
                for chunk in chunks
            ]
        )
    )


def average_sharpness(
    model: keras.Model,
    data: Any,
    loss: Any,
    *,
    sigma: float,
    samples: int = 10,
    adaptive: bool = False,
    seed: int | None = None,
    batch_size: int = 256,
) -> float:
    """E over δ ~ N(0, σ²I) of L(w + δ) − L(w) (σ|w| elementwise when ``adaptive``).

    Args:
        model: as in `hessian_eigenvalues`.
        data: as in `hessian_eigenvalues`.
        loss: as in `hessian_eigenvalues`.
        batch_size: as in `hessian_eigenvalues`.
        sigma: the noise scale σ >= 0.
        samples: Monte Carlo draws (int >= 1).
        adaptive: scale the noise by |w| elementwise.
        seed: seed of the draws.

    Returns:
        The mean loss increase (a float).

    Examples:
        >>> import keras, numpy as np, keras_sam
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        >>> x, y = np.random.rand(64, 3), np.random.rand(64, 1)
        >>> increase = keras_sam.sharpness.average_sharpness(model, (x, y), "mse", sigma=0.01)
        >>> isinstance(increase, float)
        True
    """
    sigma = check_real(sigma, "sigma", low=0.0)
    samples = check_int(samples, "samples", low=1)
    objective = _Objective(model, data, loss, batch_size)
    rng = np.random.default_rng(seed)
    scale = np.abs(objective.w) if adaptive else 1.0
    base = objective.loss(objective.w)
    increases = [
        objective.loss(objective.w + sigma * scale * rng.standard_normal(objective.size)) - base
        for _ in range(samples)
    ]
    return float(np.mean(increases))


def loss_landscape(
    model: keras.Model,
    data: Any,
    loss: Any,
    *,
    directions: int = 1,
    span: float = 1.0,
    points: int = 21,
    seed: int | None = None,
    target: Any = None,
    batch_size: int = 256,
) -> dict[str, Any]:
    """The loss along filter-normalized random directions, or along a line to ``target``.

    Random directions follow Li et al. 2018 (Visualizing the Loss Landscape of
    Neural Nets): each filter (slice along the last axis of a variable with
    two or more dimensions) of a Gaussian direction is rescaled to the norm of
    the same filter of w; 1-D variables (biases, normalization parameters) get
    0. The loss is evaluated at w + α d₁ (+ β d₂) for α, β in
    [-span, span]. With ``target`` (a list of weight arrays like
    ``model.trainable_variables``, or a model with the same variables), the loss
    is evaluated along w + α (w_target − w) for α in [−span/2, 1 + span/2]
    (α = 0 is the model, α = 1 the target: e.g. the SGD and SAM solutions).

    Args:
        model: as in `hessian_eigenvalues`.
        data: as in `hessian_eigenvalues`.
        loss: as in `hessian_eigenvalues`.
        batch_size: as in `hessian_eigenvalues`.
        directions: 1 or 2 random directions (ignored with ``target``).
        span: the extent of the grid (> 0).
        points: grid points per axis (int >= 2).
        seed: seed of the random directions.
        target: ``None``, or the other end of a line.

    Returns:
        A dict with ``"alphas"`` (and ``"betas"`` for 2-D) and ``"losses"``
        (shape ``(points,)`` or ``(points, points)``, indexed [alpha, beta]),
        for `plot_landscape`.

    Examples:
        >>> import keras, numpy as np, keras_sam
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        >>> x, y = np.random.rand(64, 3), np.random.rand(64, 1)
        >>> result = keras_sam.sharpness.loss_landscape(model, (x, y), "mse", directions=2,
        ...                                             points=5)
        >>> result["losses"].shape
        (5, 5)
    """
    span = check_real(span, "span", low=0.0, low_open=True)
    points = check_int(points, "points", low=2)
    objective = _Objective(model, data, loss, batch_size)
    if target is not None:
        end = objective.flatten(_target_weights(target, objective))
        alphas = np.linspace(-span / 2, 1 + span / 2, points)
        losses = np.array([objective.loss(objective.w + a * (end - objective.w)) for a in alphas])
        return {"alphas": alphas, "losses": losses, "kind": "line"}
    directions = check_int(directions, "directions", low=1)
    if directions > 2:
        raise ValueError(f"`directions` must be 1 or 2, got {directions}.")
    rng = np.random.default_rng(seed)
    axes = [_filter_normalized(objective, rng) for _ in range(directions)]
    grid = np.linspace(-span, span, points)
    if directions == 1:
        losses = np.array([objective.loss(objective.w + a * axes[0]) for a in grid])
        return {"alphas": grid, "losses": losses, "kind": "random"}
    losses = np.array(
        [[objective.loss(objective.w + a * axes[0] + b * axes[1]) for b in grid] for a in grid]
    )
    return {"alphas": grid, "betas": grid, "losses": losses, "kind": "random"}


def plot_landscape(result: dict[str, Any], ax: Any = None) -> Any:
    """Draws a `loss_landscape` result with matplotlib (a line, or filled contours).

    Args:
        result: what `loss_landscape` returned.
        ax: a matplotlib ``Axes`` (``None``: a new figure).

    Returns:
        The ``Axes``.

    Examples:
        >>> import keras, numpy as np, keras_sam
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        >>> x, y = np.random.rand(64, 3), np.random.rand(64, 1)
        >>> result = keras_sam.sharpness.loss_landscape(model, (x, y), "mse", points=5)
        >>> ax = keras_sam.sharpness.plot_landscape(result)
        >>> ax.get_xlabel()
        'α'
    """
    import matplotlib.pyplot as plt  # optional dependency, needed only here

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4))
    losses = np.asarray(result["losses"])
    if losses.ndim == 1:
        ax.plot(result["alphas"], losses)
        ax.set_xlabel("α (to the target)" if result.get("kind") == "line" else "α")
        ax.set_ylabel("loss")
    else:
        contour = ax.contourf(result["alphas"], result["betas"], losses.T, levels=30)
        ax.figure.colorbar(contour, ax=ax, label="loss")
        ax.set_xlabel("α")
        ax.set_ylabel("β")
    return ax


# --------------------------------------------------------------------------- the objective
class _Objective:
    """The mean loss over the data as a function of the flattened trainable weights."""

    def __init__(self, model: keras.Model, data: Any, loss: Any, batch_size: int) -> None:
        if not isinstance(model, keras.Model):
            raise TypeError(f"`model` must be a keras.Model, got {type(model).__name__}.")
        self.variables = list(model.trainable_variables)
        if not self.variables:
            raise ValueError("`model` has no trainable variables to measure sharpness of.")
        self.batches = _batches(data, check_int(batch_size, "batch_size", low=1))
        self.count = float(sum(_batch_size(b) for b in self.batches))
        self.shapes = [tuple(v.shape) for v in self.variables]
        self.sizes = [int(np.prod(s)) for s in self.shapes]
        self.size = int(sum(self.sizes))
        self.w = self.flatten([ops.convert_to_numpy(v.value) for v in self.variables])
        per_sample = _per_sample_loss(loss)
        non_trainable = [v.value for v in model.non_trainable_variables]

        def batch_loss(values: list, x: Any, y: Any, sample_weight: Any) -> Any:
            y_pred, _ = model.stateless_call(values, non_trainable, x, training=False)
            losses = per_sample(y, y_pred)
            if sample_weight is not None:
                losses = losses * ops.cast(sample_weight, "float32")
            return ops.sum(losses)

        self._loss = backend.function(batch_loss)
        self._gradient = backend.function(
            lambda values, x, y, sw: backend.gradient(lambda v: batch_loss(v, x, y, sw), values)
        )
        self._hvp = backend.function(
            lambda values, vectors, x, y, sw: backend.hessian_vector_product(
                lambda v: batch_loss(v, x, y, sw), values, vectors
            )
        )

    def flatten(self, arrays: Sequence[Any]) -> np.ndarray:
        return np.concatenate([np.asarray(a, "float64").ravel() for a in arrays])

    def unflatten(self, flat: np.ndarray) -> list[np.ndarray]:
        parts = np.split(np.asarray(flat), np.cumsum(self.sizes)[:-1])
        return [p.reshape(s) for p, s in zip(parts, self.shapes)]

    def _tensors(self, flat: np.ndarray) -> list:
        return [
            ops.convert_to_tensor(p.astype("float32"), v.dtype)
            for p, v in zip(self.unflatten(flat), self.variables)
        ]

    def _total(self, fn: Callable, *flats: np.ndarray) -> Any:
        args = [self._tensors(f) for f in flats]
        total: Any = None
        for x, y, sample_weight in self.batches:
            out = fn(*args, x, y, sample_weight)
            out = (
                float(ops.convert_to_numpy(out))
                if not isinstance(out, (list, tuple))
                else self.flatten([ops.convert_to_numpy(t) for t in out])
            )
            total = out if total is None else total + out
        return total / self.count

    def loss(self, flat: np.ndarray) -> float:
        return float(self._total(self._loss, flat))

    def gradient(self, flat: np.ndarray) -> np.ndarray:
        return self._total(self._gradient, flat)

    def hvp(self, vector: np.ndarray) -> np.ndarray:
        return self._total(self._hvp, self.w, vector)


def _per_sample_loss(loss: Any) -> Callable[[Any, Any], Any]:
    """``(y, y_pred) -> per-sample float32 losses`` (summed over outputs, averaged over
    any axes after the batch axis)."""
    if loss is None:
        raise ValueError("`loss` is required (a Keras loss object, name or function).")
    if isinstance(loss, dict | list | tuple):
        parts = tree.map_structure(_per_sample_loss, loss)

        def total(y: Any, y_pred: Any) -> Any:
            values = tree.flatten(tree.map_structure(lambda f, t, p: f(t, p), parts, y, y_pred))
            return sum(values)

        return total
    function = keras.losses.get(loss)
    call = function.call if isinstance(function, keras.losses.Loss) else function

    def per_sample(y: Any, y_pred: Any) -> Any:
        values = ops.cast(call(y, y_pred), "float32")
        while len(values.shape) > 1:
            values = ops.mean(values, axis=-1)
        return values

    return per_sample


# --------------------------------------------------------------------------- data
def _batches(data: Any, batch_size: int) -> list[Batch]:
    if isinstance(data, tuple | list) and len(data) in (2, 3) and not _is_batch_list(data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(tuple(data))
        n = _batch_size((x, y, sample_weight))
        batches = [
            tree.map_structure(
                lambda t, i=i: None if t is None else t[i : i + batch_size], (x, y, sample_weight)
            )
            for i in range(0, n, batch_size)
        ]
    elif isinstance(data, Iterable):
        batches = [keras.utils.unpack_x_y_sample_weight(tuple(batch)) for batch in data]
    else:
        raise TypeError(
            "`data` must be an (x, y[, sample_weight]) tuple of arrays or an iterable of "
            f"such batches, got {type(data).__name__}."
        )
    batches = [b for b in batches if _batch_size(b) > 0]
    if not batches:
        raise ValueError("`data` is empty: there is no sample to measure the loss on.")
    return batches


def _is_batch_list(data: Any) -> bool:
    """A list whose entries are themselves (x, y[, w]) batches."""
    return isinstance(data, list) and all(isinstance(b, tuple) for b in data)


def _batch_size(batch: Batch) -> int:
    return int(tree.flatten(batch[0])[0].shape[0])


def _concatenated(data: Any, name: str) -> tuple:
    batches = _batches(data, 1 << 30)
    if len(batches) == 1:
        return batches[0]
    return tree.map_structure(
        lambda *parts: (
            None
            if parts[0] is None
            else np.concatenate([np.asarray(ops.convert_to_numpy(p)) for p in parts])
        ),
        *batches,
    )


def _chunks(batch: tuple, m: int) -> list[tuple]:
    n = _batch_size(batch)
    return [
        tree.map_structure(lambda t, i=i: None if t is None else t[i : i + m], batch)
        for i in range(0, n, m)
    ]


# --------------------------------------------------------------------------- algorithms
def _top_eigenpairs(
    objective: _Objective, k: int, max_iters: int, tol: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k eigenpairs of the Hessian: Lanczos, then deflated restarts.

    A single Krylov sequence holds one vector per eigenspace, so it misses
    repeated eigenvalues; for k > 1, Lanczos is rerun in the complement of the
    vectors found until no eigenvalue above the k-th one is left there.
    """
    values, vectors = _lanczos(objective, k, max_iters, tol, rng, None)
    for _ in range(k - 1 if k > 1 else 0):
        extra_value, extra_vector = _lanczos(objective, 1, max_iters, tol, rng, vectors)
        if extra_value[0] <= values[-1] + tol * max(abs(values[-1]), 1e-12):
            break
        values = np.concatenate([values, extra_value])
        vectors = np.concatenate([vectors, extra_vector], axis=1)
        order = np.argsort(values)[::-1][:k]
        values, vectors = values[order], vectors[:, order]
    return values, vectors


def _lanczos(
    objective: _Objective,
    k: int,
    max_iters: int,
    tol: float,
    rng: np.random.Generator,
    exclude: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k Ritz pairs of the Hessian restricted to the complement of ``exclude``'s
    columns (orthonormal), by Lanczos with full reorthogonalization."""
    steps = min(max_iters, objective.size - (0 if exclude is None else exclude.shape[1]))
    basis = np.zeros((max(steps, 1), objective.size))

    def orthogonalize(w: np.ndarray, count: int) -> np.ndarray:
        for _ in range(2):  # twice is enough (Kahan-Parlett)
            if exclude is not None:
                w = w - exclude @ (exclude.T @ w)
            w = w - basis[:count].T @ (basis[:count] @ w)
        return w

    q = orthogonalize(rng.standard_normal(objective.size), 0)
    q /= np.linalg.norm(q)
    alphas: list[float] = []
    betas: list[float] = []
    previous = None
    for j in range(max(steps, 1)):
        basis[j] = q
        w = objective.hvp(q)
        alphas.append(float(w @ q))
        w = orthogonalize(w, j + 1)
        tridiagonal = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        ritz_values, ritz_vectors = np.linalg.eigh(tridiagonal)
        top = ritz_values[::-1][:k]
        beta = float(np.linalg.norm(w))
        converged = (
            previous is not None
            and len(top) == len(previous) == k
            and np.all(np.abs(top - previous) <= tol * np.maximum(np.abs(top), 1e-12))
        )
        if converged or beta < 1e-10 * max(1.0, abs(alphas[-1])) or j >= steps - 1:
            break
        previous = top
        betas.append(beta)
        q = w / beta
    order = np.argsort(ritz_values)[::-1][:k]
    return ritz_values[order], basis[: len(alphas)].T @ ritz_vectors[:, order]


def _worst_case(objective: _Objective, rho: float, adaptive: bool, steps: int) -> float:
    scale = np.abs(objective.w) if adaptive else np.ones_like(objective.w)
    base = objective.loss(objective.w)
    delta = np.zeros_like(objective.w)  # in the scaled space: δ = scale · delta
    best = 0.0
    for _ in range(steps):
        direction = scale * objective.gradient(objective.w + scale * delta)
        norm = np.linalg.norm(direction)
        if norm == 0.0:
            break
        delta = delta + (2.0 * rho / steps) * direction / norm
        length = np.linalg.norm(delta)
        if length > rho:
            delta *= rho / length
        best = max(best, objective.loss(objective.w + scale * delta) - base)
    return best


def _filter_normalized(objective: _Objective, rng: np.random.Generator) -> np.ndarray:
    parts = []
    for w in objective.unflatten(objective.w):
        if w.ndim < 2:
            parts.append(np.zeros_like(w))
            continue
        d = rng.standard_normal(w.shape)
        axes = tuple(range(w.ndim - 1))
        d_norm = np.sqrt(np.sum(d * d, axis=axes, keepdims=True))
        w_norm = np.sqrt(np.sum(w * w, axis=axes, keepdims=True))
        parts.append(d * w_norm / np.maximum(d_norm, 1e-12))
    return objective.flatten(parts)


def _target_weights(target: Any, objective: _Objective) -> list:
    if isinstance(target, keras.Model):
        target = [ops.convert_to_numpy(v.value) for v in target.trainable_variables]
    target = [np.asarray(t) for t in target]
    if [t.shape for t in target] != [tuple(s) for s in objective.shapes]:
        raise ValueError(
            "`target` must hold one array per trainable variable of `model`, with the same shapes."
        )
    return target
