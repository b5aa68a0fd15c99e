"""Sharpness of trained weights, written with `keras.ops` (only the gradient is backend code:
TensorFlow or JAX).

Two measures of the loss landscape around the final (clean) weights ``w`` on a fixed
evaluation batch, with the model in inference mode (BatchNorm uses its moving
statistics, so the measure depends only on the weights):

* **ascent sharpness** at radius ρ: ``L(w + ρ g/‖g‖) − L(w)`` with ``g = ∇L(w)``, the
  first-order worst case in the ρ-ball that SAM minimizes (one global L2 norm);
* **random filter-normalized sharpness** at relative radius α: the mean over a few
  random Gaussian directions ``d`` of ``L(w + α d) − L(w)``, where ``d`` is
  filter-normalized as in Li et al. 2018 ("Visualizing the Loss Landscape of Neural
  Nets"): each filter (slice along the last axis of a kernel) of ``d`` is rescaled to
  the norm of the same filter of ``w``, and ``d = 0`` on 1-D variables (biases,
  normalization γ/β). Filter normalization makes the measure invariant to the
  rescaling of weights that BatchNorm and ReLU allow, so networks trained with
  different methods are comparable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops


def _gradient(fn: Callable[[list], Any], values: list) -> list:
    if keras.backend.backend() == "jax":
        import jax

        return jax.grad(fn)(values)
    if keras.backend.backend() != "tensorflow":
        raise NotImplementedError(
            "benchmarks.sharpness needs the TensorFlow or the JAX backend."
        )
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch(values)
        loss = fn(values)
    return tape.gradient(loss, values)


def filter_normalized_direction(
    weights: Sequence[Any], rng: np.random.Generator
) -> list[np.ndarray]:
    """A random direction with each filter's norm equal to that filter's weight norm."""
    direction = []
    for w in weights:
        w = np.asarray(ops.convert_to_numpy(w), "float64")
        if w.ndim < 2:
            direction.append(np.zeros_like(w, "float32"))
            continue
        d = rng.standard_normal(w.shape)
        axes = tuple(range(w.ndim - 1))
        d_norm = np.sqrt(np.sum(d * d, axis=axes, keepdims=True))
        w_norm = np.sqrt(np.sum(w * w, axis=axes, keepdims=True))
        direction.append((d * w_norm / np.maximum(d_norm, 1e-12)).astype("float32"))
    return direction


def sharpness(
    model: keras.Model,
    x: Any,
    y: Any,
    rho: float = 0.05,
    alpha: float = 0.1,
    num_random: int = 5,
    seed: int = 0,
    loss: Any = None,
) -> dict:
    """Ascent and random filter-normalized sharpness of ``model`` on ``(x, y)``.

    Args:
        model: a built `keras.Model` (its current weights are measured, not changed).
        x, y: the evaluation batch.
        rho: radius of the ascent step (absolute L2 norm over all trainable weights).
        alpha: relative radius of the random filter-normalized directions.
        num_random: number of random directions averaged.
        seed: seed of the random directions.
        loss: a Keras loss; default sparse categorical cross-entropy on logits.

    Returns:
        ``{"loss", "ascent", "random", "random_std", "grad_norm", "weight_norm"}``.
    """
    loss = loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    trainable = [ops.convert_to_tensor(v.value) for v in model.trainable_variables]
    non_trainable = [ops.convert_to_tensor(v.value) for v in model.non_trainable_variables]
    x = ops.convert_to_tensor(x)
    y = ops.convert_to_tensor(y)

    def loss_at(values: list) -> Any:
        y_pred, _ = model.stateless_call(values, non_trainable, x, training=False)
        return loss(y, y_pred)

    base = float(ops.convert_to_numpy(loss_at(trainable)))
    grads = _gradient(loss_at, trainable)
    grad_norm = ops.sqrt(sum(ops.sum(ops.square(g)) for g in grads))
    scale = rho / ops.maximum(grad_norm, 1e-12)
    ascent = float(ops.convert_to_numpy(loss_at([w + scale * g for w, g in zip(trainable, grads)])))
    rng = np.random.default_rng(seed)
    increases = []
    for _ in range(num_random):
        direction = filter_normalized_direction(trainable, rng)
        moved = [w + alpha * ops.convert_to_tensor(d) for w, d in zip(trainable, direction)]
        increases.append(float(ops.convert_to_numpy(loss_at(moved))) - base)
    weight_norm = float(
        np.sqrt(sum(np.sum(np.square(ops.convert_to_numpy(w))) for w in trainable))
    )
    return {
        "loss": base,
        "ascent": ascent - base,
        "random": float(np.mean(increases)),
        "random_std": float(np.std(increases)),
        "grad_norm": float(ops.convert_to_numpy(grad_norm)),
        "weight_norm": weight_norm,
    }
