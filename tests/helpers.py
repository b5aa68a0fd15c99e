"""Small Keras models and utilities shared by the tests."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_sam import registry

_TORCH = keras.backend.backend() == "torch"
#: ``jit_compile`` for a test that wants a compiled step where the backend compiles
#: one (on PyTorch the wrappers refuse ``jit_compile=True``).
JIT_COMPILE = not _TORCH
#: For tests of a compiled program (PyTorch runs a wrapper's step eagerly).
compiled_step_only = pytest.mark.skipif(_TORCH, reason="no compiled step on PyTorch")
#: Keras' PyTorch trainer requires ``steps_per_execution=1``.
multi_step_execution = pytest.mark.skipif(
    _TORCH, reason="Keras' PyTorch trainer requires steps_per_execution=1"
)


def keras_mlp(params, n_in: int = 3) -> keras.Model:
    """The Keras twin of `numpy_reference`: Dense(tanh) -> Dense, float64-free."""
    inputs = keras.Input((n_in,))
    hidden = keras.layers.Dense(params[0].shape[1], activation="tanh")(inputs)
    outputs = keras.layers.Dense(params[2].shape[1])(hidden)
    model = keras.Model(inputs, outputs)
    model.set_weights([p.astype("float32") for p in params])
    return model


def bn_dropout_model(
    seed: int = 1, n_in: int = 8, n_classes: int = 3, dropout: float = 0.25
) -> keras.Model:
    """A classifier with BatchNormalization and Dropout (logits output)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((n_in,))
    # No bias before BatchNorm: its gradient is rounding noise, which Adam amplifies
    # to learning-rate-sized steps that differ with the backend's arithmetic.
    h = keras.layers.Dense(16, use_bias=False, name="dense_in")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Dropout(dropout, seed=seed)(h)
    outputs = keras.layers.Dense(n_classes, name="dense_out")(h)
    return keras.Model(inputs, outputs)


class Subclassed(keras.Model):
    """The usual ``class MyModel(keras.Model)``: no Input, built by its first batch."""

    def __init__(self, n_classes: int = 3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(8, activation="tanh")
        self.out = keras.layers.Dense(n_classes)

    def call(self, inputs):
        return self.out(self.hidden(inputs))


def lazy_models() -> dict:
    """Models whose variables the first batch creates: a subclassed model and a
    Sequential without an Input (same layers, seeded)."""

    def sequential() -> keras.Model:
        return keras.Sequential(
            [keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)]
        )

    return {"subclassed": Subclassed, "sequential": sequential}


def plain_model(seed: int = 1, n_in: int = 8, n_classes: int = 3) -> keras.Model:
    """A classifier without BatchNormalization or Dropout."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((n_in,))
    h = keras.layers.Dense(16, activation="tanh")(inputs)
    outputs = keras.layers.Dense(n_classes)(h)
    return keras.Model(inputs, outputs)


def classification_data(n: int = 48, n_in: int = 8, n_classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n_in)).astype("float32")
    y = rng.integers(0, n_classes, size=(n,)).astype("int32")
    return x, y


def compiled_wide_mlp(name: str, width: int) -> tuple[keras.Model, keras.Model]:
    """``(model, trainer)``: an MLP of four hidden layers of ``width`` and 10 logits,
    trained by the registry method or base optimizer ``name`` and compiled with XLA
    (the memory tests' setting: the parameters dominate)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((width,))
    h = inputs
    for _ in range(4):
        h = keras.layers.Dense(width, activation="relu")(h)
    model = keras.Model(inputs, keras.layers.Dense(10)(h))
    if name in registry.BASES:
        trainer, optimizer = model, registry.BASES[name].make(0.01)
    else:
        trainer, optimizer = registry.METHODS[name].build(model, learning_rate=0.01)
    trainer.compile(optimizer=optimizer, loss=logits_loss(), jit_compile=True)
    return model, trainer


def logits_loss() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def assert_weights_close(a, b, atol=1e-6, rtol=0.0):
    assert len(a) == len(b)
    for wa, wb in zip(a, b):
        np.testing.assert_allclose(np.asarray(wa), np.asarray(wb), atol=atol, rtol=rtol)


def max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b))


@functools.cache
def mirrored_strategy():
    """The process-wide MirroredStrategy over the two logical CPUs of conftest.py.

    Always use this one: a second MirroredStrategy in the same process restarts
    TF's collective instance keys, which then clash with shapes cached for the first.
    """
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


ROOT = Path(__file__).resolve().parents[1]


def run_under_backend(arguments: list, backend: str, timeout: int) -> subprocess.CompletedProcess:
    """``python *arguments`` in a subprocess with ``KERAS_BACKEND=backend``, from the
    repository root (so ``tests`` and ``keras_sam`` import)."""
    env = dict(os.environ, KERAS_BACKEND=backend)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return subprocess.run([sys.executable, *arguments], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_tests_under_backend(tests: list, selection: str, backend: str, timeout: int) -> None:
    """Runs pytest on ``tests`` (``-k selection``) under ``backend``; fails with its
    summary unless they pass."""
    result = run_under_backend(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", selection, *tests],
        backend,
        timeout,
    )
    summary = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, f"the {backend} test run failed:\n{summary}"
    assert " passed" in result.stdout, summary
