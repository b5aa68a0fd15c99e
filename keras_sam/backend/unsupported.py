"""Placeholders for Keras backends keras_sam's train-step wrappers do not support (PyTorch).

`import keras_sam` works on every backend; the wrappers refuse to be constructed
(`keras_sam.backend.check_supported`). The Momentum-SAM optimizers need only
`apply_if_finite`, which works eagerly here.
"""

from __future__ import annotations

from typing import Any

from keras import ops


def apply_if_finite(apply_fn: Any, grads: list, variables: Any, finite: Any) -> None:
    """``apply_fn(grads, variables)`` only when ``finite`` holds (eager Python branch)."""
    if bool(ops.convert_to_numpy(finite)):
        apply_fn(grads, variables)


def stateful_train_step(step: Any) -> Any:
    """Identity: construction of a wrapper already raised on this backend."""
    return step


def _unsupported(*args: Any, **kwargs: Any) -> Any:
    from keras_sam.backend import check_supported

    check_supported("keras_sam's train-step wrappers")


all_reduce_sum = apply_gradients = forward_and_gradients = _unsupported
dispatched_train_function = forward_and_sample_scores = _unsupported
loss_scale = num_replicas = snapshot = stateless_gradients = _unsupported
forward_gradients_and_sample_scores = stateless_sample_scores = stateless_uniform = _unsupported
function = gradient = hessian_vector_product = _unsupported
