"""Keras backends that cannot train a model (``numpy``, ``openvino``): placeholders.

`import keras_sam` works on every Keras backend. On these, whose trainers have no
``fit``, the train-step wrappers refuse to be constructed
(`keras_sam.backend.check_supported`) and the functions they would call raise the
same error; `apply_if_finite`, `apply_gated` and the single-copy variable updates of
`keras_sam.backend.common` are real, so the Momentum-SAM optimizers' own code runs.
"""

from __future__ import annotations

from typing import Any

from keras_sam.backend import common
from keras_sam.backend.common import (
    builds_model_in_first_step,
    check_jit_compile,
    compiles_inside_step,
    cross_replica_call,
    is_multi_worker,
    loss_scale,
    stateful_train_step,
    update_variable,
    xla_compiled,
)

apply_if_finite = common.apply_if_finite_on_host
apply_gated = common.apply_gated
traced_for_xla = common.never_traced_for_xla
sequenced = common.unsequenced
fused = common.unfused
allocator_probe = common.no_allocator_probe
momentum_step_in_place = common.no_step_in_place
adam_step_in_place = common.no_step_in_place
shift_in_place = common.no_step_in_place


def _unsupported(*args: Any, **kwargs: Any) -> Any:
    from keras_sam.backend import check_supported

    check_supported("keras_sam's train-step wrappers")


all_reduce_sum = apply_gradients = forward_and_gradients = _unsupported
dispatched_train_function = forward_and_sample_scores = _unsupported
num_replicas = snapshot = stateless_gradients = _unsupported
forward_gradients_and_sample_scores = stateless_sample_scores = stateless_uniform = _unsupported
function = gradient = hessian_vector_product = _unsupported

__all__ = [  # the shared pieces of the interface, re-exported
    "builds_model_in_first_step",
    "check_jit_compile",
    "compiles_inside_step",
    "cross_replica_call",
    "is_multi_worker",
    "loss_scale",
    "stateful_train_step",
    "update_variable",
    "xla_compiled",
]
