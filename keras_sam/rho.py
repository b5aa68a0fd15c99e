"""The perturbation radius ρ: a non-negative float or a schedule of the step.

Every method in keras_sam takes ``rho`` the way Keras optimizers take
``learning_rate``: a number, or a callable of the (int) training step such as a
``keras.optimizers.schedules.LearningRateSchedule``. A ρ warm-up (ρ = 0 for the
first steps, as the Momentum-SAM authors do for ViTs) is for example
``keras.optimizers.schedules.PiecewiseConstantDecay([warmup_steps], [0.0, 0.05])``.
`ProportionalToLearningRate` makes ρ follow the optimizer's learning rate
instead (GSAM's schedule).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from keras_sam.validation import check_real

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

    Examples:
        >>> validate_rho(1)
        1.0
        >>> validate_rho(-0.1)
        Traceback (most recent call last):
        ...
        ValueError: `rho` must be a finite number in [0, inf), got -0.1.
    """
    if isinstance(rho, numbers.Real):
        return check_real(rho, name, low=0.0)  # refuses bools too
    if callable(rho):
        return rho
    raise TypeError(
        f"`{name}` must be a float or a callable of the step (for example a "
        f"keras.optimizers.schedules.LearningRateSchedule), got {type(rho).__name__}."
    )


def rho_at(rho: RhoLike, step: Any, learning_rate: Callable[[], Any] | None = None) -> Any:
    """The value of ``rho`` at ``step`` as a float32 scalar tensor.

    ``learning_rate`` returns the optimizer's current learning rate; it is called
    only for a `ProportionalToLearningRate` ρ.

    Examples:
        >>> import keras
        >>> float(rho_at(0.05, step=10))
        0.05000000074505806
        >>> float(rho_at(keras.optimizers.schedules.PiecewiseConstantDecay([5], [0.1, 0.2]), 10))
        0.20000000298023224
    """
    if isinstance(rho, ProportionalToLearningRate):
        if learning_rate is None:
            raise ValueError(
                "`rho`: ProportionalToLearningRate needs the optimizer's learning rate."
            )
        return rho.at_learning_rate(learning_rate())
    value = rho(step) if callable(rho) else rho
    return ops.cast(value, "float32")


@keras.saving.register_keras_serializable(package="keras_sam")
class ProportionalToLearningRate:
    r"""ρ that follows the learning rate (GSAM's ρ_t, Zhuang et al. 2022).

    .. math::

        \rho_t = \rho_{min} + (\rho_{max} - \rho_{min})
                 \frac{lr_t - lr_{min}}{lr_{max} - lr_{min}}

    with lr_t the optimizer's learning rate at the step (after its schedule).
    Any wrapper accepts it as ``rho``; the value is not clipped, so an lr_t
    outside [lr_min, lr_max] extrapolates linearly, as in the authors' code.

    Args:
        rho_max: ρ when the learning rate is ``lr_max`` (>= 0).
        rho_min: ρ when the learning rate is ``lr_min`` (>= 0).
        lr_max: the schedule's largest learning rate.
        lr_min: its smallest learning rate (``lr_min != lr_max``).

    Raises:
        TypeError: an argument is not a real number.
        ValueError: a negative or non-finite value, or ``lr_min == lr_max``.

    Examples:
        >>> rho = ProportionalToLearningRate(rho_max=0.04, rho_min=0.02, lr_max=1.6, lr_min=0.016)
        >>> round(float(rho.at_learning_rate(0.808)), 4)
        0.03

    References:
        Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda, Duncan, Liu.
        Surrogate Gap Guided Sharpness-Aware Minimization. ICLR 2022.
        [arXiv:2203.08065](https://arxiv.org/abs/2203.08065)
    """

    def __init__(self, rho_max: float, rho_min: float, lr_max: float, lr_min: float) -> None:
        self.rho_max = check_real(rho_max, "rho_max", low=0.0)
        self.rho_min = check_real(rho_min, "rho_min", low=0.0)
        self.lr_max = check_real(lr_max, "lr_max")
        self.lr_min = check_real(lr_min, "lr_min")
        if self.lr_max == self.lr_min:
            raise ValueError(f"`lr_max` and `lr_min` must differ, both are {lr_max!r}.")

    def at_learning_rate(self, learning_rate: Any) -> Any:
        """ρ_t for the learning rate ``learning_rate`` (a float32 scalar)."""
        fraction = (ops.cast(learning_rate, "float32") - self.lr_min) / (self.lr_max - self.lr_min)
        return ops.cast(self.rho_min + (self.rho_max - self.rho_min) * fraction, "float32")

    def __call__(self, step: Any) -> Any:
        raise TypeError(
            "ProportionalToLearningRate depends on the learning rate, not on the step; "
            "pass it as `rho` to a keras_sam wrapper, which reads the optimizer's rate."
        )

    def get_config(self) -> dict:
        return {
            "rho_max": self.rho_max,
            "rho_min": self.rho_min,
            "lr_max": self.lr_max,
            "lr_min": self.lr_min,
        }

    @classmethod
    def from_config(cls, config: dict) -> ProportionalToLearningRate:
        return cls(**config)


def serialize_rho(rho: RhoLike) -> Any:
    """A config-friendly form of ``rho`` (floats stay floats).

    Examples:
        >>> serialize_rho(0.05)
        0.05
        >>> serialize_rho(ProportionalToLearningRate(0.04, 0.02, 1.0, 0.1))["class_name"]
        'ProportionalToLearningRate'
    """
    if isinstance(rho, float):
        return rho
    return keras.saving.serialize_keras_object(rho)


def deserialize_rho(config: Any) -> RhoLike:
    """Inverse of `serialize_rho`.

    Examples:
        >>> rho = ProportionalToLearningRate(0.04, 0.02, 1.0, 0.1)
        >>> deserialize_rho(serialize_rho(rho)).get_config() == rho.get_config()
        True
    """
    if isinstance(config, numbers.Real):
        return float(config)
    return keras.saving.deserialize_keras_object(config)
