"""Shared machinery of the Momentum-SAM optimizers (Becker, Altrock, Risse, arXiv 2401.12033).

Both flavours (:class:`~keras_sam.optimizers.MSAM` and :class:`~keras_sam.optimizers.AdamWMSAM`)
keep the model variables at the *perturbed* point between steps::

    w~ = w - s * d,        s = rho_t / ||d||   (0 when ||d|| = 0)

where ``d`` is the flavour's direction slot (SGD momentum, resp. Adam's raw first moment) and
``||d||`` is one global L2 norm over every trained variable. One step does:

1. (inside ``update_step``, fused with the base update) remove the stored perturbation,
   ``w = w~ + s_old * d_old``, then apply the base optimizer's update to ``w``;
2. (in :meth:`MomentumPerturbationOptimizer.apply`, after the base ``apply``) compute
   ``s_new = rho_t / ||d_new||`` over all variables at once and re-perturb
   ``w~ = w - s_new * d_new``.

A non-finite gradient never reaches the weights, and is checked without a conditional
(`keras_sam.backend.apply_gated`) and without a reduction before any update: each
entry whose gradient is NaN or infinite keeps its clean weight and its slots
(`keras_sam.ops.where_finite`, one select in the update's own loop), is re-perturbed
with the others, and the step counter is restored when any gradient was not finite. A
NaN loss (every gradient NaN) thus leaves the optimizer's state as it was and the
perturbed weights within rounding of where they were. The check is per entry so that
each update is written as soon as its gradient is computed, as the base optimizer's
is: a step skipped as a whole must hold every gradient until the last is checked,
and one skipped per variable puts a reduction between each gradient and its update,
which XLA scheduled after several more gradients (0.42 parameter copies of compiled
temporaries above SGD on JAX; per entry, none). With ``use_ema``, gradient
accumulation or variables overwritten by their gradient (state written outside
``update_step``) the whole step runs inside `keras_sam.backend.apply_if_finite`'s
conditional instead.

Under XLA the step is written in place (`keras_sam.backend.sequenced`, a data
dependency that orders two computations): a flavour computes the new weights from the
old slots and writes the slots after them (`slots_after`), and the re-perturbation's
scale depends on the written weights, so XLA neither keeps a copy of each old slot for
the weights nor fuses steps 1 and 2 into one loop that needs the old and the new
direction at once. In an eager step (JAX without ``jit_compile``) each variable's
update and re-perturbation is one compiled program (`keras_sam.backend.fused`), which
allocates its results and no intermediate tensor.

The *applied* scale ``s`` is stored in the ``perturbation_scale`` slot, so the removal takes away
exactly what was added even when ``rho`` follows a schedule (the authors' SGD code recomputes it
from the current ``rho`` and leaves residue when ``rho`` changes). A second scalar slot,
``is_perturbed``, makes :meth:`~MomentumPerturbationOptimizer.remove_perturbation` /
:meth:`~MomentumPerturbationOptimizer.apply_perturbation` idempotent and keeps saved optimizer
state consistent with the saved weights.

Slot layout (optimizer variables, in creation order; changing it breaks loading of saved
optimizer state): ``iteration``, ``learning_rate`` (float learning rates only), the EMA slots
(``use_ema``), the gradient accumulators (``gradient_accumulation_steps``), the flavour's
per-variable slots, ``perturbation_scale``, ``is_perturbed``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import keras
from keras import ops

from keras_sam import backend, internals
from keras_sam.ops import all_finite, global_norm, safe_ratio
from keras_sam.rho import RhoLike, deserialize_rho, rho_at, serialize_rho, validate_rho
from keras_sam.validation import check_real

_MISSING_CALLBACK_WARNING = (
    "{name}: the model variables are kept at the perturbed point w - rho*d/||d|| between "
    "steps. `fit` removes the perturbation when it returns, but validation during `fit`, "
    "ModelCheckpoint, BackupAndRestore and EarlyStopping(restore_best_weights=True) see the "
    "perturbed weights unless you pass `callbacks=[keras_sam.callbacks.MSAMCallback(), ...]` "
    "(first in the list). In a custom training loop, wrap evaluation and saving in "
    "`with optimizer.unperturbed(): ...`."
)


class MomentumPerturbationOptimizer(keras.optimizers.Optimizer):
    """Base class of the Momentum-SAM optimizers (not meant to be used directly).

    A subclass creates its slots in :meth:`_build_slots`, says which per-variable slot is the
    perturbation direction in :meth:`_direction_slots`, and writes ``update_step`` as a
    pure function of the variable's values run through `keras_sam.backend.fused`, using
    `unperturbed` (the clean weights ``w~ + s*d``), `decayed` (decoupled weight decay on
    the clean weights), `slots_after` and `keras_sam.ops.where_finite` (each entry
    whose gradient is not finite keeps its clean weight and slots).
    Everything global (the norm over all variables, re-perturbation, ``rho`` schedules,
    gradient accumulation, tf.distribute) lives here.

    Args:
        learning_rate: float or schedule, as for any Keras optimizer.
        rho: perturbation radius ``rho >= 0``: a float or a callable of the (update) step,
            e.g. a ``keras.optimizers.schedules.LearningRateSchedule``.
        **kwargs: the base ``keras.optimizers.Optimizer`` arguments.

    Raises:
        TypeError: ``rho`` or ``weight_decay`` of a wrong type.
        ValueError: ``rho`` or ``weight_decay`` negative, NaN or infinite.

    Examples:
        The flavours are the usable classes:

        >>> import keras_sam
        >>> optimizer = keras_sam.optimizers.MSAM(learning_rate=0.1, momentum=0.9, rho=0.3)
        >>> isinstance(optimizer, keras_sam.optimizers.MomentumPerturbationOptimizer)
        True

    References:
        Becker, Altrock, Risse. Momentum-SAM: Sharpness Aware Minimization without
        Computational Overhead. [arXiv:2401.12033](https://arxiv.org/abs/2401.12033)
    """

    def __init__(self, learning_rate: Any, rho: RhoLike, **kwargs: Any) -> None:
        rho = validate_rho(rho, "rho")
        weight_decay = kwargs.pop("weight_decay", None)
        if weight_decay is not None:
            weight_decay = check_real(weight_decay, "weight_decay", low=0.0)
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, **kwargs)
        self.rho = rho
        self._attached_callbacks = 0
        self._warned_missing_callback = False

    # ------------------------------------------------------------------ flavour hooks
    def _build_slots(self, variables: list) -> None:
        raise NotImplementedError

    def _direction_slots(self) -> list:
        """Per-variable direction slots, aligned with ``self._trainable_variables``."""
        raise NotImplementedError

    def _add_slots(self, variables: list, name: str) -> list:
        """One zeros slot per variable, named after it (``None`` for variables whose
        value is overwritten by their gradient, e.g. float8 scales), as Keras 3.9's
        ``add_optimizer_variables``; written here so older Keras 3 works too."""
        return [
            None
            if getattr(v, "overwrite_with_gradient", False)
            else self.add_variable_from_reference(v, name)
            for v in variables
        ]

    # ------------------------------------------------------------------ build / state
    def build(self, variables: list) -> None:
        if self.built:
            return
        super().build(variables)
        self._build_slots(variables)
        self._perturbation_scale = self.add_variable(
            shape=(), initializer="zeros", dtype="float32", name="perturbation_scale"
        )
        self._is_perturbed = self.add_variable(
            shape=(), initializer="zeros", dtype="float32", name="is_perturbed"
        )

    @property
    def is_perturbed(self) -> bool:
        """Whether the model variables currently hold the perturbed weights (eager only)."""
        if not self.built:
            return False
        return bool(float(ops.convert_to_numpy(self._is_perturbed)) > 0.5)

    @property
    def perturbation_scale(self) -> float:
        """The stored scale ``rho_t / ||d||`` of the last perturbation (eager only)."""
        if not self.built:
            return 0.0
        return float(ops.convert_to_numpy(self._perturbation_scale))

    def _applied_scale(self, dtype: Any) -> Any:
        """``is_perturbed * perturbation_scale``: what the stored weights currently carry."""
        return ops.cast(ops.multiply(self._is_perturbed, self._perturbation_scale), dtype)

    def _decay_rate(self, variable: Any, learning_rate: Any) -> Any:
        """``lr * wd``, the decoupled weight decay's factor for ``variable``; None
        where it does not decay."""
        if self.weight_decay is None or not internals.uses_weight_decay(self, variable):
            return None
        return ops.multiply(learning_rate, ops.cast(self.weight_decay, variable.dtype))

    def _apply_weight_decay(self, variables: list) -> None:
        # Keras would decay the *stored* (perturbed) weights before update_step; the flavours
        # decay the clean weights inside update_step instead (see `decayed`).
        return

    # ------------------------------------------------------------------ the step
    def apply(self, grads: Any, trainable_variables: Any = None) -> Any:
        """One step; no NaN or inf in a gradient ever reaches the weights.

        An entry whose gradient is not finite keeps its clean weight and slots,
        and the step is not counted (the check agrees across replicas); with
        ``use_ema`` or gradient accumulation such a step is skipped entirely.
        """
        grads = list(grads)
        if not grads:
            return super().apply(grads, trainable_variables)
        if trainable_variables is not None:
            trainable_variables = list(trainable_variables)
        if not self.built and trainable_variables is not None:
            self.build(trainable_variables)
        finite = all_finite(grads)
        if self.use_ema or self.gradient_accumulation_steps or self._overwrites_with_gradient():
            backend.apply_if_finite(self._apply_finite, grads, trainable_variables, finite)
        else:
            backend.apply_gated(self._apply_gated, grads, trainable_variables, finite)

    def _overwrites_with_gradient(self) -> bool:
        return any(
            getattr(v, "overwrite_with_gradient", False)
            for v in internals.optimizer_variables_order(self)
        )

    def _apply_gated(self, grads: list, trainable_variables: Any, gate: Any) -> None:
        self._apply_finite(grads, trainable_variables)
        counter = internals.iterations_variable(self)  # the base `apply` counted the step
        counter.assign_sub(ops.cast(1.0 - gate, counter.dtype))

    def _apply_finite(self, grads: list, trainable_variables: Any) -> None:
        self._maybe_warn_missing_callback()
        # rho is a function of the number of real (update) steps taken before this one; the
        # learning rate schedule sees the same step when gradient accumulation is off.
        rho_t = rho_at(self.rho, self.iterations, lambda: self.learning_rate)
        update_mask = None
        if self.gradient_accumulation_steps:
            is_update = ops.equal(
                ops.mod(internals.iterations_variable(self) + 1, self.gradient_accumulation_steps),
                0,
            )
            update_mask = ops.cast(is_update, "float32")
        result = super().apply(grads, trainable_variables)
        variables = trainable_variables if trainable_variables is not None else None
        if variables is None:
            variables = internals.optimizer_variables_order(self)
        with_grad = {
            internals.variable_key(self, v) for g, v in zip(grads, variables) if g is not None
        }
        self._reperturb(rho_t, update_mask, with_grad)
        return result

    def _perturbation_triples(self, with_grad: set) -> list:
        return [
            (variable, direction, internals.variable_key(self, variable) in with_grad)
            for variable, direction in zip(
                internals.optimizer_variables_order(self), self._direction_slots()
            )
            if direction is not None
        ]

    def _reperturb(self, rho_t: Any, update_mask: Any, with_grad: set) -> None:
        triples = self._perturbation_triples(with_grad)

        def cross_replica(distribution: Any, rho_t: Any, update_mask: Any) -> None:
            self._reperturb_cross_replica(triples, rho_t, update_mask, distribution)

        backend.cross_replica_call(cross_replica, self._strategy(), rho_t, update_mask)

    def _reperturb_cross_replica(
        self, triples: list, rho_t: Any, update_mask: Any, distribution: Any
    ) -> None:
        new_scale = safe_ratio(rho_t, global_norm([direction for _, direction, _ in triples]))
        new_scale = backend.sequenced(new_scale, [variable for variable, _, _ in triples])
        old_scale = ops.convert_to_tensor(self._perturbation_scale)
        old_flag = ops.convert_to_tensor(self._is_perturbed)
        old_applied = ops.multiply(old_flag, old_scale)
        if update_mask is None:
            scale_for_grad = new_scale
            scale_delta = ops.subtract(new_scale, old_applied)
            stored_scale = new_scale
            stored_flag = ops.ones_like(old_flag)
        else:
            keep = ops.subtract(1.0, update_mask)
            scale_for_grad = ops.multiply(update_mask, new_scale)
            scale_delta = ops.multiply(update_mask, ops.subtract(new_scale, old_applied))
            stored_scale = ops.add(ops.multiply(update_mask, new_scale), keep * old_scale)
            stored_flag = ops.add(update_mask, ops.multiply(keep, old_flag))
        shifts = [
            (variable, direction, scale_for_grad if has_grad else scale_delta)
            for variable, direction, has_grad in triples
        ]
        # Variables with a gradient had the old perturbation removed inside update_step, so
        # they receive the full new one; the others move from the old to the new scale.
        self._shift_weights(shifts, sign=-1.0, distribution=distribution)
        self._assign_scalars(stored_scale, stored_flag, distribution)

    # ------------------------------------------------------------------ variable writes
    def _shift_weights(self, shifts: list, sign: float, distribution: Any = None) -> None:
        """``w += sign * c * d`` for every ``(w, d, c)``; every copy under tf.distribute."""

        def shift(variable: Any, direction: Any, coeff: Any) -> None:
            if backend.shift_in_place(variable, direction, sign * coeff):
                return
            value = ops.convert_to_tensor(variable)
            variable.assign(_shifted(value, ops.convert_to_tensor(direction), sign * coeff))

        for variable, direction, coeff in shifts:
            backend.update_variable(distribution, variable, shift, direction, coeff)

    def _assign_scalars(self, scale: Any, flag: Any, distribution: Any = None) -> None:
        for variable, value in ((self._perturbation_scale, scale), (self._is_perturbed, flag)):
            backend.update_variable(distribution, variable, lambda v, x: v.assign(x), value)

    # ------------------------------------------------------------------ eager helpers
    def _strategy(self) -> Any:
        """The TensorFlow strategy the optimizer was built under (None elsewhere);
        eagerly, outside a step, this is the cross-replica context of its updates."""
        if keras.backend.backend() != "tensorflow":
            return None
        return internals.optimizer_strategy(self)

    def remove_perturbation(self) -> bool:
        """Moves the model variables to the clean weights ``w = w~ + s*d`` (eager).

        Idempotent: does nothing when the weights are already clean.

        Returns:
            ``True`` if the weights were perturbed and have been moved back.
        """
        if not self.is_perturbed:
            return False
        scale = ops.convert_to_tensor(self._perturbation_scale)
        shifts = [(v, d, scale) for v, d, _ in self._perturbation_triples(set())]
        distribution = self._strategy()
        self._shift_weights(shifts, sign=1.0, distribution=distribution)
        self._assign_scalars(scale, ops.zeros((), "float32"), distribution)
        return True

    def apply_perturbation(self) -> bool:
        """Moves clean weights back to the stored perturbed point ``w~ = w - s*d`` (eager).

        Re-applies exactly the stored scale ``s`` (not the current ``rho``). Idempotent: does
        nothing when the weights are already perturbed or the optimizer is not built.

        Returns:
            ``True`` if the weights were clean and have been perturbed.
        """
        if not self.built or self.is_perturbed:
            return False
        scale = ops.convert_to_tensor(self._perturbation_scale)
        shifts = [(v, d, scale) for v, d, _ in self._perturbation_triples(set())]
        distribution = self._strategy()
        self._shift_weights(shifts, sign=-1.0, distribution=distribution)
        self._assign_scalars(scale, ops.ones((), "float32"), distribution)
        return True

    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Context manager: clean weights inside, the previous state restored on exit.

        Example:

        ```python
        with optimizer.unperturbed():
            model.save("model.keras")
            model.evaluate(x_val, y_val)
        ```
        """
        removed = self.remove_perturbation()
        try:
            yield
        finally:
            if removed:
                self.apply_perturbation()

    def finalize_variable_values(self, var_list: list) -> None:
        """Called by ``fit`` at the end: leaves the model at the clean weights."""
        self.remove_perturbation()
        super().finalize_variable_values(var_list)

    # ------------------------------------------------------------------ callback bookkeeping
    def attach_callback(self) -> None:
        """Called by `MSAMCallback` when `fit` begins (silences the missing-callback warning)."""
        self._attached_callbacks += 1

    def detach_callback(self) -> None:
        """Called by `MSAMCallback` when `fit` ends."""
        self._attached_callbacks = max(0, self._attached_callbacks - 1)

    def _maybe_warn_missing_callback(self) -> None:
        if self._attached_callbacks or self._warned_missing_callback:
            return
        self._warned_missing_callback = True
        warnings.warn(_MISSING_CALLBACK_WARNING.format(name=type(self).__name__), stacklevel=3)

    # ------------------------------------------------------------------ config
    def get_config(self) -> dict:
        config = super().get_config()
        config["rho"] = serialize_rho(self.rho)
        return config

    @classmethod
    def from_config(cls, config: dict, custom_objects: Any = None) -> Any:
        config = dict(config)
        if "rho" in config:
            config["rho"] = deserialize_rho(config["rho"])
        return super().from_config(config, custom_objects=custom_objects)


# ---------------------------------------------------------------------- the flavours' arithmetic
# Pure functions of tensors: each flavour's step on one variable is one of them run
# through `keras_sam.backend.fused` (one compiled program per variable in an eager
# JAX step, traced with the rest elsewhere).
def unperturbed(weights: Any, scale: Any, direction: Any) -> Any:
    """The clean weights ``w~ + s * d`` from the stored ones."""
    return ops.add(weights, ops.multiply(scale, direction))


def decayed(weights: Any, rate: Any) -> Any:
    """Decoupled weight decay ``w - lr * wd * w`` (``rate = lr * wd``; None: no decay)."""
    return weights if rate is None else ops.subtract(weights, ops.multiply(weights, rate))


def slots_after(
    weights: Any, slots_from: Callable[..., Any], coefficients: tuple, slots: Any
) -> Any:
    """The new slot values ``slots = slots_from(*coefficients)``, recomputed under
    XLA from coefficients made to depend on the new ``weights``
    (`keras_sam.backend.sequenced`), so that the weights, computed from the old
    slots, are written first and the slots then in place (otherwise XLA keeps a
    copy of each old slot for the weights); ``slots`` as they are elsewhere."""
    after = tuple(backend.sequenced(c, [weights]) for c in coefficients)
    if all(a is c for a, c in zip(after, coefficients)):
        return slots
    return slots_from(*after)


def _shift(weights: Any, direction: Any, coeff: Any) -> Any:
    """``w + c * d``, formed in float32 for weights of a lower precision."""
    delta = ops.multiply(ops.cast(coeff, "float32"), ops.cast(direction, "float32"))
    return ops.add(weights, ops.cast(delta, weights.dtype))


_shifted = backend.fused(_shift)
