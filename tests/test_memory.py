"""A training step's memory on TensorFlow with XLA, from TensorFlow's allocator.

`keras_sam.demo.StepMemory` reads the most bytes one step allocates above what was
held when it began (`tf.config.experimental.get_memory_info`). Each method runs in
a fresh process: the first model a process trains allocates about a parameter copy
more per step than later ones (measured, not explained), so figures taken in one
process depend on the order. Figures are in copies of the parameters, on an MLP
whose parameters dominate; the bounds are today's figures plus a margin, so a
change that makes a step hold another copy fails here (JAX: tests/jax_backend/
test_memory.py; the process's peak: ``python -m benchmarks.memory``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_sam.demo import StepMemory
from tests.helpers import compiled_wide_mlp

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TensorFlow's allocator statistics"
)

WIDTH = 768
ROOT = Path(__file__).resolve().parents[1]


def measure(name: str) -> float:
    """One method's largest step allocation, in parameter copies (run in a fresh process)."""
    model, trainer = compiled_wide_mlp(name, WIDTH)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, WIDTH)).astype("float32")
    y = rng.integers(0, 10, 128)
    memory = StepMemory()
    trainer.fit(x, y, batch_size=64, epochs=2, verbose=0, callbacks=[memory])
    parameters = sum(int(np.prod(v.shape)) * 4 for v in model.trainable_variables)
    return memory.peak_bytes / parameters


def _in_fresh_process(name: str) -> float:
    code = (
        f"import json; from tests.test_memory import measure; print(json.dumps(measure({name!r})))"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def copies() -> dict:
    return {name: _in_fresh_process(name) for name in ("sgd", "adamw", "sam", "msam", "adamw-msam")}


@pytest.mark.parametrize(
    ("name", "base", "bound"),
    [
        # SAM needs ε (one copy): 0.90 today.
        ("sam", "sgd", 1.25),
        # Momentum-SAM needs no copy: 0.90 today for both flavours (2.92 while a
        # non-finite step was skipped by a conditional; docs/benchmarks, "Memory").
        ("msam", "sgd", 1.25),
        ("adamw-msam", "adamw", 1.25),
    ],
)
def test_a_step_allocates_within_its_bound_above_the_base(copies, name, base, bound):
    assert 0.0 < copies[base] < 1.0, copies  # the base: gradients, roughly
    assert copies[name] - copies[base] <= bound, copies
