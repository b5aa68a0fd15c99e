"""Trains every method a few steps from fixed weights and saves the weights (a subprocess).

Usage: ``KERAS_BACKEND=<backend> python cross_backend_script.py OUT.npz``.
`tests/test_jax_backend.py` runs it under TensorFlow and JAX and compares the files.
No dropout (the backends' RNGs differ); BatchNorm is deterministic and included.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import keras_sam

RNG = np.random.default_rng(7)
X = RNG.normal(size=(24, 5)).astype("float32")
Y = RNG.integers(0, 3, size=(24,)).astype("int32")


def make_model() -> keras.Model:
    rng = np.random.default_rng(11)
    inputs = keras.Input((5,))
    # No bias before BatchNorm: its gradient is rounding noise, which Adam would
    # amplify to learning-rate-sized steps that differ between backends.
    h = keras.layers.Dense(6, use_bias=False, name="d1")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Activation("tanh")(h)
    h = keras.layers.Dense(6, activation="tanh", name="d2")(h)
    model = keras.Model(inputs, keras.layers.Dense(3, name="d3")(h))
    model.set_weights(
        [(rng.normal(size=w.shape) * 0.5).astype("float32") if w.ndim == 2 else w
         for w in model.get_weights()]
    )
    return model


def sgd() -> keras.optimizers.Optimizer:
    return keras.optimizers.SGD(0.1, momentum=0.9)


RUNS = {
    "sam": lambda m: (keras_sam.SAM(m, rho=0.2), sgd()),
    "asam": lambda m: (keras_sam.ASAM(m, rho=0.5), sgd()),
    "ksam": lambda m: (keras_sam.KSAM(m, rho=0.2, k=0.5), sgd()),
    "layerwise": lambda m: (keras_sam.LayerwiseSAM(m, rho=0.2, num_layers=2, layers=None), sgd()),
    "gsam": lambda m: (keras_sam.GSAM(m, rho=0.2, alpha=0.4), sgd()),
    "looksam": lambda m: (keras_sam.LookSAM(m, rho=0.2, k=2), sgd()),
    # beta = 1: the variable draw is backend-specific (stateless RNGs differ).
    "esam": lambda m: (keras_sam.ESAM(m, rho=0.2, beta=1.0, gamma=0.5), sgd()),
    "friendly_sam": lambda m: (keras_sam.FriendlySAM(m, rho=0.2), sgd()),
    "wsam": lambda m: (keras_sam.WSAM(m, rho=0.2), sgd()),
    "sam_splits": lambda m: (keras_sam.SAM(m, rho=0.2, num_batch_splits=2), sgd()),
    "msam": lambda m: (m, keras_sam.optimizers.MSAM(0.1, momentum=0.9, rho=0.3)),
    "adamw_msam": lambda m: (m, keras_sam.optimizers.AdamWMSAM(0.01, rho=0.3)),
}


def main(path: str) -> None:
    arrays = {}
    for name, make in RUNS.items():
        model = make_model()
        trainer, optimizer = make(model)
        trainer.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=True,
        )
        callbacks = [] if trainer is not model else [keras_sam.callbacks.MSAMCallback()]
        # 24 samples, batch 8: 3 steps per epoch, 2 epochs.
        trainer.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=callbacks)
        for i, w in enumerate(model.get_weights()):  # includes BatchNorm statistics
            arrays[f"{name}/{i}"] = w
    np.savez(path, backend=keras.backend.backend(), **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
