"""The compiled step's memory, from XLA's own buffer assignment (JAX only).

`jax.jit(...).lower(...).compile().memory_analysis()` gives the bytes of the step's
temporaries: exact and free of allocator noise, so a regression that makes a method
hold another copy of the parameters fails here (the memory benchmark measures the
process; `python -m benchmarks.memory`). Figures are in copies of the parameters,
on an MLP whose parameters dominate; the bounds are today's figures plus a margin.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_sam import registry
from tests.helpers import compiled_wide_mlp, logits_loss

if keras.backend.backend() != "jax":
    pytest.skip(
        "JAX-only (XLA memory analysis); tests/test_jax_backend.py runs it with "
        "KERAS_BACKEND=jax",
        allow_module_level=True,
    )

import jax

WIDTH = 128


def _step_memory(name: str) -> dict:
    """The compiled step's temporaries and the optimizer state, in parameter copies."""
    model, trainer = compiled_wide_mlp(name, WIDTH)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, WIDTH)).astype("float32")
    y = rng.integers(0, 10, 32)
    trainer.fit(x, y, batch_size=32, epochs=1, verbose=0)  # builds every variable
    groups = (
        trainer.trainable_variables,
        trainer.non_trainable_variables,
        trainer.optimizer.variables,
        trainer.metrics_variables,
    )
    state = tuple([v.value for v in group] for group in groups)
    step = jax.jit(trainer.train_step, donate_argnums=0)
    analysis = step.lower(state, (x, y)).compile().memory_analysis()
    parameters = sum(v.value.nbytes for v in model.trainable_variables)
    return {
        "temporaries": analysis.temp_size_in_bytes / parameters,
        "optimizer_state": sum(v.value.nbytes for v in trainer.optimizer.variables) / parameters,
    }


@pytest.fixture(scope="module")
def memory() -> dict:
    return {
        name: _step_memory(name) for name in ("sgd", "adamw", "sam", "ksam", "msam", "adamw-msam")
    }


def test_momentum_sam_keeps_no_per_parameter_state_beyond_its_base(memory):
    for name, base in (("msam", "sgd"), ("adamw-msam", "adamw")):
        extra = memory[name]["optimizer_state"] - memory[base]["optimizer_state"]
        assert 0 <= extra < 1e-3, (name, extra)  # two scalars: the scale and the flag


@pytest.mark.parametrize(
    ("name", "base", "bound"),
    [
        # SAM needs ε (one copy); XLA overlaps it with the gradients: 0.46 today.
        ("sam", "sgd", 0.75),
        ("ksam", "sgd", 0.75),
        # Momentum-SAM: 0.21 and 0.22 today; 0.64 and 0.66 while the step waited
        # for every gradient to be checked and XLA kept a copy of each momentum
        # for the re-perturbation, 1.18 while `lax.cond` skipped a non-finite step.
        ("msam", "sgd", 0.35),
        ("adamw-msam", "adamw", 0.35),
    ],
)
def test_compiled_step_temporaries_stay_within_their_bound(memory, name, base, bound):
    extra = memory[name]["temporaries"] - memory[base]["temporaries"]
    assert extra <= bound, (name, memory[name], memory[base])


@pytest.mark.parametrize("name", ["sam", "asam", "ksam"])
def test_an_eager_step_lets_the_clean_gradient_and_epsilon_go_before_the_perturbed_pass(name):
    """Without ``jit_compile`` an array lives while a name holds it: when the
    perturbed pass begins, a kernel has its value, w + ε and its momentum, and no
    longer the clean gradient (scaled and unscaled) or ε (six arrays of its shape
    before; the process held 2.4 copies above SGD, 1.1 after:
    ``python -m benchmarks.memory --xla off``)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((37,)), keras.layers.Dense(41), keras.layers.Dense(3)])
    trainer = registry.METHODS[name].build(model, learning_rate=0.01)[0]
    counts = []
    perturbed_pass = trainer._perturbed_gradients

    def counting(*args: object) -> object:
        counts.append(sum(a.shape == (37, 41) for a in jax.live_arrays()))
        return perturbed_pass(*args)

    trainer._perturbed_gradients = counting
    trainer.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss=logits_loss(), jit_compile=False
    )
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 37)).astype("float32"), rng.integers(0, 3, 16)
    trainer.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert counts == [3, 3], counts
