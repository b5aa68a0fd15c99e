"""The few backend-specific pieces: computing losses and gradients.

Everything else in keras_sam is written with `keras.ops` and runs unchanged on
every backend; this package picks the implementation for the active one
(TensorFlow or JAX). On other backends (PyTorch) importing `keras_sam` works
(the Momentum-SAM optimizers need none of this), and constructing a train-step
wrapper raises `NotImplementedError` (`check_supported`).
"""

import importlib
from typing import Any

import keras

_BACKEND = keras.backend.backend()
SUPPORTED_BACKENDS = ("tensorflow", "jax")

_implementation = importlib.import_module(
    f"keras_sam.backend.{_BACKEND if _BACKEND in SUPPORTED_BACKENDS else 'unsupported'}"
)
all_reduce_sum = _implementation.all_reduce_sum
apply_gradients = _implementation.apply_gradients
apply_if_finite = _implementation.apply_if_finite
dispatched_train_function = _implementation.dispatched_train_function
forward_and_gradients = _implementation.forward_and_gradients
forward_and_sample_scores = _implementation.forward_and_sample_scores
function = _implementation.function
gradient = _implementation.gradient
hessian_vector_product = _implementation.hessian_vector_product
forward_gradients_and_sample_scores = _implementation.forward_gradients_and_sample_scores
loss_scale = _implementation.loss_scale
num_replicas = _implementation.num_replicas
snapshot = _implementation.snapshot
stateful_train_step = _implementation.stateful_train_step
stateless_gradients = _implementation.stateless_gradients
stateless_sample_scores = _implementation.stateless_sample_scores
stateless_uniform = _implementation.stateless_uniform


def check_supported(what: Any) -> None:
    """Raises `NotImplementedError` when ``what`` cannot train on the active backend."""
    if _BACKEND not in SUPPORTED_BACKENDS:
        name = what if isinstance(what, str) else type(what).__name__
        raise NotImplementedError(
            f"{name} supports the TensorFlow and JAX backends; the active Keras backend "
            f"is {_BACKEND!r}. Set KERAS_BACKEND=tensorflow or KERAS_BACKEND=jax before "
            "importing keras. (The Momentum-SAM optimizers, keras_sam.optimizers.MSAM and "
            "AdamWMSAM, need no backend-specific code.)"
        )


__all__ = [
    "SUPPORTED_BACKENDS",
    "all_reduce_sum",
    "apply_gradients",
    "apply_if_finite",
    "check_supported",
    "dispatched_train_function",
    "forward_and_gradients",
    "forward_and_sample_scores",
    "forward_gradients_and_sample_scores",
    "function",
    "gradient",
    "hessian_vector_product",
    "loss_scale",
    "num_replicas",
    "snapshot",
    "stateful_train_step",
    "stateless_gradients",
    "stateless_sample_scores",
    "stateless_uniform",
]
