"""JAX implementations of the backend-specific gradient functions.

Keras' JAX trainer is stateless: `fit` calls ``train_step(state, data)`` with the
values of every variable and expects ``(logs, new_state)`` back, and it
`jax.jit`-compiles that function. keras_sam's step skeleton
(`SharpnessAwareTrainer.train_step`) is written once, statefully: it reads
``v.value`` and calls ``v.assign``. `stateful_train_step` runs it inside a
`keras.StatelessScope` that maps every variable of the state to its value, so
reads see the state, assignments are collected, and the collected values are the
new state. The hooks (`ascent`, `perturbation`, `after_step`) and the `keras.ops`
math therefore run unchanged on JAX.

The functions below have the TensorFlow versions' contracts; "stateful" here
means "assigns to variables in the current scope":

* the **clean pass** differentiates a pure function (`stateless_call` +
  `stateless_compute_loss` at the current values) with `jax.value_and_grad`, then
  assigns the new non-trainable state (BatchNorm statistics, RNG seeds) and the
  per-output loss metrics, once;
* a **stateless pass** differentiates the same pure function at given values and
  writes nothing.

Losses are multiplied by the optimizer's loss scale before differentiation;
gradients are returned scaled, as on TensorFlow.

Distribution (`keras.distribution.DataParallel`):

* ``perturbation_scope="global"``: `jax.jit` compiles one SPMD program for the
  global batch, so every gradient seen here is the global-batch gradient;
  `num_replicas` is 1, `all_reduce_sum` the identity, and the step is exactly one
  device's on the global batch (K-SAM ranks the samples of the whole global batch,
  LayerwiseSAM ranks layers by the global-batch gradient).
* ``perturbation_scope="replica"`` (default) on more than one device:
  `stateful_train_step` runs the step once per device inside `jax.shard_map`
  (`keras_sam.backend.jax.replicas`). Each device computes its own ascent
  gradient, ε and perturbed gradient on its shard of the batch (m-sharpness with
  m = the per-device batch, as each replica does under
  `tf.distribute.MirroredStrategy`; K-SAM ranks the samples of the device's
  shard, LayerwiseSAM ranks layers by device 0's gradient). The functions below
  then follow TensorFlow's replica conventions: losses are divided by the number
  of devices, `num_replicas` is that number, `all_reduce_sum` is a `psum`, and
  the optimizer steps with the gradients summed over the devices (the
  global-batch gradient when ρ = 0), so every device takes the same step or
  skips it. BatchNorm statistics are averaged over the devices, metrics summed,
  and the logs are the global batch's; see `keras_sam.backend.jax.replicas`.
  Other distributions (`ModelParallel`) keep the global semantics and warn.

Cost notes: `apply_if_finite` runs the optimizer update inside `jax.lax.cond`
on the values it assigns, so XLA updates the (donated) state in place; selecting
between old and new values with `where` kept both alive (on a 4-layer MLP, by the
compiled step's memory analysis, the step's temporaries fell from 1.81 to 1.09
parameter copies for SAM and from 4.0 to 2.0 for AdamW-MSAM; SGD's are 0.68).
The Momentum-SAM optimizers use `apply_gated` instead, with no conditional at all,
and check each gradient entry themselves (their step's temporaries 2.0 → 1.37
copies on that MLP with the gate, 1.03 with a per-variable check and the in-place
step, `sequenced`; per entry, SGD's own on a wider MLP).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import keras
from keras import ops, tree

from keras_sam import batchnorm, internals
from keras_sam.backend import common
from keras_sam.backend.common import (
    builds_model_in_first_step,
    check_jit_compile,
    compiles_inside_step,
    cross_replica_call,
    is_multi_worker,
    loss_scale,
    update_variable,
    xla_compiled,
)
from keras_sam.backend.interface import Reader, Tensor, Writer
from keras_sam.backend.jax import replicas as jax_replicas
from keras_sam.ops import multiply_sample_weight

__all__ = [  # the shared pieces of the interface, re-exported
    "builds_model_in_first_step",
    "check_jit_compile",
    "compiles_inside_step",
    "cross_replica_call",
    "is_multi_worker",
    "loss_scale",
    "update_variable",
    "xla_compiled",
]


# --------------------------------------------------------------------------- the step
def stateful_train_step(step: Callable[[Any, Any], dict]) -> Callable[..., Any]:
    """Turns a stateful ``step(trainer, data) -> logs`` into Keras' JAX train step.

    The returned ``train_step(trainer, state, data) -> (logs, new_state)`` maps
    ``state = (trainable, non_trainable, optimizer, metrics)`` values onto the
    trainer's variables in a `keras.StatelessScope`, runs ``step`` and returns the
    values the variables hold at its end.
    """

    @functools.wraps(step)
    def train_step(trainer: Any, state: Any, data: Any) -> tuple[dict, tuple]:
        groups = _state_variables(trainer)

        def run(state: Any, data: Any) -> tuple[dict, tuple]:
            mapping = [
                (variable, value)
                for variables, values in zip(groups, state)
                for variable, value in zip(variables, values)
            ]
            with keras.StatelessScope(state_mapping=mapping) as scope:
                logs = step(trainer, data)
            new_state = tuple(
                [scope.get_current_value(v) for v in variables] for variables in groups
            )
            return logs, new_state

        # perturbation_scope="replica" on several devices: one step per device (shard_map).
        mesh = jax_replicas.data_parallel_mesh(trainer)
        if mesh is None:
            return run(state, data)
        return jax_replicas.per_device_step(run, trainer, groups, state, data, *mesh)

    return train_step


def _state_variables(trainer: Any) -> tuple[list, list, list, list]:
    """The variable lists of Keras' JAX train-step state, in its order."""
    return (
        list(trainer.trainable_variables),
        list(trainer.non_trainable_variables),
        list(trainer.optimizer.variables),
        list(trainer.metrics_variables),
    )


