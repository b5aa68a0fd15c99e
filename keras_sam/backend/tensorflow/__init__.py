"""TensorFlow implementations of the backend-specific gradient functions.

Two kinds of pass exist:

* the **clean pass** runs the model statefully at the current weights in training
  mode (it updates BatchNorm statistics, the dropout RNG and per-output loss
  metrics, exactly once per step, as a plain Keras step does);
* a **stateless pass** evaluates the model with given variable values through
  `stateless_call` / `stateless_compute_loss`; nothing it computes is written
  back, so a perturbed pass can never touch moving statistics or metrics, and no
  weight ever has to be restored.

Losses are multiplied by the optimizer's loss scale (mixed precision) before
differentiation, as Keras' own `train_step` does; gradients are returned scaled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf
from keras import ops, tree

from keras_sam import internals
from keras_sam.backend import common
from keras_sam.backend.common import (
    check_jit_compile,
    dispatched_train_function,
    loss_scale,
    stateful_train_step,
)
from keras_sam.backend.interface import Tensor
from keras_sam.backend.tensorflow.xla import compiles_inside_step, xla_compiled
from keras_sam.ops import is_finite, multiply_sample_weight

__all__ = [  # re-exported
    "check_jit_compile",
    "compiles_inside_step",
    "dispatched_train_function",
    "loss_scale",
    "stateful_train_step",
    "xla_compiled",
]


def snapshot(variables: Sequence[Any]) -> list[Tensor]:
    """The current values of ``variables``, read now (before later assignments)."""
    return [tf.identity(v.value) for v in variables]


def num_replicas() -> int:
    """Replicas in sync under the current `tf.distribute` strategy (1 without one)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def all_reduce_sum(tensors: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Sums per-replica tensors across replicas (identity on one replica)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return list(tensors)
    present = [t for t in tensors if t is not None]
    reduced = iter(context.all_reduce(tf.distribute.ReduceOp.SUM, present))
    return [None if t is None else next(reduced) for t in tensors]


def apply_if_finite(
    apply_fn: Any, grads: list, variables: Any, finite: Tensor, extra: list | None = None
) -> None:
    """``apply_fn(grads, variables[, extra])`` only where ``finite`` holds on every
    replica.

    ``apply_fn`` is an optimizer's apply (it may all-reduce and `merge_call`).
    Under a strategy that needs `merge_call` (Mirrored, MultiWorkerMirrored) a
    conditional around it must run in cross-replica context, as Keras'
    `LossScaleOptimizer` does; the replicas first agree on the flag, so they skip
    or step together and stay identical. Each replica's ``extra`` reaches its own
    replica's ``apply_fn``.
    """
    context = tf.distribute.get_replica_context()
    if (
        context is None
        or context.num_replicas_in_sync == 1
        or internals.strategy_supports_no_merge_call()
    ):
        arguments = common.with_extra((grads, variables), extra)
        ops.cond(finite, lambda: apply_fn(*arguments), lambda: None)
        return
    failures = context.all_reduce(tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, "float32"))

    def cross_replica(distribution: Any, grads: list, failures: Any, extra: Any) -> None:
        flag = distribution.experimental_local_results(failures)[0] < 0.5
        arguments = common.with_extra((grads, variables), extra)

        def step() -> None:
            distribution.extended.call_for_each_replica(apply_fn, args=arguments)

        ops.cond(flag, step, lambda: None)

    context.merge_call(cross_replica, args=(grads, failures, extra))


def allocator_probe() -> tuple[Any, Any]:
    """TensorFlow's allocator on the first GPU, else the CPU
    (`tf.config.experimental.get_memory_info`)."""
    device = "GPU:0" if tf.config.list_logical_devices("GPU") else "CPU:0"

    def reset() -> int:
        tf.config.experimental.reset_memory_stats(device)
        return tf.config.experimental.get_memory_info(device)["current"]

    return reset, lambda: tf.config.experimental.get_memory_info(device)["peak"]


