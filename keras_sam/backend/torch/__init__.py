"""PyTorch implementations of the backend-specific gradient functions.

Keras' PyTorch trainer is stateful and eager, like TensorFlow's: `fit` calls
``train_step(data)``, variables hold the state, and a step's ops run one by one
(``jit_compile=True`` wraps the train function in `torch.compile`). So the step
skeleton runs as on TensorFlow; what differs is how gradients are taken:

* the step runs under `torch.no_grad` (`stateful_train_step`), so the ε
  arithmetic, the optimizer's update and the state bookkeeping build no autograd
  graph; each pass below turns gradients on for itself alone;
* a pass differentiates with `torch.autograd.grad` w.r.t. the tensors it asks
  about (the variables' parameters for the clean pass, fresh leaves holding the
  given values for a stateless pass), so no ``.grad`` attribute is read or
  written and nothing accumulates between passes;
* the **clean pass** calls the model statefully (BatchNorm statistics, the
  dropout seed and metrics are updated once); a **stateless pass** goes through
  `stateless_call` / `stateless_compute_loss` and writes nothing.

Losses are multiplied by the optimizer's loss scale before differentiation;
gradients are returned scaled, as on the other backends. There are no replicas:
Keras' PyTorch backend trains on one device (its `keras.distribution` API is
JAX-only), so `num_replicas` is 1 and `all_reduce_sum` is the identity.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from keras import ops, tree

from keras_sam.backend import common
from keras_sam.backend.common import (
    builds_model_in_first_step,
    compiles_inside_step,
    cross_replica_call,
    dispatched_train_function,
    is_multi_worker,
    loss_scale,
    update_variable,
    xla_compiled,
)
from keras_sam.backend.interface import Tensor
from keras_sam.ops import multiply_sample_weight

__all__ = [  # the shared pieces of the interface, re-exported
    "builds_model_in_first_step",
    "compiles_inside_step",
    "cross_replica_call",
    "dispatched_train_function",
    "is_multi_worker",
    "loss_scale",
    "update_variable",
    "xla_compiled",
]


# --------------------------------------------------------------------------- the step
def stateful_train_step(step: Callable[[Any, Any], dict]) -> Callable[..., Any]:
    """``step`` run under `torch.no_grad`: only the passes record autograd graphs."""

    @functools.wraps(step)
    def train_step(*args: Any) -> dict:
        with torch.no_grad():
            return step(*args)

    return train_step


def check_jit_compile(jit_compile: Any, what: str) -> None:
    """Refuses ``jit_compile=True``: the two-pass step does not go through `torch.compile`.

    Keras' PyTorch trainer would wrap the train function in `torch.compile`; a
    keras_sam step takes gradients with `torch.autograd.grad` in several passes
    and branches on the host (skipped non-finite steps, host-chosen step kinds),
    which TorchDynamo fails on (internal errors while building guards, seen with
    torch 2.13), and on a CPU its compilation alone takes minutes. Keras' own
    default on PyTorch, ``jit_compile="auto"``, is eager.
    """
    if jit_compile is True:
        raise ValueError(
            f"{what} runs eagerly on the PyTorch backend: `jit_compile=True` (torch.compile) "
            "is not supported for its two-pass train step. Use `jit_compile=False` or the "
            'default `jit_compile="auto"` (eager on PyTorch). The Momentum-SAM optimizers '
            "(keras_sam.optimizers.MSAM, AdamWMSAM) train a plain model without a wrapper."
        )


def snapshot(variables: Sequence[Any]) -> list[Tensor]:
    """Copies of the current values of ``variables`` (later assignments are in place)."""
    return [v.value.detach().clone() for v in variables]


def num_replicas() -> int:
    """1: Keras' PyTorch trainer runs one replica."""
    return 1


def all_reduce_sum(tensors: Sequence[Tensor | None]) -> list[Tensor | None]:
    """The identity: there is one replica."""
    return list(tensors)


def allocator_probe() -> tuple[Any, Any]:
    """PyTorch's CUDA allocator when a GPU is present; ``(None, None)`` on a CPU."""
    if not torch.cuda.is_available():
        return None, None

    def reset() -> int:
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    return reset, torch.cuda.max_memory_allocated


apply_if_finite = common.apply_if_finite_on_host
apply_gated = common.apply_gated
traced_for_xla = common.never_traced_for_xla
sequenced = common.unsequenced
fused = common.unfused
momentum_step_in_place = common.no_step_in_place
adam_step_in_place = common.no_step_in_place
shift_in_place = common.no_step_in_place


def apply_gradients(optimizer: Any, grads: list, variables: Sequence[Any]) -> None:
    """``optimizer.apply(grads, variables)`` without recording a graph."""
    with torch.no_grad():
        optimizer.apply(grads, variables)


# --------------------------------------------------------------------------- passes
def _grad(output: Tensor, inputs: Sequence[Tensor]) -> list[Tensor | None]:
    """∂output/∂inputs (``None`` where an input does not reach ``output``)."""
    if not inputs:
        return []
    return list(torch.autograd.grad(output, list(inputs), allow_unused=True))


def _ones_per_sample(x: Any) -> Tensor:
    """A float32 1 per sample of ``x``, a leaf whose gradient is the sample scores."""
    batch_size = ops.shape(tree.flatten(x)[0])[0]
    return ops.ones((batch_size,), "float32").requires_grad_(True)


def _parameters(variables: Sequence[Any]) -> list[Tensor]:
    return [v.value for v in variables]


def forward_and_gradients(
    trainer: Any, x: Any, y: Any, sample_weight: Any, wrt: Sequence[Any]
) -> tuple[Tensor, Any, list[Tensor | None]]:
    """Clean pass: loss, predictions and gradients of the scaled loss w.r.t. ``wrt``."""
    with torch.enable_grad():
        y_pred, loss = common.clean_forward(trainer, x, y, sample_weight)
        grads = _grad(trainer.optimizer.scale_loss(loss), _parameters(wrt))
    return loss.detach(), _detached(y_pred), grads