def dispatched_train_function(
    trainer: Any, choose: Callable[[Reader], Any], after: Callable[[Reader, Writer], None]
) -> Callable[[Any, Any], tuple]:
    """Keras' train function, running one of several compiled train functions per call.

    Same contract as the TensorFlow version. On JAX a train function is
    ``f(state, iterator) -> (logs, state)``; ``read`` and ``write`` act on the
    state (``write`` keeps the sharding of the value it replaces).
    """

    def train_function(state: Any, iterator: Any) -> tuple:
        where = {
            id(variable): (g, i)
            for g, variables in enumerate(_state_variables(trainer))
            for i, variable in enumerate(variables)
        }
        function = choose(_StateView(where, state).read)
        logs, state = function(state, iterator)
        view = _StateView(where, state)
        after(view.read, view.write)
        return logs, view.state

    return train_function


class _StateView:
    """Reads and writes variables' values in Keras' JAX train-step state.

    ``where`` maps ``id(variable)`` to its (group, position) in the state.
    """

    def __init__(self, where: dict[int, tuple[int, int]], state: Any) -> None:
        self.state = tuple(list(values) for values in state)
        self._where = where

    def read(self, variable: Any) -> Any:
        g, i = self._where[id(variable)]
        return ops.convert_to_numpy(self.state[g][i])

    def write(self, variable: Any, value: Any) -> None:
        g, i = self._where[id(variable)]
        old = self.state[g][i]
        self.state[g][i] = jax.device_put(jax.numpy.asarray(value, old.dtype), old.sharding)


# --------------------------------------------------------------------------- simple pieces
def snapshot(variables: Sequence[Any]) -> list[Tensor]:
    """The current values of ``variables`` (JAX arrays are immutable)."""
    return [v.value for v in variables]


def num_replicas() -> int:
    """The devices of a per-device step (``"replica"`` scope under DataParallel), else 1.

    Outside a per-device step the jit-compiled (SPMD) step computes the global loss.
    """
    replicas = jax_replicas.current()
    return 1 if replicas is None else replicas.size


