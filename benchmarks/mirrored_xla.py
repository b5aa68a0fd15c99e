"""What `jit_compile=True` buys a wrapper under MirroredStrategy.

    python -m benchmarks.mirrored_xla

Splits the CPU into two logical devices, trains the speed benchmark's CNN with
`fit` (global batch 128) as SGD without XLA (Keras' own XLA fails there), SAM
without XLA, and SAM with its passes XLA-compiled per replica, and prints the
median step time of each (epochs after the first, two interleaved rounds).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf

_CPUS = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _CPUS[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402
from benchmarks.speed import build_cnn  # noqa: E402

STEPS_PER_EPOCH = 4
CONFIGS = (("sgd", False), ("sam", False), ("sam", True))


class _EpochTimer(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.step_times: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch > 0:  # the first epoch compiles
            self.step_times.append((time.perf_counter() - self._start) / STEPS_PER_EPOCH)


def main(rounds: int = 2) -> dict:
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    x = rng.random((128 * STEPS_PER_EPOCH, 32, 32, 3), dtype="float32")
    y = rng.integers(0, 10, 128 * STEPS_PER_EPOCH)
    times: dict = {config: [] for config in CONFIGS}
    for _ in range(rounds):
        for name, jit_compile in CONFIGS:
            with strategy.scope():
                model = build_cnn(0)
                trainer = model if name == "sgd" else keras_sam.SAM(model, rho=0.05)
                trainer.compile(
                    optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    jit_compile=jit_compile,
                )
            timer = _EpochTimer()
            trainer.fit(x, y, batch_size=128, epochs=4, verbose=0, callbacks=[timer])
            times[(name, jit_compile)].extend(timer.step_times)
    base = float(np.median(times[("sgd", False)]))
    for (name, jit_compile), values in times.items():
        median = float(np.median(values))
        print(f"{name:4s} jit_compile={jit_compile!s:5s} {1000 * median:7.0f} ms/step "
              f"ratio {median / base:.2f}")
    return times


if __name__ == "__main__":
    main()
