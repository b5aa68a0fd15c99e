"""The perturbation radius ρ: a non-negative float or a schedule of the step.

Every method in keras_sam takes ``rho`` the way Keras optimizers take
``learning_rate``: a number, or a callable of the (int) training step such as a
``keras.optimizers.schedules.LearningRateSchedule``. A ρ warm-up (ρ = 0 for the
first steps, as the Momentum-SAM authors do for ViTs) is for example
``keras.optimizers.schedules.PiecewiseConstantDecay([warmup_steps], [0.0, 0.05])``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import keras
from keras import ops

RhoLike = float | Callable[[Any], Any]


def validate_rho(rho: RhoLike, name: str = "rho") -> RhoLike:
    """Checks ``rho`` at construction time.

    Args:
        rho: a finite float >= 0, or a callable of the step.
        name: the argument name used in error messages.

    Returns:
        ``rho`` as a Python float, or the callable unchanged.

    Raises:
        TypeError: if ``rho`` is neither a real number nor a callable.
        ValueError: if ``rho`` is negative, NaN or infinite.
    """
    if isinstance(rho, bool):
        raise TypeError(f"`{name}` must be a float or a schedule, got the bool {rho!r}.")
    if isinstance(rho, numbers.Real):
        value = float(rho)
        if not math.isfinite(value) or value < 0.0:
            raise ValueError(f"`{name}` must be a finite number >= 0, got {rho!r}.")
        return value
    if callable(rho):
        return rho
    raise TypeError(
        f"`{name}` must be a float or a callable of the step (for example a "
        f"keras.optimizers.schedules.LearningRateSchedule), got {type(rho).__name__}."
    )


def rho_at(rho: RhoLike, step: Any) -> Any:
    """The value of ``rho`` at ``step`` as a float32 scalar tensor."""
    value = rho(step) if callable(rho) else rho
    return ops.cast(value, "float32")


def serialize_rho(rho: RhoLike) -> Any:
    """A config-friendly form of ``rho`` (floats stay floats)."""
    if isinstance(rho, float):
        return rho
    return keras.saving.serialize_keras_object(rho)


def deserialize_rho(config: Any) -> RhoLike:
    """Inverse of :func:`serialize_rho`."""
    if isinstance(config, numbers.Real):
        return float(config)
    return keras.saving.deserialize_keras_object(config)