def forward_and_sample_scores(
    trainer: Any, x: Any, y: Any, sample_weight: Any
) -> tuple[Tensor, Any, Tensor]:
    """Clean pass without weight gradients: loss, predictions, per-sample scores
    (∂loss/∂s_i at s = 1 for sample weights multiplied by s; see the TensorFlow
    version). Only the loss reduction is differentiated."""
    unit = _ones_per_sample(x)
    with torch.enable_grad():
        weighted = multiply_sample_weight(sample_weight, unit)
        y_pred, loss = common.clean_forward(trainer, x, y, weighted)
        (scores,) = _grad(loss, [unit])
    return loss.detach(), _detached(y_pred), _zeros_if_none(scores, unit)


def forward_gradients_and_sample_scores(
    trainer: Any, x: Any, y: Any, sample_weight: Any, wrt: Sequence[Any]
) -> tuple[Tensor, Any, list[Tensor | None], Tensor]:
    """`forward_and_gradients` and the (unscaled) per-sample scores, from one pass."""
    unit = _ones_per_sample(x)
    with torch.enable_grad():
        weighted = multiply_sample_weight(sample_weight, unit)
        y_pred, loss = common.clean_forward(trainer, x, y, weighted)
        *grads, scores = _grad(trainer.optimizer.scale_loss(loss), [*_parameters(wrt), unit])
    scores = _zeros_if_none(scores, unit) / loss_scale(trainer.optimizer)
    return loss.detach(), _detached(y_pred), grads, scores


def stateless_gradients(
    trainer: Any,
    trainable_values: Sequence[Tensor],
    non_trainable_values: Sequence[Tensor],
    x: Any,
    y: Any,
    sample_weight: Any,
) -> tuple[Tensor, list[Tensor | None]]:
    """Loss and gradients w.r.t. all trainable variables, evaluated at the given
    values; nothing is written to the model."""
    leaves = [v.detach().requires_grad_(True) for v in trainable_values]
    with torch.enable_grad():
        loss = _stateless_loss(trainer, leaves, list(non_trainable_values), x, y, sample_weight)
        grads = _grad(trainer.optimizer.scale_loss(loss), leaves)
    return loss.detach(), grads


def stateless_sample_scores(
    trainer: Any,
    trainable_values: Sequence[Tensor],
    non_trainable_values: Sequence[Tensor],
    x: Any,
    y: Any,
    sample_weight: Any,
) -> Tensor:
    """Per-sample scores (as `forward_and_sample_scores`) at the given values."""
    unit = _ones_per_sample(x)
    with torch.enable_grad():
        weighted = multiply_sample_weight(sample_weight, unit)
        loss = _stateless_loss(
            trainer, list(trainable_values), list(non_trainable_values), x, y, weighted
        )
        (scores,) = _grad(loss, [unit])
    return _zeros_if_none(scores, unit)


def stateless_uniform(shape: Sequence[int], seed: Tensor) -> Tensor:
    """Uniform [0, 1) float32 numbers, a pure function of ``seed`` (two int32)."""
    first, second = (int(s) for s in ops.convert_to_numpy(seed).reshape(-1)[:2])
    generator = torch.Generator().manual_seed(((first & 0xFFFFFFFF) << 32) | (second & 0xFFFFFFFF))
    values = torch.rand(tuple(int(d) for d in shape), generator=generator, dtype=torch.float32)
    return ops.convert_to_tensor(values)


def _stateless_loss(
    trainer: Any,
    trainable_values: list,
    non_trainable_values: list,
    x: Any,
    y: Any,
    sample_weight: Any,
) -> Tensor:
    metrics_values = [v.value for v in trainer.metrics_variables]
    loss, _, _, _ = common.stateless_loss(
        trainer, trainable_values, non_trainable_values, metrics_values, x, y, sample_weight
    )
    return loss


def _detached(structure: Any) -> Any:
    return tree.map_structure(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, structure)


def _zeros_if_none(gradient: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if gradient is None else gradient


# --------------------------------------------------------------------------- sharpness
def function(fn: Callable) -> Callable:
    """``fn`` itself: PyTorch runs eagerly."""
    return fn


def gradient(fn: Callable[[list], Tensor], values: Sequence[Tensor]) -> list[Tensor]:
    """∇fn(values) for a scalar ``fn`` of a list of tensors (zeros where unconnected)."""
    leaves = [ops.convert_to_tensor(v).detach().requires_grad_(True) for v in values]
    with torch.enable_grad():
        grads = _grad(fn(leaves), leaves)
    return [_zeros_if_none(g, v) for g, v in zip(grads, leaves)]


def hessian_vector_product(
    fn: Callable[[list], Tensor], values: Sequence[Tensor], vectors: Sequence[Tensor]
) -> list[Tensor]:
    """H·v for the Hessian H of a scalar ``fn`` at ``values`` (reverse over reverse)."""
    leaves = [ops.convert_to_tensor(v).detach().requires_grad_(True) for v in values]
    with torch.enable_grad():
        grads = torch.autograd.grad(fn(leaves), leaves, create_graph=True, allow_unused=True)
        connected = [(g, ops.convert_to_tensor(u)) for g, u in zip(grads, vectors) if g is not None]
        inner = sum((g * u).sum() for g, u in connected) if connected else None
        products = _grad(inner, leaves) if inner is not None and inner.requires_grad else []
    products = products or [None] * len(leaves)
    return [_zeros_if_none(p, v).detach() for p, v in zip(products, leaves)]
