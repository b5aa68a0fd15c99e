"""The one boundary between keras_sam and a Keras backend.

`keras_sam.backend.interface.Backend` lists the functions keras_sam's methods
need from a backend; ``keras_sam/backend/<name>/`` implements them for one
(``tensorflow``, ``jax``, ``torch``; ``unsupported`` holds the placeholders used
on Keras backends that cannot train a model, ``numpy`` and ``openvino``). This
package re-exports the implementation of the active Keras backend, so ``from
keras_sam import backend`` followed by ``backend.forward_and_gradients(...)`` runs
the right one.
Everything outside this package is written with `keras.ops` and imports no
backend library.
"""

from __future__ import annotations

import importlib
from typing import Any

import keras

from keras_sam.backend.common import loss_scale
from keras_sam.backend.interface import FUNCTIONS

_BACKEND = keras.backend.backend()
#: The backends whose train-step wrappers are supported.
SUPPORTED_BACKENDS = ("tensorflow", "jax", "torch")

_implementation = importlib.import_module(
    f"keras_sam.backend.{_BACKEND if _BACKEND in SUPPORTED_BACKENDS else 'unsupported'}"
)
stateful_train_step = _implementation.stateful_train_step
dispatched_train_function = _implementation.dispatched_train_function
check_jit_compile = _implementation.check_jit_compile
compiles_inside_step = _implementation.compiles_inside_step
xla_compiled = _implementation.xla_compiled
snapshot = _implementation.snapshot
num_replicas = _implementation.num_replicas
all_reduce_sum = _implementation.all_reduce_sum
apply_if_finite = _implementation.apply_if_finite
apply_gated = _implementation.apply_gated
traced_for_xla = _implementation.traced_for_xla
sequenced = _implementation.sequenced
fused = _implementation.fused
allocator_probe = _implementation.allocator_probe
momentum_step_in_place = _implementation.momentum_step_in_place
adam_step_in_place = _implementation.adam_step_in_place
shift_in_place = _implementation.shift_in_place
apply_gradients = _implementation.apply_gradients
forward_and_gradients = _implementation.forward_and_gradients
forward_and_sample_scores = _implementation.forward_and_sample_scores
forward_gradients_and_sample_scores = _implementation.forward_gradients_and_sample_scores
stateless_gradients = _implementation.stateless_gradients
stateless_sample_scores = _implementation.stateless_sample_scores
stateless_uniform = _implementation.stateless_uniform
cross_replica_call = _implementation.cross_replica_call
update_variable = _implementation.update_variable
is_multi_worker = _implementation.is_multi_worker
builds_model_in_first_step = _implementation.builds_model_in_first_step
function = _implementation.function
gradient = _implementation.gradient
hessian_vector_product = _implementation.hessian_vector_product


def check_supported(what: Any) -> None:
    """Raises `NotImplementedError` when ``what`` cannot train on the active backend."""
    if _BACKEND not in SUPPORTED_BACKENDS:
        name = what if isinstance(what, str) else type(what).__name__
        raise NotImplementedError(
            f"{name} supports the TensorFlow, JAX and PyTorch backends; the active Keras "
            f"backend is {_BACKEND!r}, which cannot train a model. Set KERAS_BACKEND to "
            "tensorflow, jax or torch before importing keras."
        )


__all__ = [
    "FUNCTIONS",
    "SUPPORTED_BACKENDS",
    "adam_step_in_place",
    "all_reduce_sum",
    "allocator_probe",
    "apply_gated",
    "apply_gradients",
    "apply_if_finite",
    "builds_model_in_first_step",
    "check_jit_compile",
    "check_supported",
    "compiles_inside_step",
    "cross_replica_call",
    "dispatched_train_function",
    "forward_and_gradients",
    "forward_and_sample_scores",
    "forward_gradients_and_sample_scores",
    "function",
    "fused",
    "gradient",
    "hessian_vector_product",
    "is_multi_worker",
    "loss_scale",
    "momentum_step_in_place",
    "num_replicas",
    "sequenced",
    "shift_in_place",
    "snapshot",
    "stateful_train_step",
    "stateless_gradients",
    "stateless_sample_scores",
    "stateless_uniform",
    "traced_for_xla",
    "update_variable",
    "xla_compiled",
]
