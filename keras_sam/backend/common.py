"""Backend helpers that are the same on every backend (written once, in `keras.ops`).

The backend packages import what they need from here; the functions that a
backend without replicas or graph tracing implements trivially (JAX's SPMD
programs and PyTorch's eager steps alike) are defined here once as well.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from keras import ops

from keras_sam import internals
from keras_sam.backend.interface import Reader, Tensor, Writer


def apply_if_finite_on_host(
    apply_fn: Any, grads: list, variables: Any, finite: Any, extra: list | None = None
) -> None:
    """``apply_fn(grads, variables[, extra])`` only when ``finite`` holds: a
    host-side branch, for eager steps (PyTorch; the placeholders of backends that
    cannot train)."""
    if bool(ops.convert_to_numpy(finite)):
        apply_fn(*with_extra((grads, variables), extra))


def with_extra(arguments: tuple, extra: list | None) -> tuple:
    """An update's arguments, ``extra`` appended when it is given."""
    return arguments if extra is None else (*arguments, extra)


def apply_gated(apply_fn: Any, grads: list, variables: Any, finite: Any) -> None:
    """``apply_fn(grads, variables, gate)``, ``finite`` as a float32 gate: there is
    one replica to agree with."""
    apply_fn(grads, variables, ops.cast(finite, "float32"))


def sequenced(value: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """``value``, made to depend on every tensor of ``tensors`` (one element each,
    gathered into one vector, through ``min(|t|, 0)``, which is 0 for every number
    but NaN; one small computation for all of them, not one per tensor: each is
    compiled code, about 0.16 MiB per variable on TensorFlow's XLA on a CPU).

    For a compiler that fuses element-wise work (XLA): a tensor with a second
    consumer is materialized rather than fused into its other consumer, so an
    update written in two parts (the Momentum-SAM step before and after the norm
    of every new direction) is written in place part by part, instead of fused
    into one loop that needs the inputs of both (a copy of every momentum slot).
    """
    if not tensors:
        return value
    dtype = ops.convert_to_tensor(value).dtype
    firsts = [ops.cast(ops.reshape(ops.convert_to_tensor(t), (-1,))[:1], dtype) for t in tensors]
    first = firsts[0] if len(firsts) == 1 else ops.concatenate(firsts)
    return ops.add(value, ops.sum(ops.minimum(ops.abs(first), 0.0)))


def never_traced_for_xla(tensor: Tensor) -> bool:
    """False: no step is compiled by XLA (PyTorch; the placeholders)."""
    return False


def unsequenced(value: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """``value``: eager steps run in the order written (PyTorch; the placeholders)."""
    return value


def unfused(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` itself: the backend compiles no piece of an eager step (TensorFlow,
    whose steps are graphs with in-place kernels or XLA programs; PyTorch; the
    placeholders)."""
    return function


def no_step_in_place(*args: Any) -> bool:
    """False: the backend has no in-place step kernels (the `keras.ops` step is
    written instead)."""
    return False


def no_allocator_probe() -> tuple[None, None]:
    """``(None, None)``: the backend does not report its allocator's peak (JAX, whose
    CPU devices give no memory statistics and whose GPU peak cannot be reset)."""
    return None, None


def loss_scale(optimizer: Any) -> Tensor:
    """The factor `optimizer.scale_loss` multiplies a loss by (1 without scaling)."""
    return ops.cast(optimizer.scale_loss(ops.convert_to_tensor(1.0)), "float32")


def stateless_loss(
    trainer: Any,
    trainable_values: list,
    non_trainable_values: list,
    metrics_values: list,
    x: Any,
    y: Any,
    sample_weight: Any,
) -> tuple[Tensor, Any, list, list]:
    """Training-mode forward and compiled loss at the given values; writes nothing.

    Returns ``(loss, y_pred, new_non_trainable_values, new_metrics_values)``; the
    model's ``add_loss`` terms of this forward are part of the loss.
    """
    y_pred, non_trainable_values, losses = trainer.stateless_call(
        trainable_values, non_trainable_values, x, training=True, return_losses=True
    )
    with internals.losses_override(trainer, losses):
        loss, (_, non_trainable_values, metrics_values) = trainer.stateless_compute_loss(
            trainable_values,
            non_trainable_values,
            metrics_values,
            x=x,
            y=y,
            y_pred=y_pred,
            sample_weight=sample_weight,
            training=True,
        )
    return loss, y_pred, non_trainable_values, metrics_values


def clean_forward(trainer: Any, x: Any, y: Any, sample_weight: Any) -> tuple[Any, Tensor]:
    """A stateful training-mode forward and its compiled loss: ``(y_pred, loss)``."""
    y_pred = trainer(x, training=True)
    loss = trainer.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
    return y_pred, loss


# ------------------------------------------------------- backends with stateful variables
def check_jit_compile(jit_compile: Any, what: str) -> None:
    """Nothing to check: the backend compiles the whole step (XLA) when asked."""


def stateful_train_step(step: Callable[[Any, Any], dict]) -> Callable[..., Any]:
    """Identity: the trainer calls ``train_step(data)`` on stateful variables."""
    return step


def dispatched_train_function(
    trainer: Any, choose: Callable[[Reader], Any], after: Callable[[Reader, Writer], None]
) -> Callable[[Any], Any]:
    """Keras' train function, running one of several compiled train functions per call.

    ``choose(read)`` returns the compiled train function to run (built by Keras'
    `make_train_function`); ``after(read, write)`` runs when it has returned.
    ``read(variable)`` is the variable's value (numpy) and ``write(variable,
    value)`` assigns one. Here (TensorFlow, PyTorch) a train function is
    ``f(iterator_or_data) -> logs`` and the variables hold the training state.
    """

    def read(variable: Any) -> Any:
        return ops.convert_to_numpy(variable.value)

    def write(variable: Any, value: Any) -> None:
        variable.assign(value)

    def train_function(data: Any) -> Any:
        logs = choose(read)(data)
        after(read, write)
        return logs

    return train_function


# ------------------------------------------------------- backends without replicas
def compiles_inside_step(jit_compile: Any, strategy: Any) -> bool:
    """False: ``jit_compile`` compiles the whole step."""
    return False


def xla_compiled(function: Callable) -> Callable:
    """``function`` itself (never called: `compiles_inside_step` is False)."""
    return function


def cross_replica_call(fn: Callable, strategy: Any, *args: Any) -> Any:
    """``fn(None, *args)``: there is a single copy of every variable."""
    return fn(None, *args)


def update_variable(distribution: Any, variable: Any, fn: Callable, *args: Any) -> None:
    """``fn(variable, *args)``."""
    fn(variable, *args)


def is_multi_worker(strategy: Any) -> bool:
    """False: no `tf.distribute` strategy exists."""
    return False


def builds_model_in_first_step(strategy: Any) -> bool:
    """False: Keras builds an unbuilt model before the first step."""
    return False
