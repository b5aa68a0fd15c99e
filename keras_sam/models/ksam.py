"""K-SAM: SAM on the k highest-loss samples of each batch (Ni et al. 2022)."""

from __future__ import annotations

import numbers
from typing import Any

import keras
import numpy as np
from keras import ops, tree

from keras_sam import backend, batchnorm
from keras_sam import rho as rho_lib
from keras_sam.models.trainer import Ascent, SharpnessAwareTrainer
from keras_sam.validation import check_count_or_fraction


@keras.saving.register_keras_serializable(package="keras_sam")
class KSAM(SharpnessAwareTrainer):
    r"""K-SAM: both SAM gradients on only the top-k highest-loss samples.

    One training-mode forward pass over the whole batch B at w gives the
    per-sample losses ℓ_i (and the reported loss, and the step's only BatchNorm
    update). With S the indices of the k largest ℓ_i:

    .. math::

        g = \nabla \tfrac{1}{k}\textstyle\sum_{i \in S} \ell_i(w), \quad
        \epsilon = \rho \frac{g}{\lVert g \rVert_2}, \quad
        w \leftarrow \mathrm{opt}\big(w, \nabla \tfrac{1}{k}\textstyle\sum_{i\in S}
        \ell_i(w + \epsilon)\big)

    Samples are ranked by the loss actually optimized (sample and class weights,
    loss weights of every output included). The two k-sample passes never update
    BatchNorm statistics, and they normalize with the statistics of the whole
    batch, taken from the ranking pass: the k chosen samples (often a handful,
    all of them the hardest) would otherwise be normalized among themselves, and
    the gradient would be that of a different network. The gradient through
    those statistics is estimated from the chosen samples (`keras_sam.batchnorm`).
    (These choices are ours; the paper does not discuss BatchNorm.) With k = |B|
    this is SAM; with ρ = 0 it is the base optimizer on the top-k samples.

    Cost, counting a backward as two forwards: F + 6Fκ against SGD's 3F and SAM's
    6F (κ = k/|B|), so ≈ 1/3 + 2κ times the base optimizer.

    **Normalize every hidden layer, warm up.** The step on the few hardest samples
    (averaged over k, not |B|) is larger and more one-sided than the batch mean's;
    in a hidden ReLU layer without normalization it switches most units off for
    good in the first epoch. On digits with batch 64 (``python -m
    benchmarks.ksam_batchnorm``, 5 seeds) κ = 0.1 reached 98.8 % test accuracy on
    the demo's CNN (BatchNorm after every hidden layer, one warm-up epoch) against
    SGD's 99.4 % and SAM's 99.3 %, and 16 % on a CNN whose dense hidden layer had
    no BatchNorm (91 % of its units dead; SGD 97.5 %).

    **Not for noisy labels.** The highest-loss samples of a batch with noisy
    labels are mostly the mislabelled ones, and both gradients are taken on
    them. Measured (``python -m benchmarks.generalization``: an MLP on digits
    with 40 % of the labels flipped, 60 epochs, 3 seeds, ρ chosen on
    validation): K-SAM at κ = 0.25 reached 79.5 % test accuracy, SGD 76.7 %, SAM
    93.7 %, i.e. 16 % of SAM's gain (Momentum-SAM kept 98 %). On clean labels it
    matched SAM there (99.0 % against 98.6 %).

    **Dropout under XLA on a CPU (TensorFlow).** TensorFlow's default random
    algorithm for Keras' dropout masks, as XLA compiles it for the CPU, makes
    the ranking pass slow: K-SAM costs 4.5× SGD on keras-io's Transformer text
    classifier with dropout 0.1, and 0.99× when the masks are drawn with the
    Philox algorithm (``python -m benchmarks.dropout_xla``). On a CPU, use
    ``jit_compile=False`` for such a model (GPUs and TPUs were not measured).

    Args:
        model: the `keras.Model` to train.
        rho: radius ρ >= 0 (float or a schedule of the step). Defaults to `0.05`.
        k: a float in (0, 1]: the fraction of each batch, k = max(1, round(k·|B|))
            per actual batch (so a smaller last batch keeps the fraction); or an
            int >= 1: a sample count (the whole batch when larger). Defaults to `0.1`.
        **kwargs: the options every wrapper takes (``perturbation_scope``,
            ``perturb``, ``num_batch_splits``; see `SharpnessAwareTrainer`) and
            `keras.Model`'s (e.g. ``name``). Under `tf.distribute` samples are
            always ranked per replica, on its local shard; under JAX's
            `keras.distribution.DataParallel` per device with
            ``perturbation_scope="replica"``, and over the whole global batch with
            ``"global"`` (the step is one SPMD program there).

    Raises:
        TypeError: ``model`` not a `keras.Model`; ``k`` neither int nor float.
        ValueError: ``k`` a float outside (0, 1] or an int < 1; bad ``rho``.

    Examples:
        >>> import keras, numpy as np, keras_sam
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> trainer = keras_sam.KSAM(model, rho=0.05, k=0.25)
        >>> trainer.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        ...                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> x, y = np.random.rand(32, 4), np.random.randint(0, 3, 32)
        >>> history = trainer.fit(x, y, batch_size=8, epochs=2, verbose=0)
        >>> len(history.history["loss"])
        2
        >>> trainer.num_samples(8)  # samples per batch of 8 in both passes
        2

    References:
        Ni, Chiang, Geiping, Goldblum, Wilson, Goldstein. K-SAM:
        Sharpness-Aware Minimization at the Speed of SGD. 2022.
        [arXiv:2210.12864](https://arxiv.org/abs/2210.12864)
    """

    def __init__(
        self,
        model: keras.Model,
        *,
        rho: rho_lib.RhoLike = 0.05,
        k: float | int = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, rho=rho, **kwargs)
        self.k = check_count_or_fraction(k, "k", min_count=1, what="the batch")

    def ranks_samples_by_loss(self) -> bool:
        """True: K-SAM ranks the batch by per-sample loss (`compile` needs a ``loss``)."""
        return True

    def ascent(self, x: Any, y: Any, sample_weight: Any, state_before: list) -> Ascent:
        """The ranking pass on the whole batch, then the ascent gradient on the top k."""
        with batchnorm.record(self.model) as recorded:
            loss, y_pred, scores = backend.forward_and_sample_scores(self, x, y, sample_weight)
        batch_size = ops.shape(scores)[0]
        _, chosen = ops.top_k(scores, self.num_samples(batch_size))
        chosen = ops.sort(chosen)  # batch order: with k = |B| the batch is unchanged
        moments = batchnorm.rest_of_batch(recorded, chosen, batch_size)
        batch = tree.map_structure(
            lambda t: None if t is None else ops.take(t, chosen, axis=0), (x, y, sample_weight)
        )
        weights = [v.value for v in self.trainable_variables]
        with self.batch_statistics(moments):
            _, grads = backend.stateless_gradients(self, weights, state_before, *batch)
        return Ascent(loss, y_pred, grads, batch, batch_moments=moments)

    def num_chosen(self, batch_size: Any) -> Any:
        """The former name of `num_samples`, kept working."""
        return self.num_samples(batch_size)

    def num_samples(self, batch_size: Any) -> Any:
        """k for a batch of ``batch_size`` samples (int or scalar tensor).

        A static (Python int) batch size gives a Python int, as `jax.jit` needs
        (shapes are static there); a dynamic one (TensorFlow) a scalar tensor.
        The float32 rounding is the same either way.
        """
        if isinstance(batch_size, numbers.Integral):
            if isinstance(self.k, int):
                return min(self.k, int(batch_size))
            count = np.round(np.float32(batch_size) * np.float32(self.k))
            return max(int(count), 1)
        if isinstance(self.k, int):
            return ops.minimum(self.k, batch_size)
        count = ops.round(ops.cast(batch_size, "float32") * self.k)
        return ops.maximum(ops.cast(count, "int32"), 1)

    def get_config(self) -> dict:
        config = super().get_config()
        config["k"] = self.k
        return config