try:  # TensorFlow's own test, as `tf.function(jit_compile=True)` sets it while tracing
    from tensorflow.python.ops import control_flow_util

    _traced_for_xla = control_flow_util.GraphOrParentsInXlaContext
except ImportError:  # pragma: no cover - a TensorFlow without it: sequence everywhere

    def _traced_for_xla(graph: Any) -> bool:
        return True


def _building_for_xla() -> bool:
    """Whether the graph being built is compiled by XLA (``jit_compile=True``)."""
    return bool(_traced_for_xla(tf.compat.v1.get_default_graph()))


def traced_for_xla(tensor: Tensor) -> bool:
    """Whether the graph being built is compiled by XLA (``jit_compile=True``)."""
    return _building_for_xla()


def sequenced(value: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """`common.sequenced` while a step is traced for XLA (``jit_compile=True``);
    ``value`` elsewhere: TensorFlow's executor runs the ops as they are written, and
    the recomputation the sequencing asks for would only add work."""
    if not traced_for_xla(value):
        return value
    return common.sequenced(value, tensors)


fused = common.unfused


def momentum_step_in_place(
    variable: Any,
    velocity: Any,
    scale: Tensor,
    learning_rate: Tensor,
    momentum: Tensor,
    gradient: Tensor,
    decay: Tensor | None,
    entrywise: Callable[[], None],
) -> bool:
    """Momentum-SAM's SGD step with TensorFlow's in-place training kernels, where no
    step is traced for XLA: ``ResourceApplyGradientDescent`` with ``-scale`` removes
    the perturbation (with ``decay`` and the weights themselves, it decays them),
    ``ResourceApplyMomentum`` is v ← momentum·v + g, w ← w − lr·v; ``entrywise()``
    when the gradient is not all finite (the kernels would write its NaN).

    Written with `keras.ops`, each variable's step allocates its intermediate
    tensors, and TensorFlow's executor runs the independent steps of many variables
    at once: the process held about one parameter copy more than SGD's (MSAM on a
    144 MiB MLP without XLA, ``python -m benchmarks.memory --xla off``). XLA fuses
    the `keras.ops` step itself."""
    if _building_for_xla():
        return False

    def kernels() -> None:
        _remove_perturbation(variable, velocity, scale)
        _decay(variable, decay)
        tf.raw_ops.ResourceApplyMomentum(
            var=_handle(variable),
            accum=_handle(velocity),
            lr=learning_rate,
            grad=gradient,
            momentum=momentum,
        )

    _when_finite(gradient, kernels, entrywise)
    return True


def adam_step_in_place(
    variable: Any,
    first_moment: Any,
    second_moment: Any,
    scale: Tensor,
    learning_rate: Tensor,
    betas: tuple[Tensor, Tensor],
    beta_powers: tuple[Tensor, Tensor],
    epsilon: Tensor,
    gradient: Tensor,
    decay: Tensor | None,
    entrywise: Callable[[], None],
) -> bool:
    """Momentum-SAM's AdamW step with TensorFlow's in-place training kernels, where
    no step is traced for XLA: ``ResourceApplyGradientDescent`` removes the
    perturbation, ``ResourceApplyAdam`` steps (m ← m + (1 − β₁)(g − m), v likewise,
    w ← w − lr·√(1 − β₂ᵗ)/(1 − β₁ᵗ)·m/(√v + ε)), ``ResourceApplyGradientDescent``
    decays; ``entrywise()`` when the gradient is not all finite. The kernel forms
    1 − β in float32 from β (for β₂ = 0.999, 1 − β₂ is 0.99998713e-3, not 1e-3), so
    its second moment moves a relative 1.3e-5 less per step than Keras' Adam's (and
    the `keras.ops` step's); with 1 − β exact in float32 (β = 0.5, 0.75) the kernel
    and Keras' Adam agree bit for bit. The `keras.ops` step held about two parameter
    copies more than this one (AdamW-MSAM on the 144 MiB MLP without XLA, ``python
    -m benchmarks.memory --xla off``)."""
    if _building_for_xla():
        return False

    def kernels() -> None:
        _remove_perturbation(variable, first_moment, scale)
        tf.raw_ops.ResourceApplyAdam(
            var=_handle(variable),
            m=_handle(first_moment),
            v=_handle(second_moment),
            beta1_power=beta_powers[0],
            beta2_power=beta_powers[1],
            lr=learning_rate,
            beta1=betas[0],
            beta2=betas[1],
            epsilon=epsilon,
            grad=gradient,
        )
        _decay(variable, decay)

    _when_finite(gradient, kernels, entrywise)
    return True


def shift_in_place(variable: Any, direction: Any, coeff: Tensor) -> bool:
    """w ← w + coeff·d with ``ResourceApplyGradientDescent`` (``alpha = -coeff``),
    for a float32 or float64 variable, where no step is traced for XLA.

    Assigning the shifted value allocates a new buffer for the variable. When
    `fit` removed Momentum-SAM's perturbation that way at its end, the next `fit`'s
    XLA steps on the 144 MiB MLP grew the process by 99 MiB more than SGD's (9 MiB
    in place; ``python -m benchmarks.memory --models wide --methods msam``)."""
    dtype = keras.backend.standardize_dtype(variable.dtype)
    if dtype not in ("float32", "float64") or _building_for_xla():
        return False
    tf.raw_ops.ResourceApplyGradientDescent(
        var=_handle(variable), alpha=-tf.cast(coeff, dtype), delta=tf.convert_to_tensor(direction)
    )
    return True


def _when_finite(
    gradient: Tensor, kernels: Callable[[], None], entrywise: Callable[[], None]
) -> None:
    """``kernels()`` when ``gradient`` is all finite, else ``entrywise()`` (a graph
    conditional; eagerly, a branch on the host)."""
    finite = is_finite(gradient)
    if tf.executing_eagerly():
        (kernels if bool(finite) else entrywise)()
    else:
        tf.cond(finite, kernels, entrywise)


def _remove_perturbation(variable: Any, direction: Any, scale: Tensor) -> None:
    """w ← w + scale·d in place."""
    tf.raw_ops.ResourceApplyGradientDescent(
        var=_handle(variable), alpha=-scale, delta=tf.convert_to_tensor(direction)
    )


def _decay(variable: Any, decay: Tensor | None) -> None:
    """w ← w − decay·w in place (nothing when ``decay`` is None)."""
    if decay is not None:
        tf.raw_ops.ResourceApplyGradientDescent(
            var=_handle(variable), alpha=decay, delta=tf.convert_to_tensor(variable)
        )


def _handle(variable: Any) -> Any:
    """The resource handle of a `keras.Variable` or `tf.Variable` (under
    tf.distribute, in an update call: the copy on the device being updated)."""
    if isinstance(variable, keras.Variable):
        variable = internals.raw_value(variable)
    return variable.handle


def apply_gated(apply_fn: Any, grads: list, variables: Any, finite: Tensor) -> None:
    """``apply_fn(grads, variables, gate)``: the flag agreed on every replica (an
    all-reduce in replica context, no `merge_call`) as a float32 gate. No
    conditional: XLA copies the operands of one whose branch writes the weights
    (Momentum-SAM's step peaked two parameter copies higher that way)."""
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        failures = context.all_reduce(tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, "float32"))
        finite = failures < 0.5
    apply_fn(grads, variables, tf.cast(finite, "float32"))


