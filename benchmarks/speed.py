"""Step time and memory of every keras_sam method, relative to its base optimizer.

    python -m benchmarks.speed                 # full run (~10 min on 2 CPU cores)
    python -m benchmarks.speed --quick         # seconds (CI)
    python -m benchmarks.speed --device gpu --out /tmp/gpu-results
    python -m benchmarks.speed --backend jax --device gpu --out /tmp/jax-gpu-results

For each model (a CNN with BatchNorm on 32×32×3 inputs at batch 128, a small
Transformer encoder classifying token sequences, an MLP), every method gets its
own copy of the model (same initial weights), compiled with ``jit_compile=True``.
After warm-up (tracing + XLA compilation), the compiled ``train_function`` is
called directly on an iterator of fixed, pre-built batches, and each call is
blocked on (logs converted to NumPy). Rounds are interleaved: for each round,
every method runs ``--steps`` steps in turn, so slow drifts of the machine
(other processes, thermal) hit every method alike. Reported: median and IQR of
per-step times, and the median over rounds of each round's ratio of mean step
times to the base optimizer of the same model
(SGD-momentum for SAM/ASAM/K-SAM/LayerwiseSAM/MSAM, AdamW for AdamW-MSAM) and
the IQR of the per-round ratios.

Memory: the bytes of variables a method adds (its optimizer's variables plus
the wrapper's own variables minus the base optimizer's variables), and, with
``--rss-models``, the peak resident set size of a fresh subprocess that builds,
compiles and runs only that method (``ru_maxrss`` is process-wide and never
decreases, so it is only meaningful one method per process). On a GPU the
peak of TensorFlow's GPU allocator during each method's warm-up is reported too.

``--pieces`` times the parts a step is made of (training forward, forward +
backward, the stateless perturbed pass, K-SAM's scoring pass, the optimizer
update) to explain the ratios against the cost model (docs/concepts/methods.md).

``--backend jax`` runs the same measurement on Keras' JAX backend without importing
TensorFlow: each trainer is built and its step ``jax.jit``-compiled by ``fit`` on one
batch (not timed), then the compiled ``train_function`` is called directly with the
state tuple Keras' JAX ``fit`` passes (trainable, non-trainable, optimizer and metric
values, donated and returned by each call) on batches placed on the device
beforehand (no input pipeline in the timed region). The pieces are written with
``jax.jit``, ``jax.grad`` and ``stateless_call``; on a GPU the allocator's bytes in use
after warm-up (JAX keeps only a process-wide peak) replace TensorFlow's per-method
peak. ``--data-parallel`` (JAX only) trains under ``keras.distribution.DataParallel``
over every local device with ``perturbation_scope="global"`` (the batch is the global
batch, split across devices).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common

TARGETS = {  # (model, method) -> maximal ratio to the base optimizer, from issue #6
    ("cnn", "sam"): 2.05,
    ("cnn", "msam"): 1.02,
    ("cnn", "ksam"): 0.6,
    ("cnn", "layerwise"): 1.2,
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    build: Callable[[int], Any]
    batch_size: int
    make_data: Callable[[int, int], tuple]
    learning_rate: dict  # base optimizer name -> learning rate


def build_cnn(seed: int) -> Any:
    """A VGG-style CNN with BatchNorm for 32×32×3 images (three stages of two convs)."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3))
    h = inputs
    for stage, filters in enumerate((16, 32, 64)):
        for _ in range(2):
            h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(h)
            h = keras.layers.BatchNormalization()(h)
            h = keras.layers.ReLU()(h)
        if stage < 2:
            h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(10)(h)
    return keras.Model(inputs, outputs, name="cnn_bn")


SEQ_LEN, VOCAB, D_MODEL, HEADS, FF, BLOCKS = 64, 2000, 64, 4, 128, 2