def all_reduce_sum(tensors: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Sums over the devices of a per-device step (`psum`); else the identity
    (SPMD gradients are already global-batch gradients)."""
    return jax_replicas.psum(tensors)


class _OverlayScope(keras.StatelessScope):
    """A `StatelessScope` that reads through to the enclosing scope (or the variables).

    Assignments made inside stay in this scope; `updated` lists the variables
    assigned, in order, so a caller can decide what to keep.
    """

    def __init__(self) -> None:
        super().__init__()
        self.updated: dict[int, Any] = {}

    def __enter__(self) -> _OverlayScope:
        super().__enter__()
        self._outer = self.original_scope
        return self

    def add_update(self, update: Any) -> None:
        variable, _ = update
        self.updated[id(variable)] = variable
        super().add_update(update)

    def get_current_value(self, variable: Any) -> Any:
        value = self.state_mapping.get(id(variable))
        if value is not None:
            return value
        if self._outer is not None:
            value = self._outer.get_current_value(variable)
            if value is not None:
                return value
        return internals.raw_value(variable)

    def outer_value(self, variable: Any) -> Any:
        """The variable's value outside this scope."""
        if self._outer is not None:
            value = self._outer.get_current_value(variable)
            if value is not None:
                return value
        return internals.raw_value(variable)


def apply_if_finite(
    apply_fn: Any, grads: list, variables: Any, finite: Tensor, extra: list | None = None
) -> None:
    """``apply_fn(grads, variables[, extra])`` only where ``finite`` holds.

    A first trace of ``apply_fn`` in a scope that collects its assignments finds
    the variables it updates (its computations are unused, so XLA drops them);
    the update then runs as the taken branch of `jax.lax.cond` over those
    variables' values, the other branch returning them unchanged, so a skipped
    step leaves every variable bit-for-bit as it was. In a per-device step,
    ``apply_fn`` gets the gradients summed over the devices, and the step is taken
    on every device or on none (`jax_replicas.reduced_update`).

    In an eager step (``finite`` a concrete array: no ``jit_compile``) the branch is
    taken on the host (`common.apply_if_finite_on_host`): `jax.lax.cond` would
    compile the whole update into one program that holds every variable's old and
    new value at once, and the probe trace would compute the update a second time.
    """
    if not traced_for_xla(finite):
        common.apply_if_finite_on_host(apply_fn, grads, variables, finite, extra)
        return
    with jax_replicas.reduced_update(list(grads), finite) as (grads, finite):
        arguments = common.with_extra((grads, variables), extra)
        with _OverlayScope() as probe:
            apply_fn(*arguments)
        updated = list(probe.updated.values())
        before = [probe.outer_value(variable) for variable in updated]

        def taken(values: list) -> list:
            with _OverlayScope() as scope:
                for variable, value in zip(updated, values):
                    scope.state_mapping[id(variable)] = value
                apply_fn(*arguments)
                return [scope.state_mapping[id(variable)] for variable in updated]

        after = jax.lax.cond(jax.numpy.asarray(finite), taken, list, before)
        for variable, value in zip(updated, after):
            variable.assign(value)


allocator_probe = common.no_allocator_probe
momentum_step_in_place = common.no_step_in_place
adam_step_in_place = common.no_step_in_place
shift_in_place = common.no_step_in_place


def traced_for_xla(tensor: Tensor) -> bool:
    """Whether ``tensor`` is traced (inside `jax.jit`), not a concrete array."""
    return isinstance(tensor, jax.core.Tracer)


def sequenced(value: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """`common.sequenced` inside `jax.jit` (traced values); ``value`` in an eager
    step, whose operations run as they are written."""
    if not any(traced_for_xla(t) for t in [value, *tensors]):
        return value
    return common.sequenced(value, tensors)


def fused(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` under `jax.jit` when called with concrete arrays (a step without
    ``jit_compile``), so an optimizer's arithmetic on a variable is one program
    that allocates its results and nothing else; ``function`` itself on traced
    values (the step's own `jax.jit` compiles it with the rest).

    Eagerly, every `keras.ops` call allocates its result: Momentum-SAM's step
    allocated about seven tensors of a variable's shape, its re-perturbation two
    more. MSAM peaked 1.1 parameter copies above SGD on a 144 MiB MLP, 0.64 fused;
    AdamW-MSAM +0.30 and -0.56 above AdamW (``KERAS_BACKEND=jax python -m
    benchmarks.memory --models wide --xla off``)."""
    compiled = jax.jit(function)

    @functools.wraps(function)
    def call(*args: Any) -> Any:
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(args)):
            return function(*args)
        return compiled(*args)

    return call


def apply_gated(apply_fn: Any, grads: list, variables: Any, finite: Tensor) -> None:
    """``apply_fn(grads, variables, gate)``: the flag as a float32 gate, with no
    `jax.lax.cond` (whose branch operands XLA keeps beside its results). In a
    per-device step, ``apply_fn`` gets the gradients summed over the devices and a
    flag agreed on every device (`jax_replicas.reduced_update`)."""
    with jax_replicas.reduced_update(list(grads), finite) as (grads, finite):
        apply_fn(grads, variables, jax.numpy.asarray(finite).astype("float32"))


def apply_gradients(optimizer: Any, grads: list, variables: Sequence[Any]) -> None:
    """``optimizer.apply(grads, variables)`` through `stateless_apply`.

    `LossScaleOptimizer.apply` branches with `ops.cond` around assignments, which
    only works statefully; its `stateless_apply` is the JAX-safe equivalent. In a
    per-device step it gets the gradients summed over the devices.
    """
    if not optimizer.built:
        optimizer.build(variables)
    position = {id(v): i for i, v in enumerate(variables)}  # in the optimizer's order
    grads = [grads[position[id(v)]] for v in internals.optimizer_variables_order(optimizer)]
    with jax_replicas.reduced_update(grads, None) as (grads, _):
        optimizer_values = [v.value for v in optimizer.variables]
        trainable_values = [v.value for v in internals.optimizer_variables_order(optimizer)]
        new_trainable, new_optimizer = optimizer.stateless_apply(
            optimizer_values, grads, trainable_values
        )
        for variable, value in zip(internals.optimizer_variables_order(optimizer), new_trainable):
            variable.assign(value)
        for variable, value in zip(optimizer.variables, new_optimizer):
            variable.assign(value)


# --------------------------------------------------------------------------- passes
def _pure_loss(
    trainer: Any,
    trainable_values: list,
    non_trainable_values: list,
    metrics_values: list,
    x: Any,
    y: Any,
    sample_weight: Any,
) -> tuple[Tensor, Any, list, list]:
    """`common.stateless_loss`; in a per-device step the loss is divided by the
    number of devices, as Keras divides compiled losses under `tf.distribute`."""
    loss, y_pred, non_trainable_values, metrics_values = common.stateless_loss(
        trainer, trainable_values, non_trainable_values, metrics_values, x, y, sample_weight
    )
    return jax_replicas.scale_loss(loss), y_pred, non_trainable_values, metrics_values


def _current(trainer: Any) -> tuple[list, list, list]:
    return (
        [v.value for v in trainer.trainable_variables],
        [v.value for v in trainer.non_trainable_variables],
        [v.value for v in trainer.metrics_variables],
    )


def _commit_clean_state(trainer: Any, non_trainable_values: list, metrics_values: list) -> None:
    """Writes what the clean pass changed: BatchNorm statistics, RNG seeds, loss metrics."""
    for variable, value in zip(trainer.non_trainable_variables, non_trainable_values):
        variable.assign(value)
    for variable, value in zip(trainer.metrics_variables, metrics_values):
        variable.assign(value)


def _clean_value_and_grad(
    trainer: Any, x: Any, y: Any, sample_weight: Any, positions: Sequence[int]
) -> Callable[[], tuple]:
    """A pure function: the clean pass and the gradients w.r.t. ``positions``.

    Returns ``(loss, y_pred, new_ntv, new_mv, grads)`` with ``grads`` aligned with
    ``positions``.
    """
    trainable, non_trainable, metrics = _current(trainer)

    def loss_fn(chosen: list) -> tuple[Tensor, tuple]:
        values = list(trainable)
        for position, value in zip(positions, chosen):
            values[position] = value
        loss, y_pred, ntv, mv = _pure_loss(
            trainer, values, non_trainable, metrics, x, y, sample_weight
        )
        return trainer.optimizer.scale_loss(loss), (loss, y_pred, ntv, mv, _recorded_moments())

    def run() -> tuple:
        (_, (loss, y_pred, ntv, mv, moments)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            [trainable[p] for p in positions]
        )
        _escape_moments(moments)
        return loss, y_pred, ntv, mv, list(grads)

    return run


def _recorded_moments() -> list:
    """The BatchNorm statistics recorded so far (`keras_sam.batchnorm.record`),
    returned by a transformed loss function so that they escape the transformation."""
    record = batchnorm.being_recorded()
    return [] if record is None else list(record)


def _escape_moments(moments: list) -> None:
    """Replaces the recorded statistics (tracers of a finished transformation) by the
    values the transformation returned."""
    record = batchnorm.being_recorded()
    if record is not None:
        record[:] = tree.map_structure(jax.lax.stop_gradient, moments)


def _positions(trainer: Any, wrt: Sequence[Any]) -> list[int]:
    index = {id(v): i for i, v in enumerate(trainer.trainable_variables)}
    missing = [v.path for v in wrt if id(v) not in index]
    if missing:
        raise ValueError(f"Not trainable variables of the trainer: {missing}.")
    return [index[id(v)] for v in wrt]


def forward_and_gradients(
    trainer: Any, x: Any, y: Any, sample_weight: Any, wrt: Sequence[Any]
) -> tuple[Tensor, Any, list[Tensor | None]]:
    """Clean pass: loss, predictions and gradients of the scaled loss w.r.t. ``wrt``.

    Only the cotangents that lead to ``wrt`` are computed, so asking for the
    gradients of a few top layers stops backpropagation at the lowest of them.
    """
    loss, y_pred, ntv, mv, grads = _clean_value_and_grad(
        trainer, x, y, sample_weight, _positions(trainer, wrt)
    )()
    _commit_clean_state(trainer, ntv, mv)
    return loss, y_pred, grads


def forward_and_sample_scores(
    trainer: Any, x: Any, y: Any, sample_weight: Any
) -> tuple[Tensor, Any, Tensor]:
    """Clean pass without weight gradients: loss, predictions, per-sample scores.

    Same contract as the TensorFlow version: the score of sample i is ∂loss/∂s_i
    at s = 1, where every sample weight is multiplied by s_i.
    """
    trainable, non_trainable, metrics = _current(trainer)
    batch_size = ops.shape(tree.flatten(x)[0])[0]

    def loss_fn(unit: Tensor) -> tuple[Tensor, tuple]:
        weighted = multiply_sample_weight(sample_weight, unit)
        loss, y_pred, ntv, mv = _pure_loss(
            trainer, trainable, non_trainable, metrics, x, y, weighted
        )
        return loss, (y_pred, ntv, mv, _recorded_moments())

    (loss, (y_pred, ntv, mv, moments)), scores = jax.value_and_grad(loss_fn, has_aux=True)(
        ops.ones((batch_size,), "float32")
    )
    _escape_moments(moments)
    _commit_clean_state(trainer, ntv, mv)
    return loss, y_pred, scores


def forward_gradients_and_sample_scores(
    trainer: Any, x: Any, y: Any, sample_weight: Any, wrt: Sequence[Any]
) -> tuple[Tensor, Any, list[Tensor | None], Tensor]:
    """`forward_and_gradients` that also returns the per-sample scores of
    `forward_and_sample_scores` (unscaled), from the same pass."""
    trainable, non_trainable, metrics = _current(trainer)
    positions = _positions(trainer, wrt)
    batch_size = ops.shape(tree.flatten(x)[0])[0]

    def loss_fn(chosen: list, unit: Tensor) -> tuple[Tensor, tuple]:
        values = list(trainable)
        for position, value in zip(positions, chosen):
            values[position] = value
        weighted = multiply_sample_weight(sample_weight, unit)
        loss, y_pred, ntv, mv = _pure_loss(trainer, values, non_trainable, metrics, x, y, weighted)
        return trainer.optimizer.scale_loss(loss), (loss, y_pred, ntv, mv, _recorded_moments())

    (_, (loss, y_pred, ntv, mv, moments)), (grads, scores) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True
    )([trainable[p] for p in positions], ops.ones((batch_size,), "float32"))
    _escape_moments(moments)
    _commit_clean_state(trainer, ntv, mv)
    return loss, y_pred, list(grads), scores / loss_scale(trainer.optimizer)


def stateless_sample_scores(
    trainer: Any,
    trainable_values: Sequence[Tensor],
    non_trainable_values: Sequence[Tensor],
    x: Any,
    y: Any,
    sample_weight: Any,
) -> Tensor:
    """Per-sample scores (as `forward_and_sample_scores`) at the given values;
    nothing is written."""
    metrics = [v.value for v in trainer.metrics_variables]
    batch_size = ops.shape(tree.flatten(x)[0])[0]

    def loss_fn(unit: Tensor) -> Tensor:
        weighted = multiply_sample_weight(sample_weight, unit)
        return _pure_loss(
            trainer,
            list(trainable_values),
            list(non_trainable_values),
            metrics,
            x,
            y,
            weighted,
        )[0]

    return jax.grad(loss_fn)(ops.ones((batch_size,), "float32"))


def stateless_uniform(shape: Sequence[int], seed: Tensor) -> Tensor:
    """Uniform [0, 1) float32 numbers, a pure function of ``seed`` (two int32)."""
    key = jax.random.wrap_key_data(jax.numpy.asarray(seed, "uint32"), impl="threefry2x32")
    return jax.random.uniform(key, tuple(shape), "float32")


def stateless_gradients(
    trainer: Any,
    trainable_values: Sequence[Tensor],
    non_trainable_values: Sequence[Tensor],
    x: Any,
    y: Any,
    sample_weight: Any,
) -> tuple[Tensor, list[Tensor | None]]:
    """Loss and gradients w.r.t. all trainable variables, evaluated at the given values.

    Nothing is written: BatchNorm statistics, RNG state and metrics are left as
    they are.
    """
    non_trainable_values = list(non_trainable_values)
    metrics = [v.value for v in trainer.metrics_variables]

    def loss_fn(values: list) -> tuple[Tensor, Tensor]:
        loss, _, _, _ = _pure_loss(
            trainer, values, non_trainable_values, metrics, x, y, sample_weight
        )
        return trainer.optimizer.scale_loss(loss), loss

    (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(list(trainable_values))
    return loss, list(grads)


# --------------------------------------------------------------------------- sharpness
def function(fn: Callable) -> Callable:
    """``fn`` compiled with `jax.jit`."""
    return jax.jit(fn)


def gradient(fn: Callable[[list], Tensor], values: Sequence[Tensor]) -> list[Tensor]:
    """∇fn(values) for a scalar ``fn`` of a list of arrays."""
    return list(jax.grad(fn)(list(values)))


def hessian_vector_product(
    fn: Callable[[list], Tensor], values: Sequence[Tensor], vectors: Sequence[Tensor]
) -> list[Tensor]:
    """H·v for the Hessian H of a scalar ``fn`` at ``values`` (forward over reverse)."""
    return list(jax.jvp(jax.grad(fn), (list(values),), (list(vectors),))[1])
