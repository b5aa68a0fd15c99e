"""The shared step of the Momentum-SAM optimizers: a non-finite step is skipped
exactly, with the gated update (no conditional) and with the conditional that
`use_ema` and gradient accumulation keep."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_sam.optimizers import MSAM, AdamWMSAM

pytestmark = pytest.mark.filterwarnings("ignore:(AdamW)?MSAM. the model variables")

FLAVOURS = {
    "msam": lambda **kw: MSAM(0.05, momentum=0.9, rho=0.3, weight_decay=0.01, **kw),
    "adamw-msam": lambda **kw: AdamWMSAM(0.01, rho=0.3, weight_decay=0.01, **kw),
}
OPTIONS = {
    "gated": {},
    "ema": {"use_ema": True},
    "accumulation": {"gradient_accumulation_steps": 2},
}


def _state(variables, optimizer):
    return [np.array(v.numpy()) for v in [*variables, *optimizer.variables]]


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("flavour", list(FLAVOURS))
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_step_leaves_everything_bit_for_bit(flavour, option, bad):
    rng = np.random.default_rng(0)
    variables = [keras.Variable(rng.normal(size=(3, 2)).astype("float32")), keras.Variable([0.5])]
    optimizer = FLAVOURS[flavour](**OPTIONS[option])
    for _ in range(4):  # perturbed, with momentum (and an accumulated gradient)
        optimizer.apply([rng.normal(size=v.shape).astype("float32") for v in variables], variables)
    assert optimizer.is_perturbed
    before = _state(variables, optimizer)
    grads = [rng.normal(size=v.shape).astype("float32") for v in variables]
    grads[0][1, 0] = bad
    optimizer.apply(grads, variables)
    for got, want in zip(_state(variables, optimizer), before):
        np.testing.assert_array_equal(got, want)
    # and the next finite step is taken
    optimizer.apply([np.ones(v.shape, "float32") for v in variables], variables)
    assert any(np.any(a != b) for a, b in zip(_state(variables, optimizer), before))


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_a_compiled_fit_skips_a_non_finite_batch_exactly(flavour):
    """Under XLA: two batches, the second with a NaN, train as the first alone."""
    x = np.random.default_rng(1).normal(size=(32, 4)).astype("float32")
    y = (x @ np.arange(8, dtype="float32").reshape(4, 2)).astype("float32")
    bad = x.copy()
    bad[20, 1] = np.nan

    def run(inputs, targets):
        keras.utils.set_random_seed(2)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model.compile(optimizer=FLAVOURS[flavour](), loss="mse", jit_compile=True)
        model.fit(inputs, targets, batch_size=16, epochs=1, shuffle=False, verbose=0)
        return _state(model.trainable_variables, model.optimizer)

    for got, want in zip(run(bad, y), run(x[:16], y[:16])):
        np.testing.assert_array_equal(got, want)