def build_transformer(seed: int) -> Any:
    """A 2-block Transformer encoder (pre-LN) classifying sequences of 64 tokens."""
    import keras

    keras.utils.set_random_seed(seed)
    tokens = keras.Input((SEQ_LEN,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, D_MODEL)(tokens)
    positions = keras.layers.Embedding(SEQ_LEN, D_MODEL)(
        keras.ops.expand_dims(keras.ops.arange(SEQ_LEN), 0)
    )
    h = h + positions
    for _ in range(BLOCKS):
        a = keras.layers.LayerNormalization()(h)
        a = keras.layers.MultiHeadAttention(HEADS, D_MODEL // HEADS)(a, a)
        h = h + a
        f = keras.layers.LayerNormalization()(h)
        f = keras.layers.Dense(FF, activation="gelu")(f)
        f = keras.layers.Dense(D_MODEL)(f)
        h = h + f
    h = keras.layers.LayerNormalization()(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    outputs = keras.layers.Dense(2)(h)
    return keras.Model(tokens, outputs, name="transformer")


def build_mlp(seed: int, width: int = 1024) -> Any:
    """An MLP 784-1024-1024-1024-10 with ReLU (``width`` hidden units)."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((784,))
    h = inputs
    for _ in range(3):
        h = keras.layers.Dense(width, activation="relu")(h)
    outputs = keras.layers.Dense(10)(h)
    return keras.Model(inputs, outputs, name="mlp")


def _images(n: int, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    return rng.random((n, 32, 32, 3), dtype="float32"), rng.integers(0, 10, n).astype("int32")


def _tokens(n: int, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    return rng.integers(0, VOCAB, (n, SEQ_LEN)).astype("int32"), rng.integers(0, 2, n).astype(
        "int32"
    )


def _vectors(n: int, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 784), dtype="float32"), rng.integers(0, 10, n).astype("int32")


MODELS: dict[str, ModelSpec] = {
    "cnn": ModelSpec(
        "cnn", "CNN + BatchNorm, 6 conv (16-32-64), 32×32×3, batch 128",
        build_cnn, 128, _images, {"sgd": 0.05, "adamw": 1e-3},
    ),
    "transformer": ModelSpec(
        "transformer",
        f"Transformer encoder, {BLOCKS} blocks, d={D_MODEL}, {HEADS} heads, seq {SEQ_LEN}, "
        "batch 64",
        build_transformer, 64, _tokens, {"sgd": 0.05, "adamw": 1e-3},
    ),
    "mlp": ModelSpec(
        "mlp", "MLP 784-1024×3-10, batch 128", build_mlp, 128, _vectors,
        {"sgd": 0.05, "adamw": 1e-3},
    ),
}

QUICK_BATCH = 8  # --quick: tiny batches (and a narrow MLP), so it runs in seconds
QUICK_DEFAULT_MODELS = ["mlp"]


def _spec(name: str, quick: bool) -> ModelSpec:
    spec = MODELS[name]
    if not quick:
        return spec
    build = spec.build
    if name == "mlp":
        def build(seed: int) -> Any:
            return build_mlp(seed, width=32)
    return dataclasses.replace(spec, build=build, batch_size=QUICK_BATCH)


# ---------------------------------------------------------------------- runners
class Runner:
    """One method on one model: a compiled train function and its batch iterator."""

    def __init__(self, spec: ModelSpec, method: common.Method, data: tuple, batch: int) -> None:
        import keras

        self.method = method
        self.model = spec.build(0)
        self.trainer = method.wrap(self.model, method.default_rho)
        if keras.distribution.distribution() is not None and hasattr(
            self.trainer, "perturbation_scope"
        ):  # --data-parallel: JAX computes the global-batch perturbation
            self.trainer.perturbation_scope = "global"
        lr = spec.learning_rate[method.base]
        self.trainer.compile(
            optimizer=method.optimizer(lr, method.default_rho),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=common.jit_compile(),
        )
        self.trainer.optimizer.build(self.trainer.trainable_variables)
        self.backend = keras.backend.backend()
        if self.backend == "jax":
            self._init_jax(data, batch)
        elif self.backend == "torch":
            self._init_torch(data, batch)
        else:
            import tensorflow as tf

            dataset = tf.data.Dataset.from_tensor_slices(data).batch(batch, drop_remainder=True)
            self.iterator = iter(dataset.cache().repeat())
            self.trainer.make_train_function()
        self.train_function = self.trainer.train_function
        self.times: list[float] = []
        self.round_means: list[float] = []

    def _init_jax(self, data: tuple, batch: int) -> None:
        """Builds and compiles through `fit` (one batch), then keeps the JAX state tuple."""
        import itertools

        import keras

        x, y = data
        # `fit` builds what the step needs (metrics, loss, optimizer), jit-compiles the
        # step and runs it once; that first, compiling call is part of the warm-up.
        self.trainer.fit(x[:batch], y[:batch], batch_size=batch, epochs=1, shuffle=False,
                         verbose=0)
        distribution = keras.distribution.distribution()

        def place(array: np.ndarray) -> Any:
            if distribution is None:
                import jax

                return jax.device_put(array)
            layout = distribution.get_data_layout(array.shape)
            return keras.distribution.distribute_tensor(array, layout)

        batches = [
            (place(x[i:i + batch]), place(y[i:i + batch]))
            for i in range(0, len(x) - batch + 1, batch)
        ]
        self.iterator = itertools.cycle(batches)
        trainer = self.trainer
        # The order of Keras' JAX `fit` (`_get_jax_state`); each call donates it.
        self.state = tuple(
            [v.value for v in group]
            for group in (trainer.trainable_variables, trainer.non_trainable_variables,
                          trainer.optimizer.variables, trainer.metrics_variables)
        )

    def _init_torch(self, data: tuple, batch: int) -> None:
        """Builds through `fit` (one batch), then cycles over batches already on the
        device; Keras' PyTorch train function takes ``[batch]``."""
        import itertools

        import keras

        x, y = data
        self.trainer.fit(x[:batch], y[:batch], batch_size=batch, epochs=1, shuffle=False,
                         verbose=0)
        self.trainer.make_train_function()
        to_tensor = keras.ops.convert_to_tensor
        batches = [
            [(to_tensor(x[i:i + batch]), to_tensor(y[i:i + batch]))]
            for i in range(0, len(x) - batch + 1, batch)
        ]
        self.iterator = itertools.cycle(batches)

    def step(self) -> float:
        start = time.perf_counter()
        if self.backend == "jax":
            logs, self.state = self.train_function(self.state, self.iterator)
        elif self.backend == "torch":
            logs = self.train_function(next(self.iterator))
        else:
            logs = self.train_function(self.iterator)
        float(np.asarray(logs["loss"]))  # blocks until the step has run
        return time.perf_counter() - start

    def run(self, steps: int) -> list[float]:
        return [self.step() for _ in range(steps)]


def time_model(
    spec: ModelSpec, names: Sequence[str], methods: dict, args: argparse.Namespace
) -> dict:
    batch = spec.batch_size
    data = spec.make_data(batch * 4, 0)
    gpu = common.uses_gpu()
    jax_backend = common.backend_name() == "jax"
    runners: dict[str, Runner] = {}
    memory: dict[str, dict] = {}
    compile_s: dict[str, float] = {}
    for name in names:
        if gpu and jax_backend:
            before = common.jax_memory_stats() or {}
        elif gpu:
            import tensorflow as tf

            tf.config.experimental.reset_memory_stats("GPU:0")
            before = tf.config.experimental.get_memory_info("GPU:0")["current"]
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MSAM without MSAMCallback: intended here
            runner = Runner(spec, methods[name], data, batch)
            runner.run(args.warmup)
        compile_s[name] = time.perf_counter() - start
        runners[name] = runner
        memory[name] = {}
        if gpu and jax_backend:
            after = common.jax_memory_stats() or {}
            if "bytes_in_use" in after:
                memory[name]["gpu_bytes_in_use_added_by_warmup"] = int(
                    after["bytes_in_use"] - before.get("bytes_in_use", 0)
                )
                memory[name]["gpu_process_peak_bytes_after_warmup"] = int(
                    after.get("peak_bytes_in_use", 0)
                )
        elif gpu:
            peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
            memory[name]["gpu_peak_bytes_during_warmup"] = int(peak - before)
        print(f"  {spec.name}/{name}: compiled + warmed up in {compile_s[name]:.1f} s",
              flush=True)
    base_bytes = {
        name: common.variable_bytes(r.trainer.optimizer.variables)
        for name, r in runners.items()
        if methods[name].base == name
    }
    for name, r in runners.items():
        base = methods[name].base
        memory[name].update(
            common.added_variable_bytes(r.trainer, r.model, base_bytes.get(base, 0))
        )
        memory[name]["model_bytes"] = common.variable_bytes(r.model.variables)
    # Steps per round: --steps, fewer for a method whose step is so slow that --steps
    # would exceed --round-budget seconds (at least 1); ratios compare per-step means.
    steps = {
        name: int(min(args.steps, max(1, args.round_budget // max(r.step(), 1e-6))))
        for name, r in runners.items()
    }
    loads = []
    for _ in range(args.rounds):
        loads.append(common.load_now())
        for name in names:
            times = runners[name].run(steps[name])
            runners[name].times.extend(times)
            runners[name].round_means.append(float(np.mean(times)))
    results = {}
    for name in names:
        r = runners[name]
        base = runners[methods[name].base]
        q1, median, q3 = common.quartiles(r.times)
        round_ratios = [a / b for a, b in zip(r.round_means, base.round_means)]
        rq1, _, rq3 = common.quartiles(round_ratios)
        results[name] = {
            "label": methods[name].label,
            "base": methods[name].base,
            "rho": methods[name].default_rho,
            "extra": methods[name].extra,
            "median_step_s": median,
            "iqr_step_s": [q1, q3],
            # Per round, mean step time over the base's beside it (a mean, so that
            # periodic methods such as LookSAM pay for their occasional SAM step);
            # the median over rounds.
            "ratio": float(np.median(round_ratios)),
            "round_ratio_iqr": [rq1, rq3],
            "round_ratios": round_ratios,
            "steps_timed": len(r.times),
            "compile_and_warmup_s": compile_s[name],
            "memory": memory[name],
        }
    return {
        "description": spec.description,
        "batch_size": batch,
        "parameters": int(sum(math.prod(v.shape) for v in runners[names[0]].model.weights)),
        "load_during_rounds": loads,
        "methods": results,
    }


# ---------------------------------------------------------------------- pieces
def time_pieces(spec: ModelSpec, args: argparse.Namespace) -> dict:
    """Times the parts of a step on ``spec`` (each jit-compiled alone, interleaved rounds).

    Written with plain TensorFlow or JAX (not keras_sam internals), mirroring what the
    train steps do: the clean pass is a training-mode forward + backward that also
    returns (TensorFlow: updates) the non-trainable state; the perturbed pass goes
    through ``stateless_call``; K-SAM's scoring pass is a training-mode forward giving
    per-sample losses.
    """
    batch = spec.batch_size
    k = max(1, round(common.ksam_k() * batch))
    if common.backend_name() == "jax":
        compiled, block = _jax_pieces(spec, batch, k)
    else:
        compiled, block = _tensorflow_pieces(spec, batch, k)
    for f in compiled.values():
        for _ in range(args.warmup):
            block(f())
    times: dict[str, list[float]] = {n: [] for n in compiled}
    for _ in range(args.rounds):
        for n, f in compiled.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                block(f())
                times[n].append(time.perf_counter() - start)
    return {
        "batch_size": batch,
        "k": k,
        "pieces": {
            n: {"median_s": float(np.median(t)), "iqr_s": list(common.quartiles(t)[::2])}
            for n, t in times.items()
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
    import functools

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
def probe_rss(model_name: str, method_name: str, args: argparse.Namespace) -> dict:
    """Run inside a fresh subprocess: RSS after imports, and peak RSS after training."""
    methods = common.all_methods()
    spec = _spec(model_name, args.quick)
    batch = spec.batch_size
    data = spec.make_data(batch * 4, 0)
    baseline = common.current_rss_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner = Runner(spec, methods[method_name], data, batch)
        runner.run(args.warmup + args.steps)
    return {"rss_after_imports_bytes": baseline, "peak_rss_bytes": common.peak_rss_bytes()}


def run_rss_probes(models: Sequence[str], names: Sequence[str], args: argparse.Namespace) -> dict:
    results: dict[str, dict] = {}
    for model_name in models:
        results[model_name] = {}
        for name in names:
            command = [
                sys.executable, "-m", "benchmarks.speed", "--probe-rss", model_name, name,
                "--device", args.device, "--warmup", str(args.warmup), "--steps", str(args.steps),
                "--backend", common.backend_name(),
            ] + (["--quick"] if args.quick else []) + (
                ["--data-parallel"] if args.data_parallel else []
            )
            env = dict(os.environ, PYTHONWARNINGS="ignore")
            done = subprocess.run(
                command, capture_output=True, text=True, env=env,
                cwd=str(Path(__file__).resolve().parent.parent), check=False,
            )
            line = [ln for ln in done.stdout.splitlines() if ln.startswith("RSS_PROBE ")]
            if done.returncode != 0 or not line:
                print(f"  RSS probe {model_name}/{name} failed:\n{done.stderr[-2000:]}")
                continue
            results[model_name][name] = json.loads(line[-1][len("RSS_PROBE "):])
            print(f"  RSS probe {model_name}/{name}: peak "
                  f"{common.human_bytes(results[model_name][name]['peak_rss_bytes'])}", flush=True)
    return results


# ---------------------------------------------------------------------- reporting
def markdown(report: dict) -> str:
    compiled = report["settings"].get("jit_compile", True)
    function = "compiled `train_function` (XLA)" if compiled else "eager `train_function`"
    lines = [
        "# Speed benchmark",
        "",
        f"`{report['machine']['command']}` — {report['machine']['date']}, "
        f"{report['machine']['device']}, load average (1/5/15 min) at start "
        f"{report['machine']['load_average_1_5_15']}.",
        "",
        f"Per-step time of the {function}, {report['settings']['rounds']} "
        f"interleaved rounds × {report['settings']['steps']} steps per method, after "
        f"{report['settings']['warmup']} warm-up steps. Ratio = median over rounds of the "
        "round's mean step time / the base optimizer's mean step time in the same round "
        "(in brackets: IQR of the per-round ratios; a mean, so LookSAM's periodic SAM "
        "steps count). Added memory = bytes of variables the method holds beyond the "
        "model and its base optimizer.",
        "",
    ]
    machine = report["machine"]
    if machine.get("keras_backend") == "torch":
        lines += [
            f"Backend: PyTorch {machine['torch']} ({machine['torch_threads']} threads), Keras "
            f"{machine['keras']}, eager (the wrappers refuse `torch.compile`). Each trainer is "
            "built by `fit` on one batch (not timed), then its `train_function` is called "
            "directly on batches already converted to tensors.",
            "",
        ]
    if machine.get("keras_backend") == "jax":
        parallel = report["settings"].get("data_parallel")
        lines += [
            f"Backend: JAX {machine['jax']} (jaxlib {machine['jaxlib']}), Keras "
            f"{machine['keras']}, devices {', '.join(machine['jax_devices'])}"
            + (", `keras.distribution.DataParallel` over all of them "
               "(perturbation_scope=\"global\")" if parallel else "")
            + f"; TensorFlow imported: {'yes' if machine.get('tensorflow_imported') else 'no'}. "
            "The step is `jax.jit`-compiled by `fit` on one batch (not timed), then the "
            "compiled `train_function` is called directly with the donated state on batches "
            "already on the device.",
            "",
        ]
    for model_name, result in report["models"].items():
        lines += [
            f"## {model_name}: {result['description']} ({result['parameters']:,} weights)",
            "",
            "| method | ρ | median step (ms) | IQR (ms) | ratio to base | target | "
            "added variables |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in result["methods"].items():
            target = TARGETS.get((model_name, name))
            target_text = "" if target is None else (
                f"≤ {target:g} {'✅' if r['ratio'] <= target else '❌'}"
            )
            rho = "" if r["rho"] is None else f"{r['rho']:g}"
            label = r["label"] + (f" ({r['extra']})" if r["extra"] else "")
            lines.append(
                f"| {label} | {rho} | {1000 * r['median_step_s']:.2f} "
                f"| {1000 * r['iqr_step_s'][0]:.2f}–{1000 * r['iqr_step_s'][1]:.2f} "
                f"| **{r['ratio']:.3f}×** [{r['round_ratio_iqr'][0]:.3f}–"
                f"{r['round_ratio_iqr'][1]:.3f}] | {target_text} "
                f"| {common.human_bytes(r['memory']['added_bytes'])} |"
            )
        lines.append("")
    if report.get("rss"):
        lines += [
            "## Peak process memory (one fresh subprocess per method)",
            "",
            "| model | method | RSS after imports | peak RSS | peak − base optimizer's peak |",
            "|---|---|---|---|---|",
        ]
        methods = report["methods"]
        for model_name, probes in report["rss"].items():
            for name, p in probes.items():
                base = probes.get(methods[name]["base"])
                delta = p["peak_rss_bytes"] - base["peak_rss_bytes"] if base else None
                lines.append(
                    f"| {model_name} | {methods[name]['label']} "
                    f"| {common.human_bytes(p['rss_after_imports_bytes'])} "
                    f"| {common.human_bytes(p['peak_rss_bytes'])} | {common.human_bytes(delta)} |"
                )
        lines.append("")
    for model_name, pieces in report.get("pieces", {}).items():
        lines += [
            f"## Pieces of a step: {model_name} (batch {pieces['batch_size']}, "
            "each piece jit-compiled on its own)",
            "",
            "| piece | median (ms) | IQR (ms) |",
            "|---|---|---|",
        ]
        for n, p in pieces["pieces"].items():
            lines.append(
                f"| {n} | {1000 * p['median_s']:.2f} | {1000 * p['iqr_s'][0]:.2f}–"
                f"{1000 * p['iqr_s'][1]:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.2), squeeze=False)
    for ax, model_name in zip(axes[0], models):
        result = report["models"][model_name]["methods"]
        names = list(result)
        ratios = [result[n]["ratio"] for n in names]
        low = [max(0.0, r - result[n]["round_ratio_iqr"][0]) for n, r in zip(names, ratios)]
        high = [max(0.0, result[n]["round_ratio_iqr"][1] - r) for n, r in zip(names, ratios)]
        colors = ["tab:gray" if result[n]["base"] == n else "tab:blue" for n in names]
        ax.barh(names, ratios, xerr=[low, high], color=colors, capsize=3)
        for i, n in enumerate(names):
            target = TARGETS.get((model_name, n))
            if target is not None:
                ax.plot([target, target], [i - 0.4, i + 0.4], color="tab:red", lw=2)
        ax.axvline(1.0, color="black", lw=0.8, ls="--")
        ax.invert_yaxis()
        ax.set_xlabel("step time / base optimizer (median, IQR of rounds)")
        ax.set_title(model_name)
    fig.suptitle(f"keras_sam step-time ratios ({report['machine']['device']}); red = target")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.speed", description=__doc__.split("\n")[0]
    )
    common.add_common_flags(parser)
    parser.add_argument(
        "--models", nargs="+", default=None, choices=list(MODELS),
        help=f"default: all ({QUICK_DEFAULT_MODELS} with --quick)",
    )
    parser.add_argument("--methods", nargs="+", default=None, help="default: all")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=None, help="steps per method per round")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (not timed)")
    parser.add_argument(
        "--round-budget", type=float, default=20.0,
        help="at most this many seconds per method per round (fewer steps for a slow method)",
    )
    parser.add_argument(
        "--rss-models", nargs="*", default=None, choices=list(MODELS),
        help="models whose peak RSS is measured per method in subprocesses "
        "(default: cnn; none with --quick)",
    )
    parser.add_argument(
        "--pieces", nargs="*", default=None, choices=list(MODELS),
        help="models whose step is timed piece by piece (default: cnn; none with --quick)",
    )
    parser.add_argument(
        "--data-parallel", action="store_true",
        help="JAX only: keras.distribution.DataParallel over every local device "
        "(perturbation_scope='global'); the batch is the global batch",
    )
    parser.add_argument("--probe-rss", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.models = args.models or (QUICK_DEFAULT_MODELS if quick else list(MODELS))
    args.rounds = args.rounds or (2 if quick else 7)
    args.steps = args.steps or (3 if quick else 10)
    args.warmup = args.warmup or (2 if quick else 3)
    if args.rss_models is None:
        args.rss_models = [] if quick else ["cnn"]
    if args.pieces is None:  # the pieces are written for TensorFlow and JAX
        torch = (args.backend or os.environ.get("KERAS_BACKEND")) == "torch"
        args.pieces = [] if quick or torch else ["cnn"]
    return args, parser


SUPPORTED_BACKENDS = ("tensorflow", "jax", "torch")


def setup_data_parallel(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``--data-parallel``: sets a DataParallel distribution; returns the device count."""
    if not args.data_parallel:
        return 1
    if common.backend_name() != "jax":
        parser.error("--data-parallel needs --backend jax (TensorFlow: see "
                     "benchmarks.mirrored_xla for MirroredStrategy).")
    import keras

    devices = keras.distribution.list_devices()
    used = {*args.models, *args.pieces, *args.rss_models}
    bad = sorted(m for m in used if _spec(m, args.quick).batch_size % len(devices))
    if bad:
        parser.error(f"--data-parallel: the batch size of {bad} is not divisible by the "
                     f"{len(devices)} devices.")
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    return len(devices)


def main(argv: Sequence[str] | None = None) -> dict:
    args, parser = parse_args(argv)
    common.setup_backend(args.backend, parser, SUPPORTED_BACKENDS)
    if args.pieces and common.backend_name() == "torch":
        parser.error("--pieces: written for TensorFlow and JAX only.")
    device = common.setup_device(args.device, parser)
    if args.probe_rss:
        args.models = [args.probe_rss[0]]
    devices = setup_data_parallel(args, parser)
    if args.probe_rss:
        result = probe_rss(*args.probe_rss, args)
        print("RSS_PROBE " + json.dumps(result), flush=True)
        return result
    methods = common.all_methods()
    names = common.select_methods(args.methods, methods)
    machine = common.machine_info(device)
    jax_backend = machine["keras_backend"] == "jax"
    print(f"speed benchmark on {device}"
          + (f" (JAX, {devices} device(s){', data parallel' if args.data_parallel else ''})"
             if jax_backend else "")
          + f"; load {machine['load_average_1_5_15']}; methods {names}", flush=True)
    start = time.perf_counter()
    report: dict[str, Any] = {
        "machine": machine,
        "settings": {
            "quick": args.quick, "rounds": args.rounds, "steps": args.steps,
            "warmup": args.warmup, "jit_compile": common.jit_compile(),
            "learning_rates": {m: MODELS[m].learning_rate for m in args.models},
        },
        "methods": {
            n: {"label": methods[n].label, "base": methods[n].base,
                "rho": methods[n].default_rho, "extra": methods[n].extra}
            for n in names
        },
        "targets": {f"{m}/{n}": t for (m, n), t in TARGETS.items()},
        "models": {},
    }
    if jax_backend:
        report["settings"]["data_parallel"] = args.data_parallel
        report["settings"]["devices"] = devices
    for model_name in args.models:
        print(f"model {model_name}", flush=True)
        spec = _spec(model_name, args.quick)
        report["models"][model_name] = time_model(spec, names, methods, args)
        for name, r in report["models"][model_name]["methods"].items():
            print(f"  {name:12s} {1000 * r['median_step_s']:8.2f} ms  ratio {r['ratio']:.3f}",
                  flush=True)
        common.write_json(common.ensure_dir(args.out) / "speed.partial.json", report)
    if args.pieces:
        report["pieces"] = {m: time_pieces(_spec(m, args.quick), args) for m in args.pieces}
    if args.rss_models:
        report["rss"] = run_rss_probes(args.rss_models, names, args)
    report["machine"]["load_average_at_end"] = common.load_now()
    if jax_backend:
        report["machine"]["tensorflow_imported"] = common.tensorflow_imported()
    report["wall_clock_s"] = time.perf_counter() - start
    out = common.ensure_dir(args.out)
    common.write_json(out / "speed.json", report)
    (out / "speed.partial.json").unlink(missing_ok=True)
    (out / "speed.md").write_text(markdown(report) + "\n")
    plot(report, out / "speed.png")
    print(markdown(report))
    print(f"\nwrote {out / 'speed.json'}, speed.md, speed.png in {report['wall_clock_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
