"""Friendly-SAM: perturb without the full-gradient component (Li et al. 2024)."""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from keras_sam import rho as rho_lib
from keras_sam.models.trainer import SharpnessAwareTrainer
from keras_sam.ops import dual_vector
from keras_sam.validation import check_real


@keras.saving.register_keras_serializable(package="keras_sam")
class FriendlySAM(SharpnessAwareTrainer):
    r"""Friendly-SAM: the ascent direction minus a moving average of the gradient.

    SAM's batch gradient mixes the full-data gradient (which, the authors find,
    hurts generalization when followed) with batch noise. F-SAM removes an
    estimate of the former, an exponential moving average m of past gradients:

    .. math::

        d = g - \sigma m, \quad m \leftarrow \lambda m + (1 - \lambda) g, \quad
        \epsilon = \rho \frac{d}{\lVert d\rVert}, \quad
        w \leftarrow \mathrm{opt}\big(w, \nabla L(w + \epsilon)\big)

    d uses the stored m (before its update); at the first step m = d = g.
    σ = 0 is SAM. m lives in non-trainable variables of the wrapper (saved with
    it; one parameter copy of memory), averaged over replicas under
    `tf.distribute`.

    Cost: SAM's (two forward/backward passes).

    Args:
        model: the `keras.Model` to train, built (m is created with the wrapper).
        rho: radius ρ >= 0 (float or a schedule of the step). Defaults to `0.05`.
        sigma: σ >= 0, how much of m is removed. Defaults to `1.0`.
        lmbda: λ in [0, 1), the decay of m. Defaults to `0.9`.
        **kwargs: the options every wrapper takes (``perturbation_scope``,
            ``perturb``, ``num_batch_splits``; see `SharpnessAwareTrainer`) and
            `keras.Model`'s (e.g. ``name``).

    Raises:
        TypeError: ``model`` not a `keras.Model`; ``sigma`` or ``lmbda`` not a number.
        ValueError: ``sigma`` negative; ``lmbda`` outside [0, 1); bad ``rho``;
            ``model`` not built.

    Examples:
        >>> import keras, numpy as np, keras_sam
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> trainer = keras_sam.FriendlySAM(model, rho=0.1, sigma=1.0, lmbda=0.6)
        >>> trainer.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        ...                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> x, y = np.random.rand(32, 4), np.random.randint(0, 3, 32)
        >>> history = trainer.fit(x, y, batch_size=8, epochs=2, verbose=0)
        >>> len(history.history["loss"])
        2

    References:
        Li, Zhou, Ding, Huang, Tao, Gong, Huang. Friendly Sharpness-Aware
        Minimization. CVPR 2024.
        [arXiv:2403.12350](https://arxiv.org/abs/2403.12350)
    """

    def __init__(
        self,
        model: keras.Model,
        *,
        rho: rho_lib.RhoLike = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.9,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, rho=rho, **kwargs)
        self.sigma = check_real(sigma, "sigma", low=0.0)
        self.lmbda = check_real(lmbda, "lmbda", low=0.0, high=1.0, high_open=True)

    def build_state(self) -> None:
        """The moving average of gradients per model variable."""
        self._averages = self.add_slots("friendly_sam_average", "mean")

    def perturbation(self, grads: list, variables: list) -> list:
        first = ops.equal(self.optimizer.iterations, 0)
        directions: list = []
        for g, average in zip(grads, self._averages):
            if g is None:
                directions.append(None)
                continue
            m = average.value
            directions.append(ops.where(first, g, g - self.sigma * m))
            average.assign(ops.where(first, g, self.lmbda * m + (1.0 - self.lmbda) * g))
        return dual_vector(directions, self.current_rho())

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"sigma": self.sigma, "lmbda": self.lmbda})
        return config
