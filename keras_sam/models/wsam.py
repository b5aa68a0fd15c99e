"""WSAM: Weighted Sharpness as a regularization term (Yue et al. 2023)."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_sam import backend
from keras_sam import rho as rho_lib
from keras_sam.models.trainer import Ascent, Descent, SharpnessAwareTrainer
from keras_sam.validation import check_real


@keras.saving.register_keras_serializable(package="keras_sam")
class WSAM(SharpnessAwareTrainer):
    r"""WSAM: the base optimizer on the clean loss plus a weighted sharpness step.

    WSAM minimizes L(w) + γ/(1 − γ)·(L(w + ε) − L(w)). Decoupled, as in the
    authors' code: the optimizer steps with the clean gradient g alone, then the
    sharpness gradient is subtracted outside the optimizer's state (no momentum,
    no adaptive scaling):

    .. math::

        \epsilon = \rho \frac{g}{\lVert g\rVert}, \quad
        g_s = \nabla L(w + \epsilon), \quad
        w \leftarrow \mathrm{opt}(w, g), \quad
        w \leftarrow w - \eta_t \frac{\gamma}{1-\gamma}\,(g_s - g)

    η_t is the optimizer's learning rate of the step just taken (read before the
    step, so schedules are followed). γ = 0 is the base optimizer; γ = 1/2 gives
    the optimizer g and adds g_s − g undamped. Under `tf.distribute` the
    sharpness term is averaged over replicas (every replica writes the same
    weights).

    Cost: SAM's (two forward/backward passes).

    Args:
        model: the `keras.Model` to train.
        rho: radius ρ >= 0 (float or a schedule of the step). Defaults to `0.05`.
        gamma: γ in [0, 1), the weight of the sharpness term. Defaults to `0.9`.
        **kwargs: the options every wrapper takes (``perturbation_scope``,
            ``perturb``, ``num_batch_splits``; see `SharpnessAwareTrainer`) and
            `keras.Model`'s (e.g. ``name``).

    Raises:
        TypeError: ``model`` not a `keras.Model`; ``gamma`` not a number.
        ValueError: ``gamma`` outside [0, 1); bad ``rho``.

    Examples:
        >>> import keras, numpy as np, keras_sam
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> trainer = keras_sam.WSAM(model, rho=0.05, gamma=0.9)
        >>> trainer.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        ...                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> x, y = np.random.rand(32, 4), np.random.randint(0, 3, 32)
        >>> history = trainer.fit(x, y, batch_size=8, epochs=2, verbose=0)
        >>> len(history.history["loss"])
        2

    References:
        Yue, Jiang, Ye, Gao, Liu, Zhang. Sharpness-Aware Minimization
        Revisited: Weighted Sharpness as a Regularization Term. KDD 2023.
        [arXiv:2305.15817](https://arxiv.org/abs/2305.15817)
    """

    uses_clean_gradient = True

    def __init__(
        self,
        model: keras.Model,
        *,
        rho: rho_lib.RhoLike = 0.05,
        gamma: float = 0.9,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, rho=rho, **kwargs)
        self.gamma = check_real(gamma, "gamma", low=0.0, high=1.0, high_open=True)

    def descent(self, ascent: Ascent, grads: list, state_before: list) -> Descent:
        sam_grads = self.perturbed_gradients(ascent, self.epsilon(grads), state_before)
        if self.perturbation_scope == "global":  # grads are already the global ones
            sharpness = _difference(self.to_global(sam_grads), grads)
        else:  # the same update on every replica: their mean
            sharpness = backend.all_reduce_sum(_difference(sam_grads, grads))
        learning_rate = ops.cast(self.optimizer.learning_rate, "float32")
        factor = learning_rate * (self.gamma / (1.0 - self.gamma))
        decoupled = [None if d is None else factor * d for d in sharpness]
        return Descent(self.to_replica(grads), decoupled)

    def get_config(self) -> dict:
        config = super().get_config()
        config["gamma"] = self.gamma
        return config


def _difference(a: list, b: list) -> list:
    return [None if x is None or y is None else x - y for x, y in zip(a, b)]
