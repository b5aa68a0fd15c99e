"""The pieces a train step is made of, timed alone (``benchmarks.speed --pieces``).

The training forward, forward + backward (the clean pass), the stateless perturbed
pass, K-SAM's scoring pass and k-sample pass, the optimizer update, and hand-written
SGD and SAM steps, each compiled on its own and timed in interleaved rounds
(`benchmarks.harness`), to explain the speed ratios against the cost model
(docs/concepts/methods.md). Written with plain TensorFlow or JAX (not keras_sam
internals), mirroring what the train steps do: the clean pass is a training-mode
forward + backward that also returns (TensorFlow: updates) the non-trainable state;
the perturbed pass goes through ``stateless_call``; K-SAM's scoring pass is a
training-mode forward giving per-sample losses.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from benchmarks import common, harness
from benchmarks.workloads import ModelSpec


def time_pieces(spec: ModelSpec, args: argparse.Namespace) -> dict:
    """Times the parts of a step on ``spec`` (each compiled alone, interleaved rounds)."""
    batch = spec.batch_size
    k = max(1, round(common.ksam_k() * batch))
    make = _jax_pieces if common.backend_name() == "jax" else _tensorflow_pieces
    compiled, block = make(spec, batch, k)
    steps = {name: harness.timed(f, block) for name, f in compiled.items()}
    harness.warm_up(steps, args.warmup)
    rounds = harness.interleave(steps, args.rounds, args.steps)
    return {
        "batch_size": batch,
        "k": k,
        "pieces": {
            name: {"median_s": s["median_step_s"], "iqr_s": s["iqr_step_s"]}
            for name, s in ((n, rounds.summary(n)) for n in steps)
        },
    }


def _pieces_dict(k: int, functions: Sequence[Callable]) -> dict[str, Callable]:
    names = [
        "forward (training mode)",
        "forward (inference mode)",
        "forward + backward (clean pass)",
        "stateless forward + backward (perturbed pass)",
        "K-SAM scoring forward (whole batch, per-sample losses)",
        f"stateless forward + backward on k={k} samples",
        "optimizer apply (SGD-momentum)",
        "hand-written SGD step (clean pass + apply)",
        "hand-written SAM step (two passes + apply)",
    ]
    return dict(zip(names, functions, strict=True))


def _tensorflow_pieces(spec: ModelSpec, batch: int, k: int) -> tuple[dict, Callable]:
    import keras
    import tensorflow as tf

    x, y = (tf.constant(t) for t in spec.make_data(batch, 1))
    model = spec.build(0)
    optimizer = keras.optimizers.SGD(0.05, momentum=common.sgd_momentum())
    variables = model.trainable_variables
    optimizer.build(variables)
    per_sample = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def loss_fn(labels: Any, logits: Any) -> Any:
        return tf.reduce_mean(per_sample(labels, logits))

    def forward_train():
        return model(x, training=True)

    def forward_inference():
        return model(x, training=False)

    def forward_backward():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return tape.gradient(loss, variables)

    def stateless(xs: Any, ys: Any) -> Any:
        values = [v.value for v in variables]
        state = [v.value for v in model.non_trainable_variables]
        with tf.GradientTape() as tape:
            tape.watch(values)
            logits, _ = model.stateless_call(values, state, xs, training=True)
            loss = loss_fn(ys, logits)
        return tape.gradient(loss, values)

    def stateless_forward_backward():
        return stateless(x, y)

    def ksam_scores():
        return per_sample(y, model(x, training=True))

    def stateless_forward_backward_k():
        return stateless(x[:k], y[:k])

    grads = [tf.zeros_like(v.value) for v in variables]

    def optimizer_apply():
        optimizer.apply(grads, variables)
        return optimizer.iterations.value

    def sgd_step():
        optimizer.apply(forward_backward(), variables)
        return optimizer.iterations.value

    def sam_step():
        g = forward_backward()
        norm = tf.linalg.global_norm(g)
        values = [v.value + 0.05 * gi / norm for v, gi in zip(variables, g)]
        state = [v.value for v in model.non_trainable_variables]
        with tf.GradientTape() as tape:
            tape.watch(values)
            logits, _ = model.stateless_call(values, state, x, training=True)
            loss = loss_fn(y, logits)
        optimizer.apply(tape.gradient(loss, values), variables)
        return optimizer.iterations.value

    pieces = _pieces_dict(k, [
        forward_train, forward_inference, forward_backward, stateless_forward_backward,
        ksam_scores, stateless_forward_backward_k, optimizer_apply, sgd_step, sam_step,
    ])
    compiled = {n: tf.function(f, jit_compile=True) for n, f in pieces.items()}

    def block(out: Any) -> None:
        for t in tf.nest.flatten(out):
            if t is not None:
                np.asarray(t)

    return compiled, block


def _jax_pieces(spec: ModelSpec, batch: int, k: int) -> tuple[dict, Callable]:
    """The same pieces as pure functions of the variable values, each ``jax.jit``-ed.

    The values are arguments (not closed-over constants), as in Keras' JAX train step;
    under ``--data-parallel`` the batch is sharded like the trainers' batches.
    """

    import jax
    import jax.numpy as jnp
    import keras

    x, y = spec.make_data(batch, 1)
    distribution = keras.distribution.distribution()
    if distribution is not None:
        x, y = (keras.distribution.distribute_tensor(t, distribution.get_data_layout(t.shape))
                for t in (x, y))
    else:
        x, y = jax.device_put(x), jax.device_put(y)
    model = spec.build(0)
    optimizer = keras.optimizers.SGD(0.05, momentum=common.sgd_momentum())
    optimizer.build(model.trainable_variables)
    per_sample = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    trainable = [v.value for v in model.trainable_variables]
    state = [v.value for v in model.non_trainable_variables]
    slots = [v.value for v in optimizer.variables]

    def loss_and_state(values: Any, state: Any, xs: Any, ys: Any) -> Any:
        logits, new_state = model.stateless_call(values, state, xs, training=True)
        return jnp.mean(per_sample(ys, logits)), new_state

    clean_grad = jax.grad(loss_and_state, has_aux=True)  # -> (grads, new BN statistics)

    def stateless_grad(values: Any, state: Any, xs: Any, ys: Any) -> Any:
        return jax.grad(lambda v: loss_and_state(v, state, xs, ys)[0])(values)

    def forward_train(tv, ntv, xs, ys, ov):
        return model.stateless_call(tv, ntv, xs, training=True)

    def forward_inference(tv, ntv, xs, ys, ov):
        return model.stateless_call(tv, ntv, xs, training=False)[0]

    def forward_backward(tv, ntv, xs, ys, ov):
        return clean_grad(tv, ntv, xs, ys)

    def stateless_forward_backward(tv, ntv, xs, ys, ov):
        return stateless_grad(tv, ntv, xs, ys)

    def ksam_scores(tv, ntv, xs, ys, ov):
        return per_sample(ys, model.stateless_call(tv, ntv, xs, training=True)[0])

    def stateless_forward_backward_k(tv, ntv, xs, ys, ov):
        return stateless_grad(tv, ntv, xs[:k], ys[:k])

    zeros = [jnp.zeros_like(v) for v in trainable]

    def optimizer_apply(tv, ntv, xs, ys, ov):
        return optimizer.stateless_apply(ov, zeros, tv)

    def sgd_step(tv, ntv, xs, ys, ov):
        grads, new_state = clean_grad(tv, ntv, xs, ys)
        return optimizer.stateless_apply(ov, grads, tv), new_state

    def sam_step(tv, ntv, xs, ys, ov):
        grads, new_state = clean_grad(tv, ntv, xs, ys)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in grads))
        perturbed = [v + 0.05 * g / norm for v, g in zip(tv, grads)]
        return optimizer.stateless_apply(ov, stateless_grad(perturbed, new_state, xs, ys), tv), \
            new_state

    pieces = _pieces_dict(k, [
        forward_train, forward_inference, forward_backward, stateless_forward_backward,
        ksam_scores, stateless_forward_backward_k, optimizer_apply, sgd_step, sam_step,
    ])
    compiled = {
        n: functools.partial(jax.jit(f), trainable, state, x, y, slots)
        for n, f in pieces.items()
    }
    return compiled, jax.block_until_ready


# ---------------------------------------------------------------------- RSS probes
