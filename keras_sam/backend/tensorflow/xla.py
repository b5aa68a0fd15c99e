"""XLA under `tf.distribute.MirroredStrategy`: compile the gradients, not the step.

Keras compiles the whole replicated step when ``jit_compile=True``; under a
multi-device MirroredStrategy that fails even for a plain model (XLA cannot read a
variable placed on another device), and Keras' ``"auto"`` turns XLA off there. A
wrapper owns its step, so it can compile the parts that do the work — the clean
pass with its ascent gradient, and the perturbed pass — as nested XLA functions that
hold no collective, and keep the all-reduces and the optimizer update outside.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf


def compiles_inside_step(jit_compile: Any, strategy: Any) -> bool:
    """True when ``jit_compile=True`` meets a multi-replica, non-TPU TF strategy."""
    if jit_compile is not True or strategy is None:
        return False
    return strategy.num_replicas_in_sync > 1 and not isinstance(strategy, tf.distribute.TPUStrategy)


def xla_compiled(function: Callable) -> Callable:
    """``function`` XLA-compiled, with one `tf.function` per replica.

    Each replica's trace captures that replica's own variable copies; a single
    `tf.function` shared by the replica threads would reuse one replica's trace
    (and its variables) on the other device.
    """
    per_replica: dict[Any, Callable] = {}

    def call(*args: Any) -> Any:
        context = tf.distribute.get_replica_context()
        key = None if context is None else str(context.devices)
        if key not in per_replica:
            per_replica[key] = tf.function(function, jit_compile=True, reduce_retracing=True)
        return per_replica[key](*args)

    return call
