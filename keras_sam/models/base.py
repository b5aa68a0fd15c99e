"""The train-step skeleton every two-pass method shares.

One step of every wrapper is::

    clean pass at w          -> reported loss/metrics, BatchNorm update (once)
    ascent gradient g        -> hook `ascent` (which samples, which variables)
    perturbation ε(g, w)     -> hook `perturbation` (SAM, ASAM, layer-wise, ...)
    gradient at w + ε        -> a stateless pass: nothing is written to the model
    optimizer.apply(g_SAM)   -> the wrapped optimizer steps from the clean w

The perturbed pass never assigns to a variable: it evaluates the model with the
perturbed values through `stateless_call`, feeding it the non-trainable state
read *before* the clean pass. So BatchNorm moving statistics are updated once,
by the clean pass, at the clean weights; dropout draws the same masks in both
passes; metrics are counted once; and there is nothing to restore: the weights
after the step are exactly what the optimizer writes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import keras
from keras import ops

from keras_sam import backend
from keras_sam import rho as rho_lib
from keras_sam.backend import xla
from keras_sam.models.wrapper import ModelWrapper
from keras_sam.ops import add_perturbation, all_finite, dual_vector

PERTURBATION_SCOPES = ("replica", "global")


class Ascent(NamedTuple):
    """What the clean part of a step hands to the perturbation.

    Attributes:
        loss: the clean loss (as `compute_loss` returns it), reported by `fit`.
        y_pred: the clean predictions, fed to the compiled metrics.
        grads: ascent gradients aligned with `trainable_variables` (scaled by the
            optimizer's loss scale; ``None`` where a variable has none).
        batch: ``(x, y, sample_weight)`` the perturbed gradient is taken on.
    """

    loss: Any
    y_pred: Any
    grads: list
    batch: tuple


class SharpnessAwareTrainer(ModelWrapper):
    """Base class of the train-step wrappers (SAM and its variants).

    Wraps any `keras.Model`; `call`, `evaluate`, `predict` and saving behave as
    for the wrapped model. Subclasses override `ascent` (which samples and
    variables give the ascent gradient) and/or `perturbation` (how ε is built).

    Args:
        model: the `keras.Model` to train.
        rho: perturbation radius ρ >= 0, or a schedule (callable of the step).
        perturbation_scope: ``"replica"`` (default): under `tf.distribute` each
            replica perturbs with its own gradient (SAM's m-sharpness with m the
            per-replica batch). ``"global"``: the ascent gradient is summed over
            replicas first, so N replicas compute what one device computes on the
            global batch.
        **kwargs: passed to `keras.Model` (e.g. ``name``).

    Raises:
        TypeError: if ``model`` is not a `keras.Model` or ``rho`` has a wrong type.
        ValueError: if ``rho`` is negative or not finite, or
            ``perturbation_scope`` is unknown.

    Example:

    ```python
    class RandomDirectionSAM(keras_sam.SharpnessAwareTrainer):
        def perturbation(self, grads, variables):  # only ε differs from SAM
            noise = [None if g is None else keras.random.normal(g.shape) for g in grads]
            return keras_sam.ops.dual_vector(noise, self.current_rho())
    ```

    References:
        Foret, Kleiner, Mobahi, Neyshabur. Sharpness-Aware Minimization for
        Efficiently Improving Generalization. ICLR 2021.
        [arXiv:2010.01412](https://arxiv.org/abs/2010.01412)
    """

    def __init__(
        self,
        model: keras.Model,
        rho: rho_lib.RhoLike = 0.05,
        perturbation_scope: str = "replica",
        **kwargs: Any,
    ) -> None:
        if perturbation_scope not in PERTURBATION_SCOPES:
            raise ValueError(
                f"`perturbation_scope` must be one of {PERTURBATION_SCOPES}, "
                f"got {perturbation_scope!r}."
            )
        rho = rho_lib.validate_rho(rho)
        backend.check_supported(self)  # PyTorch: a clear NotImplementedError
        super().__init__(model, **kwargs)
        self.rho = rho
        self.perturbation_scope = perturbation_scope
        self._ascent_step = self.ascent  # XLA-compiled under MirroredStrategy (see below)
        self._perturbed_step = self._perturbed_gradients

    # ------------------------------------------------------------------ XLA
    def make_train_function(self, force: bool = False) -> Any:
        """Keras' train function; ``jit_compile=True`` also works under MirroredStrategy.

        There Keras cannot compile the replicated step, so the clean and the
        perturbed passes are compiled with XLA inside an uncompiled step (see
        `keras_sam.backend.xla`); everywhere else Keras compiles the whole step.
        """
        inside = self._compiles_inside_step()
        self._ascent_step = xla.compiled(self.ascent) if inside else self.ascent
        self._perturbed_step = (
            xla.compiled(self._perturbed_gradients) if inside else self._perturbed_gradients
        )
        with self._step_jit_off(inside):
            return super().make_train_function(force)

    def make_test_function(self, force: bool = False) -> Any:
        with self._step_jit_off(self._compiles_inside_step()):
            return super().make_test_function(force)

    def make_predict_function(self, force: bool = False) -> Any:
        with self._step_jit_off(self._compiles_inside_step()):
            return super().make_predict_function(force)

    def _compiles_inside_step(self) -> bool:
        strategy = getattr(self, "distribute_strategy", None)  # TensorFlow only
        return xla.compiles_inside_step(self.jit_compile, strategy)

    @contextlib.contextmanager
    def _step_jit_off(self, off: bool) -> Iterator[None]:
        if not off:
            yield
            return
        self._jit_compile = False
        try:
            yield
        finally:
            self._jit_compile = True

    # ------------------------------------------------------------------ the step
    # JAX: fit calls train_step(state, data) -> (logs, state); the decorator runs this
    # stateful step in a StatelessScope over the state (identity on TensorFlow).
    @backend.stateful_train_step
    def train_step(self, data: Any) -> dict:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        state_before = backend.snapshot(self.non_trainable_variables)
        scale = backend.loss_scale(self.optimizer)  # before `apply` may change it
        ascent = self._ascent_step(x, y, sample_weight, state_before)
        self._track_loss(ascent.loss, x)
        grads = _unscale(ascent.grads, scale)
        if self.perturbation_scope == "global":
            grads = backend.all_reduce_sum(grads)
        perturbation = self.perturbation(grads, self.trainable_variables)
        perturbed = add_perturbation(
            [v.value for v in self.trainable_variables], perturbation
        )
        sam_grads = self._perturbed_step(perturbed, state_before, ascent.batch)
        finite = all_finite(sam_grads)
        self._apply(sam_grads, finite)
        self.after_step(_unscale(sam_grads, scale))
        self._keep_state_of_skipped_step(state_before, finite)
        logs = self.compute_metrics(x, y, ascent.y_pred, sample_weight=sample_weight)
        return self._distributable_logs(logs)

    def _perturbed_gradients(self, perturbed: list, state_before: list, batch: tuple) -> list:
        return backend.stateless_gradients(self, perturbed, state_before, *batch)[1]

    # ------------------------------------------------------------------ hooks
    def ascent(self, x: Any, y: Any, sample_weight: Any, state_before: list) -> Ascent:
        """Clean pass on the whole batch; its gradient is the ascent direction."""
        loss, y_pred, grads = backend.forward_and_gradients(
            self, x, y, sample_weight, self.trainable_variables
        )
        return Ascent(loss, y_pred, grads, (x, y, sample_weight))

    def perturbation(self, grads: list, variables: list) -> list:
        """ε = ρ g/‖g‖ (SAM). Override for other geometries."""
        return dual_vector(grads, self.current_rho())

    def after_step(self, sam_grads: list) -> None:
        """Called after the optimizer step with the (unscaled, float32) gradients it
        received; on a skipped step the state it writes is rolled back."""

    # ------------------------------------------------------------------ helpers
    def current_rho(self) -> Any:
        """ρ at the optimizer's current step (a float32 scalar)."""
        return rho_lib.rho_at(self.rho, self.optimizer.iterations)

    def _track_loss(self, loss: Any, x: Any) -> None:
        # Compiled losses are divided by the number of replicas (Keras' own
        # convention); the tracker reports the per-sample mean loss.
        batch_size = ops.shape(keras.tree.flatten(x)[0])[0]
        self._loss_tracker.update_state(
            loss * backend.num_replicas(), sample_weight=batch_size
        )

    def _apply(self, grads: list, finite: Any) -> None:
        """optimizer.apply, skipping a step whose gradients are not finite.

        `LossScaleOptimizer` skips such steps itself (and lowers its scale); for
        any other optimizer the step is skipped here, so a NaN or inf in a batch
        never reaches the weights or the optimizer state.
        """
        variables = self.trainable_variables
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            backend.apply_gradients(self.optimizer, grads, variables)  # JAX-safe apply
            return
        if not self.optimizer.built:
            self.optimizer.build(variables)
        backend.apply_if_finite(self.optimizer.apply, grads, variables, finite)

    def _keep_state_of_skipped_step(self, state_before: list, finite: Any) -> None:
        """A skipped step also leaves BatchNorm statistics and RNG state as they were."""
        for variable, before in zip(self.non_trainable_variables, state_before):
            variable.assign(ops.where(finite, variable.value, before))

    # ------------------------------------------------------------------ config
    def get_config(self) -> dict:
        config = super().get_config()
        config["rho"] = rho_lib.serialize_rho(self.rho)
        config["perturbation_scope"] = self.perturbation_scope
        return config

    @classmethod
    def from_config(cls, config: dict, custom_objects: Any = None) -> SharpnessAwareTrainer:
        config = dict(config)
        config["rho"] = rho_lib.deserialize_rho(config["rho"])
        return super().from_config(config, custom_objects=custom_objects)


def _unscale(grads: list, scale: Any) -> list:
    """Gradients without the mixed-precision loss scale, in float32 (for norms)."""
    return [None if g is None else ops.cast(g, "float32") / scale for g in grads]
