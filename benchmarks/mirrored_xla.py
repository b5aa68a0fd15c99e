"""What `jit_compile=True` buys a wrapper under MirroredStrategy.

    python -m benchmarks.mirrored_xla

Splits the CPU into two logical devices, trains the speed benchmark's CNN with
`fit` (global batch 128) as SGD without XLA (Keras' own XLA fails there), SAM
without XLA, and SAM with its passes XLA-compiled per replica, and prints the
step time of each (one-epoch `fit` calls after a warm-up epoch, interleaved rounds
of `benchmarks.harness`; ratios to SGD beside them).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf

_CPUS = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _CPUS[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.workloads import build_cnn  # noqa: E402

STEPS_PER_EPOCH = 4
CONFIGS = (("sgd", False), ("sam", False), ("sam", True))


def main(rounds: int = 3) -> dict:
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    x = rng.random((128 * STEPS_PER_EPOCH, 32, 32, 3), dtype="float32")
    y = rng.integers(0, 10, 128 * STEPS_PER_EPOCH)
    epochs = {}
    for name, jit_compile in CONFIGS:
        with strategy.scope():
            model = build_cnn(0)
            trainer = model if name == "sgd" else keras_sam.SAM(model, rho=0.05)
            trainer.compile(
                optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=jit_compile,
            )
        epochs[f"{name} jit_compile={jit_compile}"] = harness.timed(
            lambda t=trainer: t.fit(x, y, batch_size=128, epochs=1, verbose=0)
        )
    harness.warm_up(epochs, 1)  # the first epoch compiles
    measured = harness.interleave(epochs, rounds, 1)
    for name in epochs:
        step_s = measured.summary(name)["median_step_s"] / STEPS_PER_EPOCH
        ratio = harness.ratio_to(measured, name, "sgd jit_compile=False")["ratio"]
        print(f"{name:22s} {1000 * step_s:7.0f} ms/step  ratio {ratio:.2f}")
    return measured.round_means


if __name__ == "__main__":
    main()
