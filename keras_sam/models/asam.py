"""ASAM: Adaptive Sharpness-Aware Minimization (Kwon et al. 2021)."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_sam import rho as rho_lib
from keras_sam.models.trainer import SharpnessAwareTrainer
from keras_sam.ops import dual_vector
from keras_sam.validation import check_real

#: Variable names that get T_w = 1 (no adaptive scaling): biases and the shift of
#: normalization layers, as in the ASAM authors' code (which scales "weight" only).
NON_ADAPTIVE_NAMES = ("bias", "beta")


@keras.saving.register_keras_serializable(package="keras_sam")
class ASAM(SharpnessAwareTrainer):
    r"""Adaptive SAM: the ρ-ball is rescaled element-wise by the weights.

    .. math::

        T_w = |w| + \eta, \quad
        \epsilon = \rho \, \frac{T_w^2 \, g}{\lVert T_w \, g \rVert_2}, \quad
        w \leftarrow \mathrm{opt}\big(w, \nabla L_B(w + \epsilon)\big)

    T_w = 1 for biases and normalization shifts (Keras variables named ``bias``
    or ``beta``), as in the authors' code. The norm is global over all variables.
    ρ is about 10× SAM's (0.5 on CIFAR-10, 1.0 on CIFAR-100).

    Args:
        model: the `keras.Model` to train.
        rho: radius ρ >= 0 (float or a schedule of the step). Defaults to `0.5`.
        eta: η >= 0 added to |w| (η = 0 allowed). Defaults to `0.01`.
        **kwargs: the options every wrapper takes (``perturbation_scope``,
            ``perturb``, ``num_batch_splits``; see `SharpnessAwareTrainer`) and
            `keras.Model`'s (e.g. ``name``).

    Raises:
        TypeError: ``model`` not a `keras.Model`; ``rho`` or ``eta`` of a wrong type.
        ValueError: ``rho`` or ``eta`` negative, NaN or infinite.

    Examples:
        >>> import keras, numpy as np, keras_sam
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> trainer = keras_sam.ASAM(model, rho=0.5, eta=0.01)
        >>> trainer.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        ...                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> x, y = np.random.rand(32, 4), np.random.randint(0, 3, 32)
        >>> history = trainer.fit(x, y, batch_size=8, epochs=2, verbose=0)
        >>> len(history.history["loss"])
        2

    References:
        Kwon, Kim, Park, Choi. ASAM: Adaptive Sharpness-Aware Minimization for
        Scale-Invariant Learning of Deep Neural Networks. ICML 2021.
        [arXiv:2102.11600](https://arxiv.org/abs/2102.11600)
    """

    def __init__(
        self,
        model: keras.Model,
        *,
        rho: rho_lib.RhoLike = 0.5,
        eta: float = 0.01,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, rho=rho, **kwargs)
        self.eta = check_real(eta, "eta", low=0.0)

    def perturbation(self, grads: list, variables: list) -> list:
        scales = [
            None if v.name in NON_ADAPTIVE_NAMES else ops.abs(v.value) + self.eta for v in variables
        ]
        return dual_vector(grads, self.current_rho(), scales)

    def get_config(self) -> dict:
        config = super().get_config()
        config["eta"] = self.eta
        return config
