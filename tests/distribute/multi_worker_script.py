"""One worker of the MultiWorkerMirroredStrategy test (run as a subprocess).

Usage: TF_CONFIG=... python multi_worker_script.py METHOD OUT.npz
Trains a few steps of METHOD ("sam" or "msam") with `fit` and saves the weights.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

import keras_sam


def main(method: str, out: str) -> None:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = rng.integers(0, 3, size=(64,)).astype("int32")
    with strategy.scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(3),
        ])
        if method == "sam":
            trainer = keras_sam.SAM(model, rho=0.1)
            optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
            callbacks = []
        else:
            trainer = keras_sam.models.ModelWrapper(model)
            optimizer = keras_sam.optimizers.MSAM(0.05, momentum=0.9, rho=0.3)
            callbacks = [keras_sam.callbacks.MSAMCallback()]
        trainer.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    history = trainer.fit(
        x, y, batch_size=16, epochs=2, verbose=0, callbacks=callbacks,
        validation_data=(x[:32], y[:32]),
    )
    # Trainable weights must agree; BatchNorm statistics are per replica, as in Keras.
    arrays = {v.path: v.numpy() for v in model.trainable_variables}
    arrays["loss"] = np.asarray(history.history["loss"])
    np.savez(out, **arrays)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
