"""Momentum-SAM, SGD-with-momentum flavour."""

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
class MSAM(MomentumPerturbationOptimizer):
    """Momentum-SAM: SGD with momentum, evaluated at a point perturbed along -momentum.

    The gradient of each step is taken at the stored weights ``w~``, which sit a distance
    ``rho`` from the clean weights ``w`` along the negative normalized momentum; the cost per
    step is that of SGD with momentum (one gradient, no extra memory but two scalars).

    Update rule (one step, ``g = grad L(w~_t)``, ``lr = learning_rate``, ``mu = momentum``,
    ``||.||`` one global L2 norm over all trained variables)::

        w_t     = w~_t + s_t * v_t                     # remove the stored perturbation
        w_t     = w_t - lr * wd * w_t                  # only if weight_decay is set
        v_{t+1} = mu * v_t + g
        w_{t+1} = w_t - lr * v_{t+1}
        s_{t+1} = rho_t / ||v_{t+1}||                  # 0 when ||v_{t+1}|| = 0
        w~_{t+1} = w_{t+1} - s_{t+1} * v_{t+1}         # stored in the model variables

    with ``v_0 = 0`` and ``s_0 = 0``, so the first step is exactly an SGD-momentum step. The
    scale actually applied, ``s``, is stored, so removal is exact for any ``rho`` schedule.

    Conventions (package choices):

    * Momentum is PyTorch's / the paper's ``v = mu*v + g; w -= lr*v``. Keras' ``SGD`` keeps
      ``lr`` inside the velocity; both agree for a constant learning rate, and with ``rho=0``
      this optimizer is Keras ``SGD(momentum=mu)`` (up to float rounding).
    * ``weight_decay`` is Keras' decoupled decay ``w -= lr*wd*w``, applied (before the step,
      as Keras' SGD does) to the **clean** weights, never to the perturbed ones. The paper's
      SGD code uses coupled L2 evaluated at the perturbed weights; to reproduce it, leave
      ``weight_decay=None`` and put ``keras.regularizers.L2(wd / 2)`` on the layers (the
      regularization loss is computed at the stored, perturbed weights, as in the paper).
    * The stored weights are perturbed between steps. ``fit`` returns clean weights (via
      ``finalize_variable_values``). For validation during ``fit``, ``ModelCheckpoint``,
      ``BackupAndRestore`` and ``EarlyStopping(restore_best_weights=True)`` add
      ``keras_sam.callbacks.MSAMCallback()`` *first* in ``callbacks``. In custom loops use
      ``with optimizer.unperturbed(): ...``. After training, BatchNorm statistics were
      gathered at perturbed weights: see ``keras_sam.callbacks.recalibrate_batchnorm``.

    Args:
        learning_rate: float, ``LearningRateSchedule`` or callable. Defaults to ``0.1``.
        momentum: float in ``[0, 1)``. Defaults to ``0.9``. With ``0`` the perturbation is
            along the current gradient.
        rho: perturbation radius, a float ``>= 0`` or a callable of the update step (e.g. a
            ``LearningRateSchedule``; ``rho = 0`` during warm-up is common). Defaults to
            ``0.3``. The paper's optimum is typically about 10x SAM's rho (e.g. 3 for
            WideResNets on CIFAR-100).
        nesterov: must be ``False``; Momentum-SAM defines no Nesterov variant.
        weight_decay: ``None`` or float ``>= 0``: decoupled decay on the clean weights.
            Defaults to ``None``.
        {{base_optimizer_keyword_args}}

    Raises:
        ValueError: if ``nesterov`` is true, ``momentum`` is outside ``[0, 1)``, ``rho`` is
            negative, NaN or infinite, or ``weight_decay`` is negative.
        TypeError: if an argument has the wrong type (e.g. a string ``rho``).

    Examples:
        >>> import keras, numpy as np, keras_sam
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> model.compile(
        ...     optimizer=keras_sam.optimizers.MSAM(learning_rate=0.1, momentum=0.9, rho=0.3),
        ...     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        ...     metrics=["accuracy"],
        ... )
        >>> x, y = np.random.rand(32, 4), np.random.randint(0, 3, 32)
        >>> history = model.fit(x, y, batch_size=8, epochs=2, validation_split=0.25, verbose=0,
        ...                     callbacks=[keras_sam.callbacks.MSAMCallback()])
        >>> sorted(history.history)
        ['accuracy', 'loss', 'val_accuracy', 'val_loss']

    References:
        Becker, Altrock, Risse, "Momentum-SAM: Sharpness Aware Minimization without
        Computational Overhead", https://arxiv.org/abs/2401.12033
    """

    def __init__(
        self,
        learning_rate: Any = 0.1,
        *,
        momentum: float = 0.9,
        rho: RhoLike = 0.3,
        nesterov: bool = False,
        weight_decay: float | None = None,
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
        momentum = check_real(momentum, "momentum", low=0.0, high=1.0, high_open=True)
        if not isinstance(nesterov, bool):
            raise TypeError(f"`nesterov` must be a bool, got {nesterov!r}.")
        if nesterov:
            raise ValueError(
                "`nesterov=True` is not supported: Momentum-SAM defines no Nesterov variant "
                "(the authors' code accepts the flag and ignores it). Use nesterov=False."
            )
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
        self.momentum = momentum
        self.nesterov = False

    def _build_slots(self, variables: list) -> None:
        self.momentums = self._add_slots(variables, "momentum")

    def _direction_slots(self) -> list:
        return self.momentums

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        """Clean weights, decoupled decay, momentum and SGD step for one variable."""
        dtype = variable.dtype
        gradient = ops.cast(ops.convert_to_tensor(gradient), dtype)
        lr = ops.cast(learning_rate, dtype)
        v = self.momentums[internals.variable_index(self, variable)]
        step = (self._applied_scale(dtype), lr, ops.cast(self.momentum, dtype), gradient)
        decay = self._decay_rate(variable, lr)

        def entrywise() -> None:
            weights, velocity = _fused_update(
                ops.convert_to_tensor(variable), ops.convert_to_tensor(v), *step, decay
            )
            self.assign(variable, weights)
            self.assign(v, velocity)

        if not backend.momentum_step_in_place(variable, v, *step, decay, entrywise):
            entrywise()

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"momentum": self.momentum, "nesterov": self.nesterov})
        return config


def _update(
    weights: Any,
    velocity: Any,
    scale: Any,
    lr: Any,
    momentum: Any,
    gradient: Any,
    decay: Any,
) -> tuple[Any, Any]:
    """The new ``(weights, velocity)`` of one variable: the update rule above, each
    entry whose gradient is not finite left at its clean weight and velocity."""
    clean = unperturbed(weights, scale, velocity)

    def velocity_after(momentum: Any) -> Any:
        return where_finite(gradient, ops.add(ops.multiply(velocity, momentum), gradient), velocity)

    new_velocity = velocity_after(momentum)
    stepped = ops.subtract(decayed(clean, decay), ops.multiply(lr, new_velocity))
    weights = where_finite(gradient, stepped, clean)
    return weights, slots_after(weights, velocity_after, (momentum,), new_velocity)


_fused_update = backend.fused(_update)


if MSAM.__doc__ is not None:  # None under python -OO
    MSAM.__doc__ = MSAM.__doc__.replace(
        "{{base_optimizer_keyword_args}}",
        internals.base_optimizer_keyword_args(),
    )
