"""The workloads the speed benchmarks time: models, their data, and `Runner`.

Three models (a CNN with BatchNorm on 32×32×3 images, a small Transformer encoder
on token sequences, an MLP) with synthetic data, and `Runner`: one method on its own
copy of a model, compiled as the backend allows (XLA on TensorFlow and JAX, eager on
PyTorch) and warmed up by `fit` on one batch, whose `step` calls Keras'
``train_function`` directly on batches prepared beforehand (no input pipeline in the
timed region) and blocks until the step has run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks import common


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

    class PositionEmbedding(keras.layers.Layer):
        """Adds a learned vector per position (an embedding of ``arange`` called while
        the functional model is built would be a constant, never trained; on PyTorch
        it would also carry that call's autograd graph into every step)."""

        def build(self, input_shape: Any) -> None:
            self.positions = self.add_weight(
                shape=tuple(input_shape[1:]), initializer="random_normal", name="positions"
            )

        def call(self, embedded: Any) -> Any:
            return embedded + self.positions

    keras.utils.set_random_seed(seed)
    tokens = keras.Input((SEQ_LEN,), dtype="int32")
    h = PositionEmbedding()(keras.layers.Embedding(VOCAB, D_MODEL)(tokens))
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


def spec(name: str, quick: bool) -> ModelSpec:
    """The model ``name`` (``quick``: tiny batches and a narrow MLP)."""
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

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()
