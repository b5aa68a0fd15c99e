"""GSAM: Surrogate Gap Guided Sharpness-Aware Minimization (Zhuang et al. 2022)."""

from __future__ import annotations

from typing import Any

import keras

from keras_sam import rho as rho_lib
from keras_sam.models.trainer import Ascent, Descent, SharpnessAwareTrainer
from keras_sam.ops import surrogate_gap_descent
from keras_sam.validation import check_real


@keras.saving.register_keras_serializable(package="keras_sam")
class GSAM(SharpnessAwareTrainer):
    r"""GSAM: SAM's gradient minus the clean gradient's part orthogonal to it.

    With g = ∇L(w), ε = ρ g/‖g‖ and g_s = ∇L(w + ε):

    .. math::

        \cos = \frac{\langle g, g_s \rangle}{\lVert g_s\rVert\lVert g\rVert + 10^{-12}},
        \quad
        g_\perp = g - \cos\,\lVert g\rVert \frac{g_s}{\lVert g_s\rVert + 10^{-12}},
        \quad
        w \leftarrow \mathrm{opt}(w,\ g_s - \alpha\, g_\perp)

    Descending along −g⊥ lowers the surrogate gap L(w + ε) − L(w) without
    changing the perturbed loss to first order. α = 0 is SAM. GSAM pairs this
    with a ρ that follows the learning rate: pass
    ``rho=keras_sam.rho.ProportionalToLearningRate(rho_max, rho_min, lr_max, lr_min)``.
    Norms and the inner product are global over all variables (as the authors'
    code). With ``perturbation_scope="global"`` the decomposition uses the
    gradients summed over replicas; with ``"replica"`` each replica's own.

    Cost: SAM's (two forward/backward passes) plus a few reductions.

    Args:
        model: the `keras.Model` to train.
        rho: radius ρ >= 0 (float, schedule or `ProportionalToLearningRate`).
            Defaults to `0.05`.
        alpha: α >= 0, the weight of the orthogonal correction. Defaults to
            `0.1` (the paper uses 0.01 for ResNets and 0.4–1.0 for ViTs).
        **kwargs: the options every wrapper takes (``perturbation_scope``,
            ``perturb``, ``num_batch_splits``; see `SharpnessAwareTrainer`) and
            `keras.Model`'s (e.g. ``name``).

    Raises:
        TypeError: ``model`` not a `keras.Model`; ``alpha`` not a number.
        ValueError: ``alpha`` negative or not finite; bad ``rho``.

    Examples:
        >>> import keras, numpy as np, keras_sam
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> trainer = keras_sam.GSAM(model, rho=0.05, alpha=0.1)
        >>> trainer.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        ...                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> x, y = np.random.rand(32, 4), np.random.randint(0, 3, 32)
        >>> history = trainer.fit(x, y, batch_size=8, epochs=2, verbose=0)
        >>> len(history.history["loss"])
        2

    References:
        Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda, Duncan, Liu.
        Surrogate Gap Guided Sharpness-Aware Minimization. ICLR 2022.
        [arXiv:2203.08065](https://arxiv.org/abs/2203.08065)
    """

    uses_clean_gradient = True

    def __init__(
        self,
        model: keras.Model,
        *,
        rho: rho_lib.RhoLike = 0.05,
        alpha: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, rho=rho, **kwargs)
        self.alpha = check_real(alpha, "alpha", low=0.0)

    def descent(self, ascent: Ascent, grads: list, state_before: list) -> Descent:
        sam_grads = self.perturbed_gradients(ascent, self.epsilon(grads), state_before)
        direction = surrogate_gap_descent(grads, self.to_global(sam_grads), self.alpha)
        return Descent(self.to_replica(direction))

    def get_config(self) -> dict:
        config = super().get_config()
        config["alpha"] = self.alpha
        return config
