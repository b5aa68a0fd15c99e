"""SAM: Sharpness-Aware Minimization (Foret et al. 2020)."""

from __future__ import annotations

import keras

from keras_sam.models.trainer import SharpnessAwareTrainer


@keras.saving.register_keras_serializable(package="keras_sam")
class SAM(SharpnessAwareTrainer):
    r"""Sharpness-Aware Minimization as a `keras.Model` wrapper.

    Each step takes the gradient at the worst point of a ρ-ball around the
    weights (to first order) and lets the compiled optimizer step with it:

    .. math::

        g = \nabla L_B(w), \quad
        \epsilon = \rho \frac{g}{\lVert g \rVert_2}, \quad
        w \leftarrow \mathrm{opt}\big(w, \nabla L_B(w + \epsilon)\big)

    ‖g‖ is the global L2 norm over all trainable variables with a gradient;
    ‖g‖ = 0 gives ε = 0. Loss and metrics reported by `fit` come from the clean
    pass at w, which is also the only pass that updates BatchNorm statistics.

    Args:
        model: the `keras.Model` to train.
        rho: radius ρ >= 0 (float or a schedule of the step). Defaults to `0.05`
            (CIFAR-10; 0.1 for CIFAR-100 and fine-tuning).
        **kwargs: the options every wrapper takes (``perturbation_scope``,
            ``perturb``, ``num_batch_splits``; see `SharpnessAwareTrainer`) and
            `keras.Model`'s (e.g. ``name``).

    Raises:
        TypeError: ``model`` is not a `keras.Model`, or ``rho`` has a wrong type.
        ValueError: ``rho`` negative, NaN or infinite; unknown ``perturbation_scope``.

    Examples:
        >>> import keras, numpy as np, keras_sam
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> trainer = keras_sam.SAM(model, rho=0.05)
        >>> trainer.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        ...                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> x, y = np.random.rand(32, 4), np.random.randint(0, 3, 32)
        >>> history = trainer.fit(x, y, batch_size=8, epochs=2, verbose=0)
        >>> len(history.history["loss"])
        2

    References:
        Foret, Kleiner, Mobahi, Neyshabur. Sharpness-Aware Minimization for
        Efficiently Improving Generalization. ICLR 2021.
        [arXiv:2010.01412](https://arxiv.org/abs/2010.01412)
    """
