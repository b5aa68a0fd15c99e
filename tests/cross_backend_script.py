"""Trains every method a few steps from fixed weights and saves the weights (a subprocess).

Usage: ``KERAS_BACKEND=<backend> python cross_backend_script.py OUT.npz``.
`tests/test_cross_backend.py` runs it under TensorFlow, JAX and PyTorch and compares
the files. No dropout (the backends' RNGs differ); BatchNorm is deterministic and
included. Steps are compiled (XLA) on TensorFlow and JAX and eager on PyTorch, where
the wrappers refuse ``jit_compile=True``.
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


#: Learning rate per base optimizer.
LEARNING_RATE = {"sgd": 0.1, "adamw": 0.01}
#: What differs from the registry's hyperparameters: ρ at least 0.2 (so that the
#: perturbation matters within 6 steps), ESAM's β = 1 (the variable draw is
#: backend-specific: the stateless RNGs differ), and Layer-wise SAM ranking 2 of all
#: layers (the registry's output-side quarter is one layer of this model).
OVERRIDES = {
    "esam": {"beta": 1.0},
    "layerwise": {"num_layers": 2, "layers": None},
}


def _run(name: str, **extra: object):
    entry = keras_sam.registry.METHODS[name]
    return lambda model: entry.build(
        model,
        LEARNING_RATE[entry.base],
        rho=max(entry.rho, 0.2),
        **{**OVERRIDES.get(name, {}), **extra},
    )


RUNS = {name: _run(name) for name in keras_sam.registry.METHODS}
RUNS["sam_splits"] = _run("sam", num_batch_splits=2)


def main(path: str) -> None:
    arrays = {}
    for name, make in RUNS.items():
        model = make_model()
        trainer, optimizer = make(model)
        trainer.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=keras.backend.backend() != "torch",
        )
        callbacks = [] if trainer is not model else [keras_sam.callbacks.MSAMCallback()]
        # 24 samples, batch 8: 3 steps per epoch, 2 epochs.
        trainer.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=callbacks)
        for i, w in enumerate(model.get_weights()):  # includes BatchNorm statistics
            arrays[f"{name}/{i}"] = w
    np.savez(path, backend=keras.backend.backend(), **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