def apply_gradients(optimizer: Any, grads: list, variables: Sequence[Any]) -> None:
    """``optimizer.apply(grads, variables)`` (it all-reduces under `tf.distribute`)."""
    optimizer.apply(grads, variables)


def cross_replica_call(fn: Callable, strategy: Any, *args: Any) -> Any:
    """``fn(distribution, *args)`` once for all replicas (a merge call where the
    strategy needs one), each ``arg`` read on the first replica; ``distribution``
    is None without a strategy."""
    if strategy is None:
        return fn(None, *args)

    def merged(distribution: Any, *values: Any) -> Any:
        return fn(distribution, *[_first_local(distribution, value) for value in values])

    return internals.merge_call(merged, strategy, *args)


def update_variable(distribution: Any, variable: Any, fn: Callable, *args: Any) -> None:
    """``fn(variable, *args)`` on every copy of ``variable`` (cross-replica context);
    Keras variables among ``args`` are passed as their per-device values."""
    if distribution is None:
        fn(variable, *args)
        return
    distribution.extended.update(
        _tf_value(variable), fn, args=tuple(_tf_value(a) for a in args), group=False
    )


def is_multi_worker(strategy: Any) -> bool:
    """Whether ``strategy`` is a MultiWorkerMirroredStrategy over several workers."""
    return isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ) and internals.in_multi_worker_mode(strategy)


