"""K-SAM's cost on a Transformer with dropout under XLA on a CPU (TensorFlow).

    python -m benchmarks.dropout_xla

Trains keras-io's Transformer text classifier (token and position embeddings, one
Transformer block, dropout 0.1; 200 tokens, batch 32) with SGD, SAM and K-SAM
(k = 0.25), `jit_compile=True`, and prints each method's time per epoch and its
ratio to SGD (interleaved rounds of `benchmarks.harness`), three ways:

* ``default``: Keras' dropout as it is (TensorFlow's default random algorithm);
* ``philox``: Keras' dropout drawing its mask with the Philox algorithm instead
  (this process patches `keras.src.backend.tensorflow.random.dropout`; nothing in
  keras_sam does);
* ``no dropout``: the same model with rate 0.

The measured cause of K-SAM's slowness there is the first: see docs/benchmarks.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

import keras_sam
from benchmarks import harness

VOCAB, SEQ_LEN, EMBED, BATCH, STEPS_PER_EPOCH = 20000, 200, 32, 32, 20
METHODS: dict[str, Callable[[keras.Model], keras.Model]] = {
    "sgd": lambda model: model,
    "sam": lambda model: keras_sam.SAM(model, rho=0.05),
    "ksam": lambda model: keras_sam.KSAM(model, rho=0.05, k=0.25),
}


def build_model(rate: float) -> keras.Model:
    """keras-io's text classification Transformer (one block)."""
    keras.utils.set_random_seed(0)
    layers = keras.layers
    tokens = keras.Input((SEQ_LEN,), dtype="int32")
    positions = layers.Embedding(SEQ_LEN, EMBED)(keras.ops.arange(SEQ_LEN))
    h = layers.Embedding(VOCAB, EMBED)(tokens) + positions
    attention = layers.MultiHeadAttention(num_heads=2, key_dim=EMBED)(h, h)
    h = layers.LayerNormalization(epsilon=1e-6)(h + layers.Dropout(rate)(attention))
    feed_forward = layers.Dense(EMBED)(layers.Dense(32, activation="relu")(h))
    h = layers.LayerNormalization(epsilon=1e-6)(h + layers.Dropout(rate)(feed_forward))
    h = layers.Dropout(rate)(layers.GlobalAveragePooling1D()(h))
    h = layers.Dropout(rate)(layers.Dense(20, activation="relu")(h))
    return keras.Model(tokens, layers.Dense(2, activation="softmax")(h))


def philox_dropout(inputs: Any, rate: float, noise_shape: Any = None, seed: Any = None) -> Any:
    """Keras' TensorFlow dropout with the mask drawn by the Philox algorithm."""
    from keras.src.backend.tensorflow import random as tf_random

    seed = tf_random._cast_seed(tf_random.draw_seed(seed))  # noqa: SLF001 (as Keras does)
    noise_shape = tf_random._get_concrete_noise_shape(inputs, noise_shape)  # noqa: SLF001
    return tf.nn.experimental.stateless_dropout(
        inputs, rate=rate, noise_shape=noise_shape, seed=seed, rng_alg="philox"
    )


def epoch_steps(rate: float) -> dict[str, harness.Step]:
    rng = np.random.default_rng(0)
    x = rng.integers(0, VOCAB, (BATCH * STEPS_PER_EPOCH, SEQ_LEN))
    y = rng.integers(0, 2, BATCH * STEPS_PER_EPOCH)
    steps = {}
    for name, wrap in METHODS.items():
        trainer = wrap(build_model(rate))
        trainer.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            loss="sparse_categorical_crossentropy",
            jit_compile=True,
        )
        steps[name] = harness.timed(
            lambda t=trainer: t.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
        )
    return steps


def main(rounds: int = 5) -> dict:
    from keras.src.backend.tensorflow import random as tf_random

    default_dropout = tf_random.dropout
    results = {}
    for setting, rate, dropout in (
        ("default", 0.1, default_dropout),
        ("philox", 0.1, philox_dropout),
        ("no dropout", 0.0, default_dropout),
    ):
        tf_random.dropout = dropout
        try:
            steps = epoch_steps(rate)
            harness.warm_up(steps, 1)  # the first epoch compiles
            measured = harness.interleave(steps, rounds, 1)
        finally:
            tf_random.dropout = default_dropout
        for name in steps:
            step_ms = 1000 * measured.summary(name)["median_step_s"] / STEPS_PER_EPOCH
            ratio = harness.ratio_to(measured, name, "sgd")["ratio"]
            results[(setting, name)] = ratio
            print(f"{setting:11s} {name:5s} {step_ms:7.1f} ms/step  ratio to SGD {ratio:.2f}",
                  flush=True)
        keras.backend.clear_session()
    return results


if __name__ == "__main__":
    main()
