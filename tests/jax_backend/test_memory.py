"""The compiled step's memory, from XLA's own buffer assignment (JAX only).

`jax.jit(...).lower(...).compile().memory_analysis()` gives the bytes of the step's
temporaries: exact and free of allocator noise, so a regression that makes a method
hold another copy of the parameters fails here (the memory benchmark measures the
process; `python -m benchmarks.memory`). Figures are in copies of the parameters,
on an MLP whose parameters dominate; the bounds are today's figures plus a margin.
"""

from __future__ import annotations

import sys
import warnings

import keras
import numpy as np
import pytest

from keras_sam import backend, registry
from tests.helpers import compiled_wide_mlp, logits_loss

if keras.backend.backend() != "jax":
    pytest.skip(
        "JAX-only (XLA memory analysis); tests/test_jax_backend.py runs it with KERAS_BACKEND=jax",
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
        # Momentum-SAM: 0.03 today (each entry with a non-finite gradient skipped
        # by a select in the update's loop); 0.21 and 0.22 while each variable's
        # gradient was reduced for the check before its update, 0.64 and 0.66
        # while the step waited for every gradient to be checked and XLA kept a
        # copy of each momentum for the re-perturbation, 1.18 while `lax.cond`
        # skipped a non-finite step.
        ("msam", "sgd", 0.1),
        ("adamw-msam", "adamw", 0.1),
    ],
)
def test_compiled_step_temporaries_stay_within_their_bound(memory, name, base, bound):
    extra = memory[name]["temporaries"] - memory[base]["temporaries"]
    assert extra <= bound, (name, memory[name], memory[base])


@pytest.mark.parametrize("name", ["sam", "asam", "ksam", "esam"])
def test_an_eager_step_lets_the_clean_gradient_and_epsilon_go_before_the_perturbed_pass(name):
    """Without ``jit_compile`` an array lives while a name holds it: when the
    perturbed pass begins, a kernel has its value, w + ε and its momentum, and no
    longer the clean gradient (scaled and unscaled) or ε (six arrays of its shape
    before; the process held 2.4 copies above SGD, 1.1 after:
    ``python -m benchmarks.memory --xla off``; ESAM's own `descent` kept both, five
    arrays, until 2026-12-07)."""
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


def test_fused_compiles_a_function_once_per_shape_and_inlines_it_when_traced():
    traces = []

    def scaled_sum(x: object, y: object, scale: object) -> object:
        traces.append(type(x).__name__)
        return x * scale + y

    fused = backend.fused(scaled_sum)
    x, y = jax.numpy.arange(3.0), jax.numpy.ones(3)
    for scale in (2.0, 3.0):
        np.testing.assert_allclose(
            fused(x, y, jax.numpy.float32(scale)), [1, 1 + scale, 1 + 2 * scale]
        )
    assert len(traces) == 1  # compiled at the first call, run as it is at the second
    assert float(jax.jit(lambda x: fused(x, x, 0.5).sum())(x)) == 4.5  # inlined, traced once more
    assert len(traces) == 2


@pytest.mark.parametrize("name", ["msam", "adamw-msam"])
def test_an_eager_momentum_sam_step_compiles_each_variables_update_once(name, monkeypatch):
    """Without ``jit_compile`` a variable's update is one compiled program (no
    intermediate tensor of its shape is allocated: the process held 1.1 parameter
    copies above SGD before, 0.7 after: ``KERAS_BACKEND=jax python -m
    benchmarks.memory --xla off``), compiled once per variable shape, not once per
    step."""
    module = sys.modules[registry.METHODS[name].cls.__module__]
    traced_shapes = []

    def recording(weights: object, *rest: object) -> object:
        traced_shapes.append(tuple(weights.shape))
        return module._update(weights, *rest)

    monkeypatch.setattr(module, "_fused_update", backend.fused(recording))
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((37,)), keras.layers.Dense(41), keras.layers.Dense(3)])
    model.compile(
        optimizer=registry.METHODS[name].make_optimizer(0.01), loss=logits_loss(), jit_compile=False
    )
    before = [np.array(w) for w in model.get_weights()]
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 37)).astype("float32"), rng.integers(0, 3, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the missing-callback warning
        model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert sorted(traced_shapes) == [(3,), (37, 41), (41,), (41, 3)]
    assert all(not np.allclose(a, b) for a, b in zip(before, model.get_weights()))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_an_eager_step_skips_a_non_finite_update_on_the_host(jit_compile, monkeypatch):
    """Without ``jit_compile`` the two-pass step's skip is a host-side branch: a
    `jax.lax.cond` compiled the optimizer's whole update into one program holding
    every variable's old and new value (the process peaked there: SAM +1.11 copies
    above SGD, +0.18 after; ``KERAS_BACKEND=jax python -m benchmarks.memory --xla
    off``). A compiled step keeps its conditional. Either way a non-finite step
    leaves the weights as they were."""
    conds = []
    module = sys.modules[backend.apply_if_finite.__module__]
    real_cond = module.jax.lax.cond

    def counting(*args: object, **kwargs: object) -> object:
        conds.append(1)
        return real_cond(*args, **kwargs)

    monkeypatch.setattr(module.jax.lax, "cond", counting)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((37,)), keras.layers.Dense(41), keras.layers.Dense(3)])
    trainer = registry.METHODS["sam"].build(model, learning_rate=0.01)[0]
    trainer.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=logits_loss(),
        jit_compile=jit_compile,
    )
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 37)).astype("float32"), rng.integers(0, 3, 8)
    trainer.fit(x, y, batch_size=8, epochs=1, verbose=0)
    before = [np.array(w) for w in model.get_weights()]
    x[0, 0] = np.nan
    trainer.fit(x, y, batch_size=8, epochs=1, verbose=0)
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)
    assert bool(conds) == jit_compile, len(conds)
