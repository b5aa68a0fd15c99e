"""SAM against a hand-written numpy SAM."""

import keras
import numpy as np
import pytest

import keras_sam
from tests import numpy_reference as ref
from tests.helpers import assert_weights_close, keras_mlp

RNG = np.random.default_rng(3)
X = RNG.normal(size=(8, 3)).astype("float32")
Y = RNG.normal(size=(8, 2)).astype("float32")


def _fit_sam(params, rho, steps, jit_compile, sample_weight=None):
    trainer = keras_sam.SAM(keras_mlp(params), rho=rho)
    trainer.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=jit_compile)
    trainer.fit(X, Y, sample_weight=sample_weight, batch_size=8, epochs=steps,
                shuffle=False, verbose=0)
    return trainer.model.get_weights()


@pytest.mark.parametrize("jit_compile", [False, True])
def test_two_sam_steps_match_numpy(jit_compile):
    params = ref.init_params()
    expected = params
    for _ in range(2):
        expected = ref.sam_sgd_step(expected, X, Y, 0.1, lambda p, g: ref.sam_epsilon(g, 0.2))
    assert_weights_close(_fit_sam(params, 0.2, 2, jit_compile), expected, atol=1e-6)


def test_sam_step_with_sample_weights_matches_numpy():
    params = ref.init_params(seed=1)
    weights = np.array([0.0, 1.0, 2.0, 0.5, 1.0, 0.0, 3.0, 1.0], "float32")
    expected = ref.sam_sgd_step(
        params, X, Y, 0.1, lambda p, g: ref.sam_epsilon(g, 0.3), sample_weight=weights
    )
    assert_weights_close(_fit_sam(params, 0.3, 1, False, weights), expected, atol=1e-6)


def test_sam_differs_from_base_step():
    params = ref.init_params()
    base = ref.sam_sgd_step(params, X, Y, 0.1, lambda p, g: [0 * t for t in g])
    got = _fit_sam(params, 0.2, 1, False)
    assert max(np.abs(a - b).max() for a, b in zip(got, base)) > 1e-4
