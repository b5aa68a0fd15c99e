"""Momentum-SAM, AdamW flavour."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_sam import backend, internals
from keras_sam.ops import where_finite
from keras_sam.optimizers.momentum_perturbation import (
    MomentumPerturbationOptimizer,
    decayed,
    slots_after,
    unperturbed,
)
from keras_sam.rho import RhoLike
from keras_sam.validation import check_real


@keras.saving.register_keras_serializable(package="keras_sam")
class AdamWMSAM(MomentumPerturbationOptimizer):
    """Momentum-SAM with AdamW: gradients taken at a point perturbed along -(first moment).

    Update rule (one step ``t = 1, 2, ...``, ``g = grad L(w~)``, ``||.||`` one global L2 norm
    over all trained variables, ``m`` the *raw* first moment, without bias correction)::

        w      = w~ + s * m                               # remove the stored perturbation
        m      = m + (1 - beta_1) * (g - m)
        v      = v + (1 - beta_2) * (g**2 - v)
        w      = w - lr * sqrt(1 - beta_2**t) / (1 - beta_1**t) * m / (sqrt(v) + epsilon)
        w      = w - lr * wd * w                          # decoupled decay, after the step
        s      = rho_t / ||m||                            # 0 when ||m|| = 0
        w~     = w - s * m                                # stored in the model variables

    The first step is exactly an AdamW step (``m_0 = 0``). The stored ``s`` is exactly what is
    removed at the next step, so ``rho`` schedules (e.g. ``rho = 0`` during warm-up, as the
    authors do for ViTs) leave no residue.

    Conventions (package choices): weight decay acts on the clean weights *after* the Adam
    step (the authors' order; Keras' ``AdamW`` decays before, a difference of order
    ``lr**2 * wd``); ``epsilon`` is Keras' convention (added to ``sqrt(v)`` with the bias
    correction folded into the step size; PyTorch adds it to the bias-corrected ``sqrt(v)``).
    With ``rho=0`` and ``weight_decay=0`` this is Keras ``Adam`` up to float rounding (on
    TensorFlow without XLA the step is TensorFlow's in-place ``ResourceApplyAdam``, which
    forms ``1 - beta_2`` in float32: a relative 1.3e-5 in each second-moment update). For
    what the user must do about validation, checkpoints and BatchNorm, see ``MSAM``:
    add ``keras_sam.callbacks.MSAMCallback()`` first in ``fit``'s callbacks.

    Args:
        learning_rate: float, ``LearningRateSchedule`` or callable. Defaults to ``1e-3``.
        rho: perturbation radius, float ``>= 0`` or a callable of the update step.
            Defaults to ``0.3``.
        beta_1: float in ``[0, 1)``, first-moment decay. Defaults to ``0.9``.
        beta_2: float in ``[0, 1)``, second-moment decay. Defaults to ``0.999``.
        epsilon: float ``> 0``. Defaults to ``1e-7``.
        weight_decay: ``None`` or float ``>= 0``, decoupled. Defaults to ``0.004``.
        {{base_optimizer_keyword_args}}

    Raises:
        ValueError: if ``beta_1``/``beta_2`` are outside ``[0, 1)``, ``epsilon <= 0``,
            ``rho`` or ``weight_decay`` is negative, NaN or infinite.
        TypeError: if an argument has the wrong type.

    Examples:
        ρ switched on after a warm-up:

        >>> import keras, numpy as np, keras_sam
        >>> rho = keras.optimizers.schedules.PiecewiseConstantDecay([4], [0.0, 1.0])
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> model.compile(optimizer=keras_sam.optimizers.AdamWMSAM(1e-3, rho=rho, weight_decay=0.1),
        ...               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> x, y = np.random.rand(32, 4), np.random.randint(0, 3, 32)
        >>> history = model.fit(x, y, batch_size=8, epochs=2, validation_split=0.25, verbose=0,
        ...                     callbacks=[keras_sam.callbacks.MSAMCallback()])
        >>> len(history.history["val_loss"])
        2

    References:
        Becker, Altrock, Risse, "Momentum-SAM: Sharpness Aware Minimization without
        Computational Overhead", https://arxiv.org/abs/2401.12033
    """

    def __init__(
        self,
        learning_rate: Any = 1e-3,
        *,
        rho: RhoLike = 0.3,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        weight_decay: float | None = 0.004,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: int | None = None,
        loss_scale_factor: float | None = None,
        gradient_accumulation_steps: int | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        beta_1 = check_real(beta_1, "beta_1", low=0.0, high=1.0, high_open=True)
        beta_2 = check_real(beta_2, "beta_2", low=0.0, high=1.0, high_open=True)
        epsilon = check_real(epsilon, "epsilon", low=0.0, low_open=True)
        super().__init__(
            learning_rate=learning_rate,
            rho=rho,
            name=name,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            **kwargs,
        )
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon

    def _build_slots(self, variables: list) -> None:
        self.momentums = self._add_slots(variables, "momentum")
        self.velocities = self._add_slots(variables, "velocity")

    def _direction_slots(self) -> list:
        return self.momentums

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """Clean weights, Adam moments and step, then decoupled decay, for one variable."""
        dtype = variable.dtype
        gradient = ops.cast(ops.convert_to_tensor(gradient), dtype)
        lr = ops.cast(learning_rate, dtype)
        local_step = ops.cast(self.iterations + 1, dtype)
        beta_powers = (
            ops.power(ops.cast(self.beta_1, dtype), local_step),
            ops.power(ops.cast(self.beta_2, dtype), local_step),
        )
        index = internals.variable_index(self, variable)
        m = self.momentums[index]
        v = self.velocities[index]
        scale = self._applied_scale(dtype)
        epsilon = ops.cast(self.epsilon, dtype)
        decay = self._decay_rate(variable, lr)
        betas = (ops.cast(self.beta_1, dtype), ops.cast(self.beta_2, dtype))

        def entrywise() -> None:
            rates = (ops.cast(1.0 - self.beta_1, dtype), ops.cast(1.0 - self.beta_2, dtype))
            values = [ops.convert_to_tensor(x) for x in (variable, m, v)]
            weights, new_m, new_v = _fused_update(
                *values, scale, lr, rates, beta_powers, epsilon, gradient, decay
            )
            self.assign(variable, weights)
            self.assign(m, new_m)
            self.assign(v, new_v)

        if not backend.adam_step_in_place(
            variable, m, v, scale, lr, betas, beta_powers, epsilon, gradient, decay, entrywise
        ):
            entrywise()

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon})
        return config


def _update(
    weights: Any,
    m: Any,
    v: Any,
    scale: Any,
    lr: Any,
    rates: tuple[Any, Any],
    beta_powers: tuple[Any, Any],
    epsilon: Any,
    gradient: Any,
    decay: Any,
) -> tuple[Any, Any, Any]:
    """The new ``(weights, m, v)`` of one variable: the update rule above, with
    ``rates`` ``(1 - beta_1, 1 - beta_2)`` and ``beta_powers`` ``(beta_1^t, beta_2^t)``;
    each entry whose gradient is not finite left at its clean weight and moments."""
    clean = unperturbed(weights, scale, m)

    def moments(rate_1: Any, rate_2: Any) -> tuple:
        # m * (1 - r) + g * r: no subexpression but the gradient is shared between
        # the weights' update and the moments' (`slots_after`), so XLA keeps none.
        return (
            where_finite(
                gradient, ops.add(ops.multiply(m, 1.0 - rate_1), ops.multiply(gradient, rate_1)), m
            ),
            where_finite(
                gradient,
                ops.add(ops.multiply(v, 1.0 - rate_2), ops.multiply(ops.square(gradient), rate_2)),
                v,
            ),
        )

    new_m, new_v = moments(*rates)
    alpha = lr * ops.sqrt(1.0 - beta_powers[1]) / (1.0 - beta_powers[0])
    step = ops.divide(ops.multiply(new_m, alpha), ops.add(ops.sqrt(new_v), epsilon))
    weights = where_finite(gradient, decayed(ops.subtract(clean, step), decay), clean)
    return (weights, *slots_after(weights, moments, rates, (new_m, new_v)))


_fused_update = backend.fused(_update)


if AdamWMSAM.__doc__ is not None:  # None under python -OO
    AdamWMSAM.__doc__ = AdamWMSAM.__doc__.replace(
        "{{base_optimizer_keyword_args}}",
        internals.base_optimizer_keyword_args(),
    )
