"""Whole-batch BatchNorm statistics for passes on a subset of the batch (K-SAM).

K-SAM's two passes run on the k chosen samples of a batch B. BatchNormalization
in training mode would normalize them with their own statistics, those of a
handful of the hardest samples, and the gradient would be that of a different
network. Instead, the ranking pass on the whole batch records, per BatchNorm
call and per sample i, the sums of the layer's inputs over the non-batch
reduction axes, shifted by the batch mean c: s1_i = Σ (x_i − c), s2_i = Σ (x_i − c)².
A subset pass then normalizes with the statistics of the whole batch in which the
chosen samples take their current values and the others keep the recorded ones:

.. math::

    \\mu = c + \\frac{R_1 + \\sum_{i \\in S} s_1(x_i)}{n}, \\quad
    \\sigma^2 = \\frac{R_2 + \\sum_{i \\in S} s_2(x_i)}{n} - (\\mu - c)^2,
    \\quad R_j = \\sum_{i \\notin S} s_j^{\\text{recorded}}(x_i)

with n the number of reduced elements of the whole batch, n_S the chosen samples'
share of them. The values are the whole batch's statistics. Their gradient is
estimated from the chosen samples, each standing for n / n_S elements: in the
sums above, ∂/∂x_i of a chosen sample's term is taken n / n_S times, so
∂μ/∂x_i = 1/n_S (the whole batch's BatchNorm gives 1/n to every one of its n
elements, and the others' sums depend on the weights too). Holding the others'
sums constant instead keeps only n_S / n of the statistics' gradient, the part
that keeps BatchNorm's gradient centred; on a pooled digits CNN (the demo's former
CNN; batch 64, 3 seeds) K-SAM with k = 16 reached 34 % test accuracy that way and
90 % with the estimate, SGD 98 % (this estimate is our choice; the paper does not
discuss BatchNorm). With S = B (k = |B|) both are exactly the batch's own
statistics and gradients, so K-SAM with k = |B| is SAM and, with ρ = 0, the base
optimizer. The shift keeps
E[x²] − μ² free of cancellation. Under tf.distribute each replica ranks and replays
its own shard; for a ``BatchNormalization(synchronized=True)`` layer the sums and
counts are summed over the replicas, so the statistics are the global batch's, as
the layer's own.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import keras
from keras import ops

from keras_sam import backend, internals

_recording = threading.local()  # per thread: MirroredStrategy runs replicas in threads


@contextlib.contextmanager
def record(model: keras.Model) -> Iterator[list]:
    """Inside, each BatchNorm call of ``model`` in training mode normalizes as usual
    and appends ``(c, s1, s2, m)`` to the yielded list: the shift, the per-sample
    shifted sums (see the module) and the number of elements each sample adds per
    channel; ``None`` for a masked call (which a subset pass leaves alone)."""
    sums: list = []

    def moments(layer: Any, inputs: Any, mask: Any, default: Callable) -> Any:
        mean, variance = default(inputs, mask)
        sums.append(None if mask is not None else (mean, *_sums(layer, inputs, mean)))
        return mean, variance

    previous = getattr(_recording, "sums", None)
    _recording.sums = sums
    try:
        with internals.batchnorm_moments_replaced(model, moments):
            yield sums
    finally:
        _recording.sums = previous


def being_recorded() -> list | None:
    """The list `record` appends to on this thread (None outside it). A backend whose
    pass runs inside a function transformation (`jax.grad`) returns its contents
    from the transformed function, so that they escape the transformation."""
    return getattr(_recording, "sums", None)


def rest_of_batch(recorded: list, chosen: Any, batch_size: Any) -> list:
    """What `replay` needs for the subset ``chosen`` (indices into the batch): per
    call, ``(c, R1, R2, n_rest)``, the recorded sums of the samples not chosen."""
    chosen_mask = ops.sum(ops.one_hot(chosen, batch_size, dtype="float32"), axis=0)
    rest = 1.0 - chosen_mask
    statistics: list[tuple | None] = []
    for entry in recorded:
        if entry is None:
            statistics.append(None)
            continue
        shift, s1, s2, per_sample = entry
        weights = ops.reshape(rest, (-1, *([1] * (len(s1.shape) - 1))))
        statistics.append(
            (
                shift,
                ops.sum(s1 * weights, axis=0),
                ops.sum(s2 * weights, axis=0),
                ops.sum(rest) * per_sample,
            )
        )
    return statistics


@contextlib.contextmanager
def replay(model: keras.Model, statistics: list) -> Iterator[None]:
    """Inside, the BatchNorm calls of ``model`` (in the recorded order) normalize a
    subset with the whole batch's statistics (`rest_of_batch`)."""
    queue = list(statistics)

    def moments(layer: Any, inputs: Any, mask: Any, default: Callable) -> Any:
        if not queue:
            raise RuntimeError("keras_sam.batchnorm: more BatchNorm calls than recorded")
        entry = queue.pop(0)
        if entry is None:
            return default(inputs, mask)
        shift, rest_1, rest_2, rest_count = entry
        s1, s2, live_count = _sums(layer, inputs, shift, per_sample=False)
        count = rest_count + live_count
        # The chosen samples stand for the whole batch in the statistics' gradient.
        s1, s2 = (_with_gradient_scaled(s, count / live_count) for s in (s1, s2))
        totals = [rest_1 + s1, rest_2 + s2, ops.cast(count, s1.dtype)]
        if getattr(layer, "synchronized", False):  # the global batch's, as the layer's own
            totals = backend.all_reduce_sum(totals)
        sum_1, sum_2, count = totals
        offset = sum_1 / count
        variance = sum_2 / count - ops.square(offset)
        return shift + offset, ops.maximum(variance, 0.0)

    with internals.batchnorm_moments_replaced(model, moments):
        yield


def _with_gradient_scaled(value: Any, factor: Any) -> Any:
    """``value`` unchanged, its gradient multiplied by ``factor``."""
    return ops.add(
        ops.multiply(value, factor), ops.stop_gradient(ops.multiply(value, 1.0 - factor))
    )


def _sums(layer: Any, inputs: Any, shift: Any, per_sample: bool = True) -> tuple:
    """``(Σ (x − c), Σ (x − c)², elements per channel)`` over the layer's reduction
    axes, with the batch axis kept (``per_sample``: the count is per sample) or
    summed too; ``c`` is treated as a constant when recording."""
    axes = sorted(internals.batchnorm_reduction_axes(layer))
    broadcast = shift
    for axis in axes:  # the moments have the reduced axes dropped
        broadcast = ops.expand_dims(broadcast, axis)
    if per_sample:
        broadcast = ops.stop_gradient(broadcast)
    centered = ops.subtract(inputs, broadcast)
    summed = [a for a in axes if a != 0] if per_sample else axes
    s1 = ops.sum(centered, axis=summed) if summed else centered
    s2 = ops.sum(ops.square(centered), axis=summed) if summed else ops.square(centered)
    count = ops.cast(ops.size(inputs), "float32") / ops.cast(ops.size(s1), "float32")
    return s1, s2, count