def builds_model_in_first_step(strategy: Any) -> bool:
    """True without a strategy: Keras' TensorFlow trainer then builds an unbuilt
    model while tracing the first step (under a strategy it builds one before)."""
    return strategy is None


def _tf_value(value: Any) -> Any:
    """The `tf.Variable` behind a ``keras.Variable``; anything else unchanged."""
    return value.value if isinstance(value, keras.Variable) else value


def _first_local(distribution: Any, value: Any) -> Any:
    """The first replica's component of a per-replica value (the value itself else)."""
    if distribution is None or value is None:
        return value
    return distribution.experimental_local_results(value)[0]


def forward_and_gradients(
    trainer: Any, x: Any, y: Any, sample_weight: Any, wrt: Sequence[Any]
) -> tuple[Tensor, Any, list[Tensor | None]]:
    """Clean pass: loss, predictions and gradients of the scaled loss w.r.t. ``wrt``.

    Only the backward ops that lead to ``wrt`` are built, so asking for the
    gradients of a few top layers stops backpropagation at the lowest of them.
    """
    with tf.GradientTape() as tape:
        y_pred, loss = common.clean_forward(trainer, x, y, sample_weight)
        scaled = trainer.optimizer.scale_loss(loss)
    grads = tape.gradient(scaled, list(wrt)) if wrt else []
    return loss, y_pred, [_dense(g) for g in grads]


