"""The interface every backend package implements: `Backend`.

keras_sam's methods are written once, with `keras.ops`, against these
functions; ``keras_sam/backend/<name>/`` implements them for one Keras backend
(``tensorflow``, ``jax``, ``torch``; ``unsupported`` holds the placeholders of the
Keras backends that cannot train). Helpers that are the same on every backend live
in `keras_sam.backend.common` and are not part of this interface.
`tests/backend/test_interface.py` checks that every backend package defines every
function below with the same parameters.

Two kinds of pass exist. The **clean pass** runs the model at the current
weights in training mode and updates its state (BatchNorm statistics, dropout
RNG, per-output loss metrics) exactly once per step, as a plain Keras step does.
A **stateless pass** evaluates the model at given variable values and writes
nothing back. Losses are multiplied by the optimizer's loss scale before
differentiation; gradients come back scaled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

#: A backend tensor (`tf.Tensor`, `jax.Array`, `torch.Tensor`).
Tensor = Any
#: ``read(variable)``: a variable's current value as numpy, on the host.
Reader = Callable[[Any], Any]
#: ``write(variable, value)``: assigns a variable on the host.
Writer = Callable[[Any, Any], None]


class Backend(Protocol):
    """The functions a backend package defines at module level."""

    # ------------------------------------------------------------------ the step
    def stateful_train_step(self, step: Callable[[Any, Any], dict]) -> Callable[..., Any]:
        """Turns a stateful ``step(trainer, data) -> logs`` into the backend's
        ``train_step`` (identity where the trainer is stateful)."""

    def dispatched_train_function(
        self,
        trainer: Any,
        choose: Callable[[Reader], Callable],
        after: Callable[[Reader, Writer], None],
    ) -> Callable:
        """A train function that runs ``choose(read)`` (one of several train
        functions made by Keras) per call, then ``after(read, write)``."""

    def check_jit_compile(self, jit_compile: Any, what: str) -> None:
        """Raises `ValueError` when ``what`` cannot run with ``jit_compile`` here."""

    def compiles_inside_step(self, jit_compile: Any, strategy: Any) -> bool:
        """Whether ``jit_compile=True`` must compile the passes inside an uncompiled
        step (TensorFlow's multi-device MirroredStrategy) instead of the whole step."""

    def xla_compiled(self, function: Callable) -> Callable:
        """``function`` compiled with XLA on its own, for `compiles_inside_step`."""

    def snapshot(self, variables: Sequence[Any]) -> list[Tensor]:
        """The current values of ``variables``, read now (before later assignments)."""

    def num_replicas(self) -> int:
        """Replicas whose gradients the optimizer sums (1 without distribution)."""

    def all_reduce_sum(self, tensors: Sequence[Tensor | None]) -> list[Tensor | None]:
        """Sums per-replica tensors across replicas (identity on one replica)."""

    def apply_if_finite(
        self,
        apply_fn: Any,
        grads: list,
        variables: Any,
        finite: Tensor,
        extra: list | None = None,
    ) -> None:
        """``apply_fn(grads, variables)`` only where ``finite`` holds on every replica;
        ``apply_fn(grads, variables, extra)`` when ``extra`` (tensors the update
        needs besides the gradients, passed on as they are) is given."""

    def apply_gated(self, apply_fn: Any, grads: list, variables: Any, finite: Tensor) -> None:
        """``apply_fn(grads, variables, gate)`` with no conditional: ``gate`` is the
        flag agreed on every replica as a float32 1 or 0, for an update that checks
        each variable's gradient itself (Momentum-SAM) and uses the flag for what
        the whole step writes (the step counter)."""

    def traced_for_xla(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` belongs to a step being traced for XLA
        (``jit_compile=True``), which schedules and fuses the step as a whole;
        False where the operations run as they are written (an eager step,
        TensorFlow's executor)."""

    def sequenced(self, value: Tensor, tensors: Sequence[Tensor]) -> Tensor:
        """``value``, computed only once every tensor of ``tensors`` is: under XLA
        those are then materialized, not fused into ``value``'s consumers. Where no
        step is traced for XLA, ``value`` itself (the same object)."""

    def fused(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """``function``, a pure function of tensors (an optimizer's per-variable
        arithmetic), run as one compiled program per argument shape where the step
        runs eagerly and the backend compiles pieces of it (JAX without
        ``jit_compile``: `jax.jit`, so its intermediate tensors are never allocated);
        ``function`` itself elsewhere (a traced step compiles it with the rest)."""

    def momentum_step_in_place(
        self,
        variable: Any,
        velocity: Any,
        scale: Tensor,
        learning_rate: Tensor,
        momentum: Tensor,
        gradient: Tensor,
        decay: Tensor | None,
        entrywise: Callable[[], None],
    ) -> bool:
        """Momentum-SAM's SGD step on one variable with in-place kernels, where the
        backend has them and no step is traced for a compiler: w ← w + scale·v (the
        old perturbation removed), w ← w − decay·w when ``decay`` is given,
        v ← momentum·v + g, w ← w − learning_rate·v, with g the gradient: the
        arithmetic of the `keras.ops` step. A gradient that is not all finite is
        written by ``entrywise()`` instead (the `keras.ops` step, which skips its
        non-finite entries). Returns whether it wrote the step; False writes
        nothing (the caller then writes it with ``entrywise()``)."""

    def adam_step_in_place(
        self,
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
        """Momentum-SAM's AdamW step on one variable with in-place kernels, where
        the backend has them and no step is traced for a compiler: w ← w + scale·m
        (the old perturbation removed), the Adam step with ``betas`` (β₁, β₂) and
        ``beta_powers`` (β₁ᵗ, β₂ᵗ) on the gradient, then w ← w − decay·w when
        ``decay`` is given. A gradient that is not all finite is written by
        ``entrywise()`` instead, as in `momentum_step_in_place`. Returns whether it
        wrote the step; False writes nothing."""

    def shift_in_place(self, variable: Any, direction: Any, coeff: Tensor) -> bool:
        """w ← w + coeff·d on a float32 or float64 variable with an in-place kernel,
        where the backend has one and no step is traced for a compiler. Returns
        whether it wrote the shift; False writes nothing (the caller then assigns
        the shifted value)."""

    def allocator_probe(self) -> tuple[Any, Any]:
        """``(reset, read_peak)`` for the backend's allocator on the training device:
        ``reset()`` clears its peak and returns the bytes in use, ``read_peak()`` the
        peak since; ``(None, None)`` where the backend does not say."""

    def apply_gradients(self, optimizer: Any, grads: list, variables: Sequence[Any]) -> None:
        """``optimizer.apply(grads, variables)`` inside a train step."""

    # ------------------------------------------------------------------ passes
    def forward_and_gradients(
        self, trainer: Any, x: Any, y: Any, sample_weight: Any, wrt: Sequence[Any]
    ) -> tuple[Tensor, Any, list[Tensor | None]]:
        """Clean pass: loss, predictions and gradients of the scaled loss w.r.t. ``wrt``."""

    def forward_and_sample_scores(
        self, trainer: Any, x: Any, y: Any, sample_weight: Any
    ) -> tuple[Tensor, Any, Tensor]:
        """Clean pass without weight gradients: loss, predictions, per-sample scores
        (each sample's share of the loss, ``add_loss`` terms included)."""

    def forward_gradients_and_sample_scores(
        self, trainer: Any, x: Any, y: Any, sample_weight: Any, wrt: Sequence[Any]
    ) -> tuple[Tensor, Any, list[Tensor | None], Tensor]:
        """`forward_and_gradients` and the per-sample scores, from the same pass."""

    def stateless_gradients(
        self,
        trainer: Any,
        trainable_values: Sequence[Tensor],
        non_trainable_values: Sequence[Tensor],
        x: Any,
        y: Any,
        sample_weight: Any,
    ) -> tuple[Tensor, list[Tensor | None]]:
        """Stateless pass: loss and gradients w.r.t. every trainable variable."""

    def stateless_sample_scores(
        self,
        trainer: Any,
        trainable_values: Sequence[Tensor],
        non_trainable_values: Sequence[Tensor],
        x: Any,
        y: Any,
        sample_weight: Any,
    ) -> Tensor:
        """Stateless pass: the per-sample scores at the given values."""

    def stateless_uniform(self, shape: Sequence[int], seed: Tensor) -> Tensor:
        """Uniform [0, 1) float32 numbers, a pure function of ``seed`` (two int32)."""

    # ------------------------------------------------------------------ tf.distribute-style updates
    def cross_replica_call(self, fn: Callable, strategy: Any, *args: Any) -> Any:
        """``fn(distribution, *args)`` once for all replicas, each ``arg`` read on the
        first replica; ``distribution`` is None without a strategy."""

    def update_variable(self, distribution: Any, variable: Any, fn: Callable, *args: Any) -> None:
        """``fn(variable, *args)`` on every copy of ``variable`` (cross-replica context)."""

    def is_multi_worker(self, strategy: Any) -> bool:
        """Whether ``strategy`` spans several workers (`MultiWorkerMirroredStrategy`)."""

    def builds_model_in_first_step(self, strategy: Any) -> bool:
        """Whether Keras builds an unbuilt model only while tracing the first step."""

    # ------------------------------------------------------------------ sharpness
    def function(self, fn: Callable) -> Callable:
        """``fn`` compiled (shape-polymorphic where the backend retraces)."""

    def gradient(self, fn: Callable[[list], Tensor], values: Sequence[Tensor]) -> list[Tensor]:
        """∇fn(values) for a scalar ``fn`` of a list of tensors (zeros where unconnected)."""

    def hessian_vector_product(
        self, fn: Callable[[list], Tensor], values: Sequence[Tensor], vectors: Sequence[Tensor]
    ) -> list[Tensor]:
        """H·v for the Hessian H of a scalar ``fn`` at ``values``."""


#: The names every backend package defines.
FUNCTIONS = tuple(
    name for name, value in vars(Backend).items() if callable(value) and not name.startswith("_")
)
