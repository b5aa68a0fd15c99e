"""LookSAM: SAM's extra gradient every k steps only (Liu et al. 2022)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from keras_sam import rho as rho_lib
from keras_sam.models.trainer import Ascent, Descent, SharpnessAwareTrainer
from keras_sam.ops import global_norm, orthogonal_unit
from keras_sam.validation import check_int, check_real

#: The compiled kinds of step (see `LookSAM.step_variants`).
SAM_STEP, REUSE_STEP, SWITCH = "sam", "reuse", "switch"


@keras.saving.register_keras_serializable(package="keras_sam")
class LookSAM(SharpnessAwareTrainer):
    r"""LookSAM: a full SAM step every k steps, its direction reused in between.

    At optimizer steps t ≡ 0 (mod k) (the first step is one), with g = ∇L(w)
    and g_s = ∇L(w + ρ g/‖g‖):

    .. math::

        g_v = g_s - \frac{\langle g_s, g\rangle}{\lVert g\rVert^2 + 10^{-12}} g,
        \quad \hat g_v \leftarrow \frac{g_v}{\lVert g_v\rVert},
        \quad w \leftarrow \mathrm{opt}(w, g_s)

    and at every other step, from one forward/backward pass:

    .. math::

        w \leftarrow \mathrm{opt}\big(w,\ g + \alpha \lVert g\rVert \hat g_v\big)

    Norms are global over all variables (as in the reference implementation;
    some third-party ports decompose per tensor). ĝ_v = 0 when g_v = 0 or
    ρ = 0, so nothing is NaN and ρ = 0 is the base optimizer. The two kinds of step
    are compiled apart and the kind of each step is chosen on the host from the
    optimizer's step count, so a reuse step runs one forward/backward pass and
    nothing else. With ``steps_per_execution`` > 1 the kinds must alternate
    inside one compiled call: the step then holds a conditional, which is exact
    but slow under XLA on CPU (about 4 s for a small CNN's SAM branch, against
    0.2 s compiled apart); prefer ``steps_per_execution=1`` there. ĝ_v lives in non-trainable
    variables of the wrapper (saved with it; one parameter copy of memory);
    under `tf.distribute` it is written from replica 0.

    Cost: (1 + 1/k) times the base optimizer.

    Args:
        model: the `keras.Model` to train, built (ĝ_v is created with the wrapper).
        rho: radius ρ >= 0 (float or a schedule of the step). Defaults to `0.05`.
        alpha: α >= 0, how far the reuse steps lean along ĝ_v. Defaults to
            `0.7` (the authors' ViT value; 0.1 was best on CIFAR in Becker et al.).
        k: an int >= 1: a SAM step every k optimizer steps (k = 1 is SAM).
            Defaults to `5`.
        **kwargs: the options every wrapper takes (``perturbation_scope``,
            ``perturb``, ``num_batch_splits``; see `SharpnessAwareTrainer`) and
            `keras.Model`'s (e.g. ``name``).

    Raises:
        TypeError: ``model`` not a `keras.Model`; ``alpha`` or ``k`` of a wrong type.
        ValueError: ``alpha`` negative or not finite; ``k`` < 1; bad ``rho``;
            ``model`` not built.

    Examples:
        >>> import keras, numpy as np, keras_sam
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        >>> trainer = keras_sam.LookSAM(model, rho=0.1, alpha=0.7, k=5)
        >>> trainer.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        ...                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> x, y = np.random.rand(32, 4), np.random.randint(0, 3, 32)
        >>> history = trainer.fit(x, y, batch_size=8, epochs=2, verbose=0)
        >>> len(history.history["loss"])
        2

    References:
        Liu, Mai, Chen, Hsieh, You. Towards Efficient and Scalable
        Sharpness-Aware Minimization. CVPR 2022.
        [arXiv:2203.02714](https://arxiv.org/abs/2203.02714)
    """

    uses_clean_gradient = True

    def __init__(
        self,
        model: keras.Model,
        *,
        rho: rho_lib.RhoLike = 0.05,
        alpha: float = 0.7,
        k: int = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, rho=rho, **kwargs)
        self.alpha = check_real(alpha, "alpha", low=0.0)
        self.k = check_int(k, "k", low=1)

    def build_state(self) -> None:
        """The stored SAM direction per model variable."""
        self._directions = self.add_slots("looksam_direction", "only_first_replica")

    def step_variants(self) -> list:
        """A SAM step and a reuse step, compiled apart and chosen on the host per call
        (with ``steps_per_execution`` > 1, one step that switches between them)."""
        if getattr(self, "steps_per_execution", 1) > 1:
            return [SWITCH]
        return [SAM_STEP] if self.k == 1 else [SAM_STEP, REUSE_STEP]

    def choose_step_variant(self, read: Callable) -> str:
        if getattr(self, "steps_per_execution", 1) > 1:
            return SWITCH
        return SAM_STEP if self._optimizer_steps(read) % self.k == 0 else REUSE_STEP

    def descent(self, ascent: Ascent, grads: list, state_before: list) -> Descent:
        present = [i for i, g in enumerate(grads) if g is not None]
        clean = [grads[i] for i in present]
        stored = [self._directions[i].value for i in present]

        def sam_step() -> list:  # the only branch with a second pass
            sam_grads = self.perturbed_gradients(ascent, self.epsilon(grads), state_before)
            return [ops.cast(sam_grads[i], "float32") for i in present]

        def reuse_step() -> list:
            return [ops.zeros_like(g) for g in clean]

        if self.step_variant in (SAM_STEP, REUSE_STEP):  # known when the step is compiled
            refresh = self.step_variant == SAM_STEP
            sam = sam_step() if refresh else reuse_step()
        else:  # a conditional: correct anywhere, but slow under XLA on CPU
            refresh = ops.equal(self.optimizer.iterations % self.k, 0)
            # It holds no collective (tf.distribute forbids one there): the "global"
            # scope's sum over replicas comes after it.
            sam = ops.cond(refresh, sam_step, reuse_step)
        sam = self.to_global(sam)
        on = ops.cast(ops.greater(self.current_rho(), 0.0), "float32")
        fresh = [d * on for d in orthogonal_unit(sam, clean)]
        lean = self.alpha * global_norm(clean)
        descent: list = [None] * len(grads)
        for i, g, s, d, f in zip(present, clean, sam, stored, fresh):
            if refresh is True:
                descent[i] = s
                self._directions[i].assign(f)
            elif refresh is False:
                descent[i] = g + lean * d
            else:
                descent[i] = ops.where(refresh, s, g + lean * d)
                self._directions[i].assign(ops.where(refresh, f, d))
        return Descent(self.to_replica(descent))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"alpha": self.alpha, "k": self.k})
        return config
