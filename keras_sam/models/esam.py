"""ESAM: Efficient SAM, stochastic weight perturbation and data selection (Du et al. 2022)."""

from __future__ import annotations

import math
import numbers
import random
from typing import Any

import keras
from keras import ops, tree

from keras_sam import backend
from keras_sam import rho as rho_lib
from keras_sam.models.trainer import Ascent, Descent, SharpnessAwareTrainer, handed_over
from keras_sam.ops import add_perturbation, dual_vector, multiply_sample_weight
from keras_sam.validation import check_int, check_real

#: γ from which every sample is kept (the authors' rule): no selection pass at all.
KEEP_ALL_GAMMA = 0.99


@keras.saving.register_keras_serializable(package="keras_sam")
class ESAM(SharpnessAwareTrainer):
    r"""ESAM: SAM on a random subset of the variables and the sharpest samples.

    **Stochastic weight perturbation (SWP).** Each step keeps each trainable
    variable (a whole tensor, as the authors' code) with probability β; the
    others are neither perturbed nor counted in the norm, and the kept ones are
    scaled by 1/β (as the authors' code):

    .. math::

        \epsilon_v = \frac{\rho}{\beta} \frac{g_v}{\lVert g_K\rVert} \ (v \in K),
        \quad \epsilon_v = 0 \ (v \notin K)

    **Sharpness-sensitive data selection (SDS).** A forward pass at w + ε gives
    each sample's loss increase s_i = ℓ_i(w + ε) − ℓ_i(w) (losses as optimized:
    sample and class weights included). With n = ⌊γ|B|⌋, the samples with s_i
    *strictly* greater than the n-th largest s are kept (the authors' rule:
    n − 1 samples when there are no ties), and the optimizer steps with the
    gradient at w + ε of the mean loss over the kept samples. Shapes stay
    static (XLA, TPUs): the n top samples are gathered and those not strictly
    above the threshold get weight 0, so the perturbed backward runs on about γ
    of the batch. Choices of this package: if no sample is strictly above the
    threshold (all tied, e.g. ρ = 0, or n = 1) the n top samples are all kept;
    n is at least 1. γ >= 0.99 keeps the whole batch and skips the selection
    pass; β = 1 is deterministic.

    The draw of the kept variables is a pure function of ``seed`` and the
    optimizer's step, so it is the same on every replica and a resumed run
    draws what the uninterrupted one would have.

    Cost, counting a backward as two forwards: the clean pass (3F), the
    selection forward at w + ε (F) and the perturbed pass on the kept samples
    (3γF): about (4 + 3γ)/3 of the base optimizer, 1.83× at γ = 0.5. SWP saves
    no computation here (the clean backward computes every gradient anyway).

    Args:
        model: the `keras.Model` to train.
        rho: radius ρ >= 0 (float or a schedule of the step). Defaults to `0.05`.
        beta: β in (0, 1], the probability that a variable is perturbed.
            Defaults to `0.6`.
        gamma: γ in (0, 1], the fraction of the batch selected. Defaults to `0.5`.
        seed: an int >= 0 seeding the variable draw; ``None`` draws one (saved
            in the config). Defaults to `None`.
        **kwargs: the options every wrapper takes (``perturbation_scope``,
            ``perturb``, ``num_batch_splits``; see `SharpnessAwareTrainer`) and
            `keras.Model`'s (e.g. ``name``).

    Raises:
        TypeError: ``model`` not a `keras.Model`; an argument of a wrong type.
        ValueError: ``beta`` or ``gamma`` outside (0, 1]; negative ``seed``;
            bad ``rho``.

    Examples:
        >>> import keras, numpy as np, keras_sam
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> trainer = keras_sam.ESAM(model, rho=0.05, beta=0.6, gamma=0.5)
        >>> trainer.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        ...                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> x, y = np.random.rand(32, 4), np.random.randint(0, 3, 32)
        >>> history = trainer.fit(x, y, batch_size=8, epochs=2, verbose=0)
        >>> len(history.history["loss"])
        2

    References:
        Du, Yan, Feng, Zhou, Zhen, Goh, Tan. Efficient Sharpness-aware
        Minimization for Improved Training of Neural Networks. ICLR 2022.
        [arXiv:2110.03141](https://arxiv.org/abs/2110.03141)
    """

    def __init__(
        self,
        model: keras.Model,
        *,
        rho: rho_lib.RhoLike = 0.05,
        beta: float = 0.6,
        gamma: float = 0.5,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, rho=rho, **kwargs)
        self.beta = check_real(beta, "beta", low=0.0, high=1.0, low_open=True)
        self.gamma = check_real(gamma, "gamma", low=0.0, high=1.0, low_open=True)
        self.seed = random.randrange(2**31) if seed is None else check_int(seed, "seed", low=0)

    @property
    def selects_samples(self) -> bool:
        """Whether SDS runs (``gamma`` < 0.99)."""
        return self.gamma < KEEP_ALL_GAMMA

    def ranks_samples_by_loss(self) -> bool:
        """True when SDS selects samples by their loss increase (needs a ``loss``)."""
        return self.selects_samples

    def ascent(self, x: Any, y: Any, sample_weight: Any, state_before: list) -> Ascent:
        if not self.selects_samples:
            return super().ascent(x, y, sample_weight, state_before)
        variables = self.trainable_variables
        wanted = [v for v, keep in zip(variables, self.perturbed_mask(variables)) if keep]
        loss, y_pred, computed, scores = backend.forward_gradients_and_sample_scores(
            self, x, y, sample_weight, wanted
        )
        by_id = {id(v): g for v, g in zip(wanted, computed)}
        grads = [by_id.get(id(v)) for v in variables]
        return Ascent(loss, y_pred, grads, (x, y, sample_weight), scores)

    def perturbation(self, grads: list, variables: list) -> list:
        """SWP: each variable kept with probability β, ε scaled by 1/β."""
        if self.beta >= 1.0:
            return dual_vector(grads, self.current_rho())
        seed = ops.stack(
            [
                ops.convert_to_tensor(self.seed, "int32"),
                ops.cast(self.optimizer.iterations, "int32"),
            ]
        )
        kept = ops.cast(
            ops.less(backend.stateless_uniform((len(grads),), seed), self.beta), "float32"
        )
        masked = [None if g is None else g * kept[i] for i, g in enumerate(grads)]
        return [
            None if e is None else e / self.beta for e in dual_vector(masked, self.current_rho())
        ]

    def descent(self, ascent: Ascent, grads: list, state_before: list) -> Descent:
        epsilon = [self.epsilon(grads)]
        del grads  # eagerly: the clean gradients and ε go before the perturbed passes
        if not self.selects_samples:
            return Descent(self.perturbed_gradients(ascent, handed_over(epsilon), state_before))
        weights = [v.value for v in self.trainable_variables]
        perturbed = add_perturbation(weights, handed_over(epsilon))
        x, y, sample_weight = ascent.batch
        scores = backend.stateless_sample_scores(self, perturbed, state_before, x, y, sample_weight)
        sharpness = scores - ascent.scores
        count = self.num_selected(ops.shape(sharpness)[0])
        top, chosen = ops.top_k(sharpness, count)
        order = ops.argsort(chosen)  # batch order
        top, chosen = ops.take(top, order), ops.take(chosen, order)
        threshold = ops.min(top)
        above = ops.cast(ops.greater(top, threshold), "float32")
        kept = ops.where(ops.sum(above) > 0, above, ops.ones_like(above))
        weights = kept * (ops.cast(count, "float32") / ops.sum(kept))
        x, y, sample_weight = tree.map_structure(
            lambda t: None if t is None else ops.take(t, chosen, axis=0), (x, y, sample_weight)
        )
        batch = (x, y, multiply_sample_weight(sample_weight, weights))
        return Descent(self._perturbed_step(perturbed, state_before, batch))

    def num_selected(self, batch_size: Any) -> Any:
        """n = max(1, ⌊γ·batch_size⌋) (Python int for a static size, else a tensor)."""
        if isinstance(batch_size, numbers.Integral):
            return max(1, math.floor(self.gamma * int(batch_size) + 1e-6))
        count = ops.floor(self.gamma * ops.cast(batch_size, "float32") + 1e-6)
        return ops.maximum(ops.cast(count, "int32"), 1)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"beta": self.beta, "gamma": self.gamma, "seed": self.seed})
        return config
