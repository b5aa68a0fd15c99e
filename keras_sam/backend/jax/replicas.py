"""``perturbation_scope="replica"`` under `keras.distribution.DataParallel` (JAX).

Under `keras.distribution.DataParallel`, Keras' JAX trainer `jax.jit`-compiles
one SPMD program for the global batch: every gradient it computes is the
global-batch gradient, so on its own it can only do what one device does on the
global batch (``perturbation_scope="global"``). For ``"replica"`` (each device
perturbs with the gradient of its own shard, SAM's m-sharpness with m = the
per-device batch, as each replica does under `tf.distribute.MirroredStrategy`),
`per_device_step` runs the whole stateful step inside `jax.shard_map` over the
mesh's batch axis: the data is split on its first axis, the state is replicated,
and each device runs the step on its shard. Inside, the backend functions use
collectives over that axis and follow TensorFlow's replica conventions:

* every compiled loss is divided by the number of devices (`scale_loss`, as
  Keras does under `tf.distribute`), so a device's gradient is its shard's mean
  gradient over N, `num_replicas` is N (the reported loss is multiplied back) and
  ``all_reduce_sum`` (`psum`) of the devices' gradients is the global-batch
  gradient;
* the optimizer receives that sum (`reduced_update`): every device takes the
  same step, and with ρ = 0 the step is exactly the base optimizer's on the
  global batch; a step is skipped when its summed gradients are not finite
  (non-finite on any device), on every device alike.

After the step, the per-device states are merged into the replicated one:

* trainable and optimizer variables are identical on every device by
  construction (same values, same summed gradients) and are taken as they are;
* other variables follow their ``aggregation``: ``"sum"`` (Keras metrics) adds
  the devices' increments, so losses and metrics are those of the global batch;
  ``"mean"``, and ``"none"`` for floating-point values (BatchNorm moving
  statistics, frozen weights), average the devices' values (as
  ``old + mean(new - old)``, exact for unchanged values); ``"only_first_replica"``
  (LayerwiseSAM's ranking) and non-float ``"none"`` (RNG seeds) take device 0's;
* the logs are recomputed from the merged metrics.

RNG: each device other than device 0 draws from its seed generators' state
shifted by a per-device offset, so dropout masks differ between devices (as with
one device on the global batch); device 0 runs unshifted and its new seed state
is kept, so the seed state advances exactly as on one device.

Where the mesh has one device, no distribution is set, or the scope is
``"global"``, nothing of this runs: the step is Keras' ordinary jit-compiled
one. Other distributions (`keras.distribution.ModelParallel`) with more than one
data-parallel device keep the global semantics and warn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import keras
from jax.sharding import PartitionSpec

from keras_sam import internals

Tensor = Any

#: Added (times the device index) to the seed of every seed generator's state, so
#: that devices draw different dropout masks (2**32 / golden ratio, odd).
_SEED_OFFSET = 0x9E3779B9

_NOT_DATA_PARALLEL_WARNING = (
    "{name}: perturbation_scope='replica' (per-device perturbations, m-sharpness) is "
    "implemented on the JAX backend for keras.distribution.DataParallel only. Under "
    "keras.distribution.{distribution} with {devices} data-parallel devices the "
    "jit-compiled step sees the global-batch gradient, so the perturbation is computed "
    "from the whole global batch, exactly as with perturbation_scope='global' (one "
    "device on the global batch). Pass perturbation_scope='global' to silence this "
    "warning."
)


@dataclasses.dataclass
class Replicas:
    """The devices a per-device step runs on (set while `per_device_step` traces).

    Attributes:
        axis: the mesh axis the batch is split over.
        size: the number of devices on it.
        finite: whether the step's optimizer update was taken (the same on every
            device); ``None`` until the optimizer is applied.
        reduced: True inside `reduced_update` (the gradients are already summed).
    """

    axis: str
    size: int
    finite: Any = None
    reduced: bool = False


_local = threading.local()


def current() -> Replicas | None:
    """The devices of the per-device step being traced, or ``None`` outside one."""
    return getattr(_local, "replicas", None)


@contextlib.contextmanager
def _active(replicas: Replicas) -> Iterator[None]:
    previous = current()
    _local.replicas = replicas
    try:
        yield
    finally:
        _local.replicas = previous


# --------------------------------------------------------------------------- collectives
def scale_loss(loss: Tensor) -> Tensor:
    """``loss / N`` inside a per-device step (Keras' convention under `tf.distribute`)."""
    replicas = current()
    if replicas is None:
        return loss
    return loss * jnp.asarray(1.0 / replicas.size, loss.dtype)


def psum(tensors: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Sums tensors over the devices of the per-device step (identity outside one)."""
    replicas = current()
    if replicas is None:
        return list(tensors)
    return [None if t is None else jax.lax.psum(t, replicas.axis) for t in tensors]


@contextlib.contextmanager
def reduced_update(grads: list, finite: Tensor | None) -> Iterator[tuple[list, Tensor | None]]:
    """Sums ``grads`` over the devices for the optimizer and agrees on ``finite``.

    Yields ``(grads, finite)``: inside a per-device step the gradients summed over
    the devices and a flag that holds on every device or on none (every device's
    flag held and the summed gradients are finite; ``finite=None``: the latter
    alone). The flag is recorded as the step's, so that the non-trainable state
    of a skipped step is rolled back on every device. Outside a per-device step,
    or nested in one (an optimizer that checks its gradients itself), the
    arguments are yielded unchanged.
    """
    replicas = current()
    if replicas is None or replicas.reduced:
        yield grads, finite
        return
    grads = psum(grads)
    agreed = jnp.asarray(True)
    for g in grads:
        if g is not None:
            agreed = jnp.logical_and(agreed, jnp.all(jnp.isfinite(g)))
    if finite is not None:
        failures = jax.lax.psum(1 - jnp.asarray(finite, "int32"), replicas.axis)
        agreed = jnp.logical_and(agreed, failures == 0)
    replicas.finite = (
        agreed if replicas.finite is None else jnp.logical_and(replicas.finite, agreed)
    )
    replicas.reduced = True
    try:
        yield grads, agreed
    finally:
        replicas.reduced = False


# --------------------------------------------------------------------------- the step
def data_parallel_mesh(trainer: Any) -> tuple[Any, str] | None:
    """``(jax mesh, batch axis)`` where ``trainer`` needs a per-device step, else ``None``.

    That is: ``perturbation_scope="replica"`` under `keras.distribution.DataParallel`
    over more than one device. Warns (at trace time) for other distributions that
    split the batch over more than one device.
    """
    if getattr(trainer, "perturbation_scope", "global") != "replica":
        return None
    distribution = keras.distribution.distribution()
    if distribution is None:
        return None
    mesh = distribution.device_mesh
    axis = distribution.batch_dim_name
    devices = dict(zip(mesh.axis_names, mesh.shape)).get(axis, 1)
    if devices <= 1:
        return None
    if isinstance(distribution, keras.distribution.DataParallel) and len(mesh.shape) == 1:
        return mesh.backend_mesh, axis
    warnings.warn(
        _NOT_DATA_PARALLEL_WARNING.format(
            name=type(trainer).__name__,
            distribution=type(distribution).__name__,
            devices=devices,
        ),
        stacklevel=4,
    )
    return None


def per_device_step(
    run: Callable[[Any, Any], tuple[dict, tuple]],
    trainer: Any,
    groups: Sequence[Sequence[Any]],
    state: Any,
    data: Any,
    mesh: Any,
    axis: str,
) -> tuple[dict, tuple]:
    """``run(state, data) -> (logs, new_state)`` on each device's shard of ``data``.

    ``groups`` are the variables of ``state = (trainable, non_trainable,
    optimizer, metrics)``. Returns the merged logs and state (replicated); see the
    module docstring for the rules.
    """
    size = int(mesh.shape[axis])
    seeds = _seed_state_ids(trainer)
    _, non_trainable_vars, _, metrics_vars = groups

    def body(state: Any, data: Any) -> tuple[dict, tuple]:
        trainable, non_trainable, optimizer, metrics = (list(values) for values in state)
        index = jax.lax.axis_index(axis)
        local = [
            _shift_seed(value, index) if id(v) in seeds else value
            for v, value in zip(non_trainable_vars, non_trainable)
        ]
        replicas = Replicas(axis, size)
        with _active(replicas):
            logs, new_state = run((trainable, local, optimizer, metrics), data)
        new_trainable, new_non_trainable, new_optimizer, new_metrics = new_state
        if replicas.finite is not None:  # a skipped step leaves the state everywhere
            new_non_trainable = [
                jnp.where(replicas.finite, new, old) for new, old in zip(new_non_trainable, local)
            ]
        new_non_trainable = [
            _merge(v, new, old, axis, index)
            for v, new, old in zip(non_trainable_vars, new_non_trainable, non_trainable)
        ]
        new_metrics = [
            _merge(v, new, old, axis, index)
            for v, new, old in zip(metrics_vars, new_metrics, metrics)
        ]
        logs = _global_logs(trainer, logs, new_metrics, axis, index)
        return logs, (new_trainable, new_non_trainable, new_optimizer, new_metrics)

    # check_vma=False: gradients w.r.t. the replicated state stay per device (with
    # the check, JAX would sum them over the devices itself).
    mapped = _shard_map(body, mesh, (PartitionSpec(), PartitionSpec(axis)), PartitionSpec())
    if not _tracing((state, data)):
        # Called eagerly (run_eagerly=True, jit_compile=False): shard_map would run
        # every operation as its own computation (measured ~10x slower than compiling
        # the step at every call); its body is traced either way, so compiling it
        # loses nothing.
        mapped = jax.jit(mapped)
    return mapped(state, data)


def _tracing(values: Any) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(values))


def _shard_map(function: Callable, mesh: Any, in_specs: Any, out_specs: Any) -> Callable:
    if hasattr(jax, "shard_map"):
        return jax.shard_map(
            function, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )
    from jax.experimental.shard_map import shard_map  # jax < 0.6

    return shard_map(function, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _merge(variable: Any, new: Tensor, old: Tensor, axis: str, index: Tensor) -> Tensor:
    """One variable's replicated value from the devices' ``new`` values."""
    aggregation = str(getattr(variable, "aggregation", None) or "none").lower()
    if aggregation == "sum":
        return old + jax.lax.psum(new - old, axis)
    if aggregation in ("mean", "none") and jnp.issubdtype(new.dtype, jnp.inexact):
        return old + jax.lax.pmean(new - old, axis)
    return _first(new, axis, index)


def _first(value: Tensor, axis: str, index: Tensor) -> Tensor:
    """Device 0's ``value``, on every device."""
    dtype = value.dtype
    if dtype == jnp.bool_:
        value = value.astype("int32")
    first = jax.lax.psum(jnp.where(index == 0, value, jnp.zeros_like(value)), axis)
    return first.astype(dtype)


def _global_logs(trainer: Any, logs: Any, metrics: list, axis: str, index: Tensor) -> Any:
    """The step's logs from the merged metrics (others averaged over the devices)."""
    mapping = list(zip(trainer.metrics_variables, metrics))
    with keras.StatelessScope(state_mapping=mapping):
        results = trainer.get_metrics_result()

    def reduce(value: Any) -> Any:
        value = jnp.asarray(value)
        if jnp.issubdtype(value.dtype, jnp.inexact):
            return jax.lax.pmean(value, axis)
        return _first(value, axis, index)

    if not isinstance(logs, dict):
        return jax.tree.map(reduce, logs)
    return {
        key: results[key] if key in results else jax.tree.map(reduce, value)
        for key, value in logs.items()
    }


def _seed_state_ids(trainer: Any) -> set[int]:
    """ids of the state variables of every seed generator of ``trainer``'s layers."""
    return {
        id(generator.state)
        for layer in internals.all_layers(trainer, include_self=True)
        for generator in internals.layer_seed_generators(layer)
    }


def _shift_seed(state: Tensor, index: Tensor) -> Tensor:
    """A seed generator's ``[seed, counter]`` state with the seed shifted per device."""
    if state.shape != (2,) or not jnp.issubdtype(state.dtype, jnp.integer):
        return state
    offset = jnp.asarray([_SEED_OFFSET, 0], "uint32") * index.astype("uint32")
    return state + offset.astype(state.dtype)