def forward_and_sample_scores(
    trainer: Any, x: Any, y: Any, sample_weight: Any
) -> tuple[Tensor, Any, Tensor]:
    """Clean pass without weight gradients: loss, predictions, per-sample scores.

    The score of sample i is ∂loss/∂s_i at s = 1, where every sample weight is
    multiplied by s_i. For any loss with a per-sample reduction this is sample
    i's (weighted) loss up to a positive batch-wide factor, so ranking by it ranks
    by the training loss actually optimized, for any compiled loss, loss weights
    and multiple outputs. Only the loss reduction is differentiated: the model's
    backward pass is not built.
    """
    unit = _ones_per_sample(x)
    with tf.GradientTape() as tape:
        tape.watch(unit)
        weighted = multiply_sample_weight(sample_weight, unit)
        y_pred, loss = common.clean_forward(trainer, x, y, weighted)
    scores = tape.gradient(loss, unit, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return loss, y_pred, scores


def forward_gradients_and_sample_scores(
    trainer: Any, x: Any, y: Any, sample_weight: Any, wrt: Sequence[Any]
) -> tuple[Tensor, Any, list[Tensor | None], Tensor]:
    """`forward_and_gradients` that also returns the per-sample scores of
    `forward_and_sample_scores` (unscaled), from the same pass."""
    unit = _ones_per_sample(x)
    with tf.GradientTape() as tape:
        tape.watch(unit)
        weighted = multiply_sample_weight(sample_weight, unit)
        y_pred, loss = common.clean_forward(trainer, x, y, weighted)
        scaled = trainer.optimizer.scale_loss(loss)
    *grads, scores = tape.gradient(scaled, [*wrt, unit])
    scores = tf.zeros_like(unit) if scores is None else scores / loss_scale(trainer.optimizer)
    return loss, y_pred, [_dense(g) for g in grads], scores


def stateless_sample_scores(
    trainer: Any,
    trainable_values: Sequence[Tensor],
    non_trainable_values: Sequence[Tensor],
    x: Any,
    y: Any,
    sample_weight: Any,
) -> Tensor:
    """Per-sample scores (as `forward_and_sample_scores`) at the given values; a
    forward pass and the loss reduction's backward only; nothing is written."""
    unit = _ones_per_sample(x)
    with tf.GradientTape() as tape:
        tape.watch(unit)
        loss = _stateless_loss(
            trainer,
            list(trainable_values),
            list(non_trainable_values),
            x,
            y,
            multiply_sample_weight(sample_weight, unit),
        )
    return tape.gradient(loss, unit, unconnected_gradients=tf.UnconnectedGradients.ZERO)


def stateless_uniform(shape: Sequence[int], seed: Tensor) -> Tensor:
    """Uniform [0, 1) float32 numbers, a pure function of ``seed`` (two int32)."""
    return tf.random.stateless_uniform(shape, seed=tf.cast(seed, "int32"))


def stateless_gradients(
    trainer: Any,
    trainable_values: Sequence[Tensor],
    non_trainable_values: Sequence[Tensor],
    x: Any,
    y: Any,
    sample_weight: Any,
) -> tuple[Tensor, list[Tensor | None]]:
    """Loss and gradients w.r.t. all trainable variables, evaluated at the given values.

    Nothing is written to the model: BatchNorm statistics, RNG state and metrics
    are left exactly as they are.
    """
    trainable_values = list(trainable_values)
    with tf.GradientTape() as tape:
        tape.watch(trainable_values)
        loss = _stateless_loss(
            trainer, trainable_values, list(non_trainable_values), x, y, sample_weight
        )
        scaled = trainer.optimizer.scale_loss(loss)
    return loss, tape.gradient(scaled, trainable_values)


def _stateless_loss(
    trainer: Any,
    trainable_values: list,
    non_trainable_values: list,
    x: Any,
    y: Any,
    sample_weight: Any,
) -> Tensor:
    """The compiled loss of a training-mode forward at the given values; writes nothing."""
    metrics_values = [v.value for v in trainer.metrics_variables]
    loss, _, _, _ = common.stateless_loss(
        trainer, trainable_values, non_trainable_values, metrics_values, x, y, sample_weight
    )
    return loss


def _ones_per_sample(x: Any) -> Tensor:
    """A float32 1 per sample of ``x`` (the factors per-sample scores differentiate)."""
    return tf.ones([tf.shape(tree.flatten(x)[0])[0]], dtype="float32")


def _dense(gradient: Any) -> Any:
    if isinstance(gradient, tf.IndexedSlices):
        return tf.convert_to_tensor(gradient)
    return gradient


# --------------------------------------------------------------------------- sharpness
def function(fn: Callable) -> Callable:
    """``fn`` compiled as a graph (`tf.function`, shape-polymorphic)."""
    return tf.function(fn, reduce_retracing=True)


def gradient(fn: Callable[[list], Tensor], values: Sequence[Tensor]) -> list[Tensor]:
    """∇fn(values) for a scalar ``fn`` of a list of tensors (zeros where unconnected)."""
    values = [tf.convert_to_tensor(v) for v in values]
    with tf.GradientTape() as tape:
        tape.watch(values)
        out = fn(values)
    return tape.gradient(out, values, unconnected_gradients=tf.UnconnectedGradients.ZERO)


def hessian_vector_product(
    fn: Callable[[list], Tensor], values: Sequence[Tensor], vectors: Sequence[Tensor]
) -> list[Tensor]:
    """H·v for the Hessian H of a scalar ``fn`` at ``values`` (forward over reverse)."""
    values = [tf.convert_to_tensor(v) for v in values]
    with tf.autodiff.ForwardAccumulator(values, list(vectors)) as accumulator:
        grads = gradient(fn, values)
    return [
        tf.zeros_like(v) if p is None else p
        for v, p in zip(values, accumulator.jvp(grads, unconnected_gradients="zero"))
    ]
