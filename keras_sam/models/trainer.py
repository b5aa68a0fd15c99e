"""The train-step skeleton every two-pass method shares.

One step of every wrapper is::

    clean pass at w          -> reported loss/metrics, BatchNorm update (once)
    ascent gradient g        -> hook `ascent` (which samples, which variables)
    perturbation ε(g, w)     -> hook `perturbation` (SAM, ASAM, layer-wise, ...)
    gradient at w + ε        -> a stateless pass: nothing is written to the model
    descent direction        -> hook `descent` (SAM: the gradient at w + ε; GSAM,
                                LookSAM, WSAM combine it with g)
    optimizer.apply(g_SAM)   -> the wrapped optimizer steps from the clean w

Two options apply to every variant: ``perturb`` chooses the perturbed
variables (SAM-ON: only normalization layers), and ``num_batch_splits`` runs the
step on contiguous parts of the batch, each with its own ε (m-sharpness), and
averages the descent gradients.

The perturbed pass never assigns to a variable: it evaluates the model with the
perturbed values through `stateless_call`, feeding it the non-trainable state
read *before* the clean pass. So BatchNorm moving statistics are updated once,
by the clean pass, at the clean weights; dropout draws the same masks in both
passes; metrics are counted once; and there is nothing to restore: the weights
after the step are exactly what the optimizer writes.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, cast

import keras
from keras import ops

from keras_sam import backend, batchnorm, internals
from keras_sam import rho as rho_lib
from keras_sam.models.wrapper import ModelWrapper
from keras_sam.ops import add_perturbation, all_finite, dual_vector
from keras_sam.validation import check_choice, check_int

PERTURBATION_SCOPES = ("replica", "global")

#: The kind of step being run by `SharpnessAwareTrainer.train_step_for` (per thread:
#: MirroredStrategy runs its replicas' steps in threads of their own).
_STEP_VARIANT: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "keras_sam_step_variant", default=None
)

#: Keras layers whose trainable variables ``perturb="normalization"`` selects (SAM-ON).
NORMALIZATION_LAYERS = (
    keras.layers.BatchNormalization,
    keras.layers.LayerNormalization,
    keras.layers.GroupNormalization,
)

PerturbLike = str | Callable[[Any], bool] | None


class Ascent(NamedTuple):
    """What the clean part of a step hands to the perturbation.

    Attributes:
        loss: the clean loss (as `compute_loss` returns it), reported by `fit`.
        y_pred: the clean predictions, fed to the compiled metrics.
        grads: ascent gradients aligned with `trainable_variables` (scaled by the
            optimizer's loss scale; ``None`` where a variable has none). `descent`
            receives them unscaled as its ``grads`` argument, and an Ascent whose
            ``grads`` is None.
        batch: ``(x, y, sample_weight)`` the perturbed gradient is taken on.
        scores: per-sample scores of the clean pass (``None`` unless a variant
            asks for them, see `keras_sam.ESAM`).
        batch_moments: the whole batch's BatchNorm statistics for the stateless
            passes on ``batch``, a subset of it (`keras_sam.batchnorm.rest_of_batch`;
            ``None``: they use their own batch's; see `keras_sam.KSAM`).
    """

    loss: Any
    y_pred: Any
    grads: list | None
    batch: tuple
    scores: Any = None
    batch_moments: list | None = None


class Descent(NamedTuple):
    """What a step hands to the optimizer (unscaled, float32, aligned with
    `trainable_variables`).

    Attributes:
        grads: the gradient the compiled optimizer steps with.
        decoupled: ``None``, or an update subtracted from the weights after the
            optimizer's step, outside its state (`keras_sam.WSAM`); it must be
            the same on every replica.
    """

    grads: list
    decoupled: list | None = None


class SharpnessAwareTrainer(ModelWrapper):
    """Base class of the train-step wrappers (SAM and its variants).

    Wraps any `keras.Model`; `call`, `evaluate`, `predict` and saving behave as
    for the wrapped model. Subclasses override `ascent` (which samples and
    variables give the ascent gradient), `perturbation` (how ε is built) and/or
    `descent` (what the optimizer steps with).

    Args:
        model: the `keras.Model` to train.
        rho: perturbation radius ρ >= 0, or a schedule (callable of the step, or
            `keras_sam.rho.ProportionalToLearningRate`).
        perturbation_scope: ``"replica"`` (default): under `tf.distribute` each
            replica perturbs with its own gradient (SAM's m-sharpness with m the
            per-replica batch). ``"global"``: the ascent gradient is summed over
            replicas first, so N replicas compute what one device computes on the
            global batch.
        perturb: which trainable variables are perturbed. ``None`` (default):
            all. ``"normalization"``: only the scales and shifts of
            BatchNormalization, LayerNormalization and GroupNormalization layers
            (SAM-ON, Mueller et al. 2023). Or a predicate ``variable -> bool``.
            Variables not perturbed are left out of ‖g‖ and get ε = 0 (they are
            still trained with the descent gradient).
        num_batch_splits: ``None`` (default) or an int n >= 1: the batch is cut
            into n contiguous parts (samples 0..B/n - 1, then the next B/n, ...),
            each part runs the whole step with its own ε from its own gradient
            (as n replicas would: SAM's m-sharpness with m = B/n, on one device),
            and the parts' descent gradients are averaged, weighted by their
            sizes. Each part is one training-mode pass: BatchNorm normalizes over
            the part and its moving statistics are updated once per part.
        **kwargs: passed to `keras.Model` (e.g. ``name``).

    Raises:
        TypeError: ``model`` is not a `keras.Model`; ``rho``, ``perturb`` or
            ``num_batch_splits`` of a wrong type.
        ValueError: ``rho`` negative or not finite; unknown
            ``perturbation_scope`` or ``perturb``; ``num_batch_splits`` < 1.

    Examples:
        A new method overrides a hook; here ε follows the gradient's signs.

        >>> import keras, numpy as np, keras_sam
        >>> class SignSAM(keras_sam.SharpnessAwareTrainer):
        ...     def perturbation(self, grads, variables):  # only ε differs from SAM
        ...         signs = [None if g is None else keras.ops.sign(g) for g in grads]
        ...         return keras_sam.ops.dual_vector(signs, self.current_rho())
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        >>> trainer = SignSAM(model, rho=0.05)
        >>> trainer.compile(optimizer="sgd", loss="mse")
        >>> history = trainer.fit(np.ones((8, 4)), np.ones((8, 1)), verbose=0)

    References:
        Foret, Kleiner, Mobahi, Neyshabur. Sharpness-Aware Minimization for
        Efficiently Improving Generalization. ICLR 2021.
        [arXiv:2010.01412](https://arxiv.org/abs/2010.01412)

        Mueller, Vlaar, Rolnick, Hein. Normalization Layers Are All That
        Sharpness-Aware Minimization Needs. NeurIPS 2023.
        [arXiv:2306.04226](https://arxiv.org/abs/2306.04226)
    """

    #: Whether `descent` needs the clean gradient of variables that are not
    #: perturbed (GSAM, LookSAM, WSAM combine it with the perturbed gradient).
    #: When False the clean backward skips their weight gradients.
    uses_clean_gradient: bool = False
    #: Keras' train function (set by `make_train_function`).
    train_function: Any

    def __init__(
        self,
        model: keras.Model,
        *,
        rho: rho_lib.RhoLike = 0.05,
        perturbation_scope: str = "replica",
        perturb: PerturbLike = None,
        num_batch_splits: int | None = None,
        **kwargs: Any,
    ) -> None:
        check_choice(perturbation_scope, "perturbation_scope", PERTURBATION_SCOPES)
        rho = rho_lib.validate_rho(rho)
        if not (perturb is None or perturb == "normalization" or callable(perturb)):
            raise (ValueError if isinstance(perturb, str) else TypeError)(
                '`perturb` must be None, "normalization" or a predicate `variable -> bool`, '
                f"got {perturb!r}."
            )
        if num_batch_splits is not None:
            num_batch_splits = check_int(num_batch_splits, "num_batch_splits", low=1)
        backend.check_supported(self)  # numpy, openvino: a clear NotImplementedError
        _refuse_custom_train_step(model, type(self).__name__)
        super().__init__(model, **kwargs)
        self.rho = rho
        self.perturbation_scope = perturbation_scope
        self.perturb = perturb
        self.num_batch_splits = num_batch_splits
        # XLA-compiled under MirroredStrategy (see `make_train_function`).
        self._ascent_step: Callable[..., Ascent] = self.ascent
        self._perturbed_step: Callable[..., list] = self._perturbed_gradients
        self._state_built = False  # `build_state` runs at `compile` (or when first needed)

    # ------------------------------------------------------------------ per-variable state
    def build_state(self) -> None:
        """Creates the variant's own state (per model variable, or per layer) once the
        model's variables exist: at `compile` for a built model, else when `fit` has
        built it from the first batch (a subclassed model). Default: none."""

    def _build_state_if_possible(self) -> bool:
        """Runs `build_state` once, when the model has its variables; returns whether
        the state exists."""
        if not self._state_built and self.model.built and self.model.variables:
            strategy = internals.distribute_strategy(self)
            scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
            with scope, internals.state_unlocked(self):
                self.build_state()
            self._state_built = True
        return self._state_built

    def _require_state(self, what: str) -> None:
        """Raises a clear error where the state is needed before the model is built."""
        if not self._build_state_if_possible():
            raise ValueError(
                f"{type(self).__name__}.{what} needs the model's variables, which do not "
                "exist yet: train it (`fit` builds it from the first batch) or call the "
                "model once on a batch (`model(x[:1])`) first."
            )

    # ------------------------------------------------------------------ XLA, variants
    def compile(self, *args: Any, **kwargs: Any) -> None:
        """`keras.Model.compile`.

        Raises:
            ValueError: ``jit_compile=True`` on a backend that cannot compile the
                step (PyTorch, see `keras_sam.backend.torch.check_jit_compile`); no
                ``loss`` for a variant that ranks samples by their loss (the
                ``add_loss`` terms of a model are not per sample);
                ``jit_compile=True`` under a multi-device MirroredStrategy with a
                ``BatchNormalization(synchronized=True)`` layer (its all-reduce cannot
                sit inside the passes XLA compiles there).
        """
        super().compile(*args, **kwargs)
        name = type(self).__name__
        self._check_jit_compile()
        if self.loss is None and self.ranks_samples_by_loss():
            raise ValueError(
                f"{name} ranks the samples of a batch by their loss, so it needs `loss` in "
                "`compile`: the `add_loss` terms of a model are not per sample. Pass the "
                "loss to `compile(loss=...)` (with the targets as `y`), or use "
                "keras_sam.SAM, which works with `add_loss`-only models."
            )
        self._build_state_if_possible()

    def ranks_samples_by_loss(self) -> bool:
        """Whether the variant ranks the batch's samples by their loss (K-SAM, ESAM's
        data selection), which needs a compiled ``loss``. Default: False."""
        return False

    def compile_from_config(self, config: dict) -> None:
        """Compiles a loaded wrapper as Keras does (Keras skips a `compile` it did not
        write), with the optimizer's variables ready for the saved state."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def make_train_function(self, force: bool = False) -> Any:
        """Keras' train function; ``jit_compile=True`` also works under MirroredStrategy.

        There Keras cannot compile the replicated step, so the clean and the
        perturbed passes are compiled with XLA inside an uncompiled step (see
        `keras_sam.backend.tensorflow.xla`); everywhere else Keras compiles the whole step.

        A variant whose step comes in several static kinds (`step_variants`:
        LookSAM's SAM and reuse steps, LayerwiseSAM's cut depths) gets one compiled
        train function per kind (each compiled on first use), and the kind of each
        call is chosen on the host before it (`choose_step_variant`); a
        data-dependent conditional inside one compiled step would run both kinds'
        code paths through XLA's conditional, which is orders of magnitude slower
        on CPU.
        """
        if self.train_function is not None and not force:
            return self.train_function
        self._check_jit_compile()
        self._require_state("make_train_function")
        inside = self._compiles_inside_step()
        self._ascent_step = backend.xla_compiled(self.ascent) if inside else self.ascent
        self._perturbed_step = (
            backend.xla_compiled(self._perturbed_gradients) if inside else self._perturbed_gradients
        )
        variants = self.step_variants()
        if variants == [None]:
            with self._step_jit_off(inside):
                return super().make_train_function(force)
        compiled = {}
        for variant in variants:  # now: Keras reads the variables' shardings here
            with self._step_jit_off(inside):
                compiled[variant] = self._train_function_of(variant)
        steps_before = [0]

        def choose(read: Callable) -> Callable:
            variant = self.choose_step_variant(read)
            steps_before[0] = self._optimizer_steps(read)
            return compiled[variant]

        def after(read: Callable, write: Callable) -> None:
            self.after_train_call(read, write, steps_before[0])

        self.train_function = backend.dispatched_train_function(self, choose, after)
        return self.train_function

    def _train_function_of(self, variant: Any) -> Callable:
        """Keras' train function for one kind of step (`train_step_for`), made and
        run with that step as ``train_step`` (see `internals.train_step_replaced`)."""
        step = self.train_step_for(variant)
        with internals.train_step_replaced(self, step):
            super().make_train_function(force=True)
        function = self.train_function

        def train_function(*args: Any) -> Any:
            with internals.train_step_replaced(self, step):
                return function(*args)

        return train_function

    def train_step_for(self, variant: Any) -> Callable:
        """Keras' ``train_step`` for one kind of step (`step_variants`), bound to self.

        It is a function of its own that closes over ``variant`` (so `jax.jit` and
        `tf.function` give every kind its own trace), and runs the skeleton with
        `step_variant` set to ``variant`` for the step's duration.
        """

        @backend.stateful_train_step
        def step(trainer: SharpnessAwareTrainer, data: Any) -> dict:
            token = _STEP_VARIANT.set(variant)  # this step's own context, not the model's
            try:
                return trainer._step(data)
            finally:
                _STEP_VARIANT.reset(token)

        return functools.partial(step, self)

    def step_variants(self) -> list:
        """The static kinds of step, one compiled train function each (default: one)."""
        return [None]

    def choose_step_variant(self, read: Callable) -> Any:
        """The kind of step the next train-function call runs, chosen on the host.

        ``read(variable)`` gives a variable's current value (numpy).
        """
        return None

    def after_train_call(self, read: Callable, write: Callable, steps_before: int) -> None:
        """Called on the host after each train-function call of a multi-variant step;
        ``steps_before`` is the optimizer's step count before the call."""

    @property
    def step_variant(self) -> Any:
        """The kind of step running (``None`` outside a multi-variant train function).

        Set by the running step itself (and so while it is traced), in its own
        context: nothing on the model is read or written.
        """
        return _STEP_VARIANT.get()

    def _optimizer_steps(self, read: Callable) -> int:
        """``optimizer.iterations`` (the steps taken, counting accumulated micro-batches
        as one) read through ``read``, for which it must be a variable."""
        optimizer: Any = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        count = int(read(internals.iterations_variable(optimizer)))
        accumulation = optimizer.gradient_accumulation_steps
        return count // accumulation if accumulation else count

    def make_test_function(self, force: bool = False) -> Any:
        with self._step_jit_off(self._compiles_inside_step()):
            return super().make_test_function(force)

    def make_predict_function(self, force: bool = False) -> Any:
        with self._step_jit_off(self._compiles_inside_step()):
            return super().make_predict_function(force)

    def _check_jit_compile(self) -> None:
        """Raises `ValueError` where this wrapper cannot run with ``jit_compile``."""
        backend.check_jit_compile(self.jit_compile, type(self).__name__)
        if not self._compiles_inside_step():
            return
        synchronized = [
            layer.name
            for layer in internals.all_layers(self.model)
            if getattr(layer, "synchronized", False)
        ]
        if synchronized:
            raise ValueError(
                "`jit_compile=True` under a multi-device MirroredStrategy compiles each "
                "pass of the step on its own, and a `BatchNormalization(synchronized=True)` "
                f"layer ({', '.join(synchronized)}) all-reduces inside the pass, which XLA "
                "cannot compile there. Pass `jit_compile=False` (or leave it at 'auto'), "
                "or use `synchronized=False`."
            )

    def _compiles_inside_step(self) -> bool:
        return backend.compiles_inside_step(self.jit_compile, internals.distribute_strategy(self))

    @contextlib.contextmanager
    def _step_jit_off(self, off: bool) -> Iterator[None]:
        """``jit_compile`` off inside, when ``off`` (the passes are compiled instead)."""
        if not off:
            yield
            return
        self.jit_compile = False
        try:
            yield
        finally:
            self.jit_compile = True

    # ------------------------------------------------------------------ the step
    # JAX: fit calls train_step(state, data) -> (logs, state); the decorator runs this
    # stateful step in a StatelessScope over the state (identity on TensorFlow).
    @backend.stateful_train_step
    def train_step(self, data: Any) -> dict:
        return self._step(data)

    def _step(self, data: Any) -> dict:
        """The skeleton: one step on the batch ``data``, statefully."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        state_before = backend.snapshot(self.non_trainable_variables)
        scale = _loss_scale(self.optimizer)  # before `apply` may change it
        parts = _batch_parts((x, y, sample_weight), self.num_batch_splits)
        results = [
            self._part_step(part, scale, state_before if i == 0 else None)
            for i, (part, _) in enumerate(parts)
        ]
        descent = _average([(d, share) for (_, d), (_, share) in zip(results, parts)])
        y_pred = _concatenate([y_pred for y_pred, _ in results])
        variables = self.trainable_variables
        grads = [
            None if g is None else ops.cast(g if scale is None else g * scale, v.dtype)
            for g, v in zip(descent.grads, variables)
        ]
        finite = all_finite(grads + list(descent.decoupled or []))
        self._apply(grads, finite, descent.decoupled)
        self.after_step(descent.grads)
        self._keep_state_of_skipped_step(state_before, finite)
        logs = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        return self._distributable_logs(logs)

    def _part_step(self, batch: tuple, scale: Any, state_before: list | None) -> tuple:
        """Clean pass, ε and descent on one part of the batch: ``(y_pred, Descent)``.

        Run eagerly (JAX without ``jit_compile``, PyTorch), an array lives while a
        name holds it: the clean gradients reach `descent` held by nothing else,
        so that its default can let them go once ε is formed (`handed_over`).
        """
        if state_before is None:  # a later part replays its own dropout masks
            state_before = backend.snapshot(self.non_trainable_variables)
        ascent = self._ascent_step(*batch, state_before)
        self._track_loss(ascent.loss, batch[0])
        clean = [ascent.grads]
        ascent = ascent._replace(grads=None)
        return ascent.y_pred, self.descent(
            ascent, self._ascent_gradients(handed_over(clean), scale), state_before
        )

    def _ascent_gradients(self, scaled: list, scale: Any) -> list:
        """The ascent gradients without the loss scale, in float32 (summed over
        replicas with ``perturbation_scope="global"``)."""
        grads = _unscale(scaled, scale)
        del scaled  # eagerly: the scaled ones go before the sum over replicas
        if self.perturbation_scope == "global":
            grads = backend.all_reduce_sum(grads)
        return grads

    def _perturbed_gradients(
        self,
        perturbed: list,
        state_before: list,
        batch: tuple,
        batch_moments: list | None = None,
    ) -> list:
        with self.batch_statistics(batch_moments):
            grads = backend.stateless_gradients(self, perturbed, state_before, *batch)[1]
        return _unscale(grads, _loss_scale(self.optimizer))

    def batch_statistics(self, batch_moments: list | None) -> Any:
        """A scope in which BatchNormalization normalizes a subset of the batch with
        the whole batch's statistics (`keras_sam.batchnorm.replay`); no change when
        ``batch_moments`` is ``None``."""
        if batch_moments is None:
            return contextlib.nullcontext()
        return batchnorm.replay(self.model, batch_moments)

    # ------------------------------------------------------------------ hooks
    def ascent(self, x: Any, y: Any, sample_weight: Any, state_before: list) -> Ascent:
        """Clean pass on the whole batch; its gradient is the ascent direction."""
        variables = self.trainable_variables
        wanted = self.perturbed_mask(variables)
        if self.uses_clean_gradient:
            wanted = [True] * len(variables)
        loss, y_pred, computed = backend.forward_and_gradients(
            self, x, y, sample_weight, [v for v, keep in zip(variables, wanted) if keep]
        )
        computed = iter(computed)
        grads = [next(computed) if keep else None for keep in wanted]
        return Ascent(loss, y_pred, grads, (x, y, sample_weight))

    def perturbation(self, grads: list, variables: list) -> list:
        """ε = ρ g/‖g‖ (SAM). Override for other geometries.

        ``grads`` are the unscaled float32 ascent gradients, ``None`` for the
        variables that are not perturbed.
        """
        return dual_vector(grads, self.current_rho())

    def descent(self, ascent: Ascent, grads: list, state_before: list) -> Descent:
        """The gradient the optimizer steps with: SAM's ∇L(w + ε).

        Args:
            ascent: the clean pass (its batch is the perturbed pass's).
            grads: the unscaled float32 ascent gradients g (summed over replicas
                with ``perturbation_scope="global"``).
            state_before: the non-trainable state the stateless passes read.
        """
        epsilon = [self.epsilon(grads)]
        del grads  # eagerly: the clean gradients go before the perturbed pass
        return Descent(self.perturbed_gradients(ascent, handed_over(epsilon), state_before))

    def after_step(self, sam_grads: list) -> None:
        """Called after the optimizer step with the (unscaled, float32) gradients it
        received; on a skipped step the state it writes is rolled back."""

    # ------------------------------------------------------------------ for hooks
    def epsilon(self, grads: list) -> list:
        """ε from the ascent gradients: `perturbation` over the perturbed variables."""
        variables = self.trainable_variables
        kept = [
            None if g is None or not keep else g
            for g, keep in zip(grads, self.perturbed_mask(variables))
        ]
        return self.perturbation(kept, variables)

    def perturbed_gradients(self, ascent: Ascent, epsilon: list, state_before: list) -> list:
        """The unscaled float32 gradient at w + ε on the ascent's batch (stateless)."""
        perturbed = add_perturbation([v.value for v in self.trainable_variables], epsilon)
        del epsilon  # eagerly: ε goes before the perturbed pass, unless the caller keeps it
        return self._perturbed_step(perturbed, state_before, ascent.batch, ascent.batch_moments)

    def perturbed_mask(self, variables: Sequence[Any]) -> list[bool]:
        """Per variable, whether ``perturb`` lets it be perturbed."""
        if self.perturb is None:
            return [True] * len(variables)
        if self.perturb == "normalization":
            chosen = {
                id(v)
                for layer in internals.all_layers(self.model, include_self=True)
                if isinstance(layer, NORMALIZATION_LAYERS)
                for v in layer.trainable_variables
            }
            return [id(v) in chosen for v in variables]
        predicate = cast(Callable[[Any], bool], self.perturb)
        return [bool(predicate(v)) for v in variables]

    def current_rho(self) -> Any:
        """ρ at the optimizer's current step (a float32 scalar)."""
        return rho_lib.rho_at(
            self.rho, self.optimizer.iterations, lambda: self.optimizer.learning_rate
        )

    def to_replica(self, tensors: list) -> list:
        """Global-batch gradients as each replica's share for the optimizer (which
        sums over replicas): divided by the replicas in ``"global"`` scope."""
        if self.perturbation_scope != "global":
            return tensors
        replicas = backend.num_replicas()
        return [None if t is None else t / replicas for t in tensors]

    def to_global(self, tensors: list) -> list:
        """Per-replica gradients summed over replicas in ``"global"`` scope."""
        if self.perturbation_scope != "global":
            return tensors
        return backend.all_reduce_sum(tensors)

    def add_slots(self, name: str, aggregation: str = "none") -> list:
        """One float32 zeros variable per trainable variable of the model, saved with
        the wrapper (per-parameter state of a variant: LookSAM, Friendly-SAM); for
        `build_state`, when the model's variables exist."""
        return [
            self.add_weight(
                shape=v.shape,
                initializer="zeros",
                dtype="float32",
                trainable=False,
                aggregation=aggregation,
                name=f"{name}_{i}",
            )
            for i, v in enumerate(self.model.trainable_variables)
        ]

    # ------------------------------------------------------------------ helpers
    def _track_loss(self, loss: Any, x: Any) -> None:
        # Compiled losses are divided by the number of replicas (Keras' own
        # convention); the tracker reports the per-sample mean loss.
        batch_size = ops.shape(keras.tree.flatten(x)[0])[0]
        internals.loss_tracker(self).update_state(
            loss * backend.num_replicas(), sample_weight=batch_size
        )

    def _apply(self, grads: list, finite: Any, decoupled: list | None) -> None:
        """optimizer.apply, then ``w -= decoupled``, skipping a step whose
        gradients are not finite.

        `LossScaleOptimizer` skips such steps itself (and lowers its scale); for
        any other optimizer the step is skipped here, so a NaN or inf in a batch
        never reaches the weights or the optimizer state. Under XLA the
        decoupled update runs inside the same conditional, as one taken after it
        kept the decoupled update and the gradients alive at once (WSAM on a
        144 MiB MLP, the compiled step's buffers: 722 MiB after, 614 MiB inside);
        elsewhere after it, where TensorFlow's executor held more with it inside
        (the process's peak 1.4 copies above SGD's after, 2.9 inside, without XLA).
        """
        variables = self.trainable_variables
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            backend.apply_gradients(self.optimizer, grads, variables)  # JAX-safe apply
        else:
            if not self.optimizer.built:
                self.optimizer.build(variables)
            if decoupled is not None and backend.traced_for_xla(finite):
                step = self._step_and_subtract
                backend.apply_if_finite(step, grads, variables, finite, decoupled)
                return
            backend.apply_if_finite(self.optimizer.apply, grads, variables, finite)
        if decoupled is not None:
            _subtract_if(finite, variables, decoupled)

    def _step_and_subtract(self, grads: list, variables: list, decoupled: list) -> None:
        """optimizer.apply, then ``w -= decoupled`` (inside `_apply`'s conditional)."""
        self.optimizer.apply(grads, variables)
        _subtract_if(None, variables, decoupled)

    def _keep_state_of_skipped_step(self, state_before: list, finite: Any) -> None:
        """A skipped step also leaves BatchNorm statistics and RNG state as they were."""
        for variable, before in zip(self.non_trainable_variables, state_before):
            variable.assign(ops.where(finite, variable.value, before))

    # ------------------------------------------------------------------ config
    def get_config(self) -> dict:
        config = super().get_config()
        config["rho"] = rho_lib.serialize_rho(self.rho)
        config["perturbation_scope"] = self.perturbation_scope
        if self.perturb is not None:
            config["perturb"] = (
                self.perturb
                if isinstance(self.perturb, str)
                else keras.saving.serialize_keras_object(self.perturb)
            )
        if self.num_batch_splits is not None:
            config["num_batch_splits"] = self.num_batch_splits
        return config

    @classmethod
    def from_config(cls, config: dict, custom_objects: Any = None) -> SharpnessAwareTrainer:
        config = dict(config)
        config["rho"] = rho_lib.deserialize_rho(config["rho"])
        if isinstance(config.get("perturb"), dict):
            config["perturb"] = keras.saving.deserialize_keras_object(config["perturb"])
        return super().from_config(config, custom_objects=custom_objects)


def _loss_scale(optimizer: Any) -> Any:
    """The factor ``optimizer`` scales losses by; None where it scales none (Keras'
    own `scale_loss` and no ``loss_scale_factor``: the gradients are then used as
    they are, where dividing by 1 would copy them eagerly)."""
    own = type(optimizer).scale_loss is keras.optimizers.Optimizer.scale_loss
    if own and getattr(optimizer, "loss_scale_factor", None) is None:
        return None
    return backend.loss_scale(optimizer)


def _unscale(grads: list, scale: Any) -> list:
    """Gradients without the mixed-precision loss scale (None: none), in float32
    (for norms)."""
    if scale is None:
        return [None if g is None else ops.cast(g, "float32") for g in grads]
    return [None if g is None else ops.cast(g, "float32") / scale for g in grads]


def handed_over(box: list) -> Any:
    """The one item of ``box``, taken out of it: eagerly, a value passed on this
    way is freed as soon as the callee lets it go (a local name would keep it)."""
    return box.pop()


def _batch_parts(batch: tuple, splits: int | None) -> list[tuple[tuple, Any]]:
    """``[(part, share)]``: contiguous parts of the batch and their share of it."""
    if splits is None or splits == 1:
        return [(batch, None)]
    size = ops.shape(keras.tree.flatten(batch[0])[0])[0]
    bounds = [(j * size) // splits for j in range(splits + 1)]
    parts = []
    for start, stop in itertools.pairwise(bounds):
        part = keras.tree.map_structure(
            lambda t, start=start, stop=stop: None if t is None else t[start:stop], batch
        )
        share = ops.cast(stop - start, "float32") / ops.cast(size, "float32")
        parts.append((part, share))
    return parts


def _refuse_custom_train_step(model: Any, wrapper: str) -> None:
    """A wrapper replaces the train step; a model's own `train_step` would be
    silently ignored, so such a model is refused."""
    if not isinstance(model, keras.Model):
        return  # ModelWrapper raises the TypeError
    if type(model).train_step is not keras.Model.train_step:
        raise TypeError(
            f"`model` ({type(model).__name__}) overrides `train_step`; {wrapper} replaces "
            "the train step with its own, so yours would be ignored. Either let the model "
            "compute its loss in `call` (with `self.add_loss(...)` or `compile(loss=...)`) "
            "and drop the custom `train_step`, or keep your step and use a Momentum-SAM "
            "optimizer (keras_sam.optimizers.MSAM or AdamWMSAM), which works inside any "
            "`train_step`."
        )


def _average(descents: list[tuple[Descent, Any]]) -> Descent:
    """The parts' descents weighted by their shares (one part: itself)."""
    if len(descents) == 1:
        return descents[0][0]
    shares = [share for _, share in descents]

    def weighted(per_part: list[list]) -> list:
        return [
            None if column[0] is None else sum(t * s for t, s in zip(column, shares))
            for column in zip(*per_part)
        ]

    decoupled: list | None = None
    if descents[0][0].decoupled is not None:
        decoupled = weighted([d.decoupled or [] for d, _ in descents])
    return Descent(weighted([d.grads for d, _ in descents]), decoupled)


def _concatenate(predictions: list) -> Any:
    if len(predictions) == 1:
        return predictions[0]
    return keras.tree.map_structure(lambda *parts: ops.concatenate(parts, axis=0), *predictions)


def _subtract_if(finite: Any, variables: Sequence[Any], updates: Sequence[Any]) -> None:
    """``w -= update`` for every variable with an update, where ``finite`` holds
    (``None``: always)."""
    for variable, update in zip(variables, updates):
        if update is None:
            continue
        update = ops.cast(update, variable.dtype)
        variable.assign_sub(update if finite is None else ops.where(finite, update, 0.0))
