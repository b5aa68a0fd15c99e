"""ASAM against a hand-written numpy ASAM."""

import keras
import numpy as np
import pytest

import keras_sam
from tests import numpy_reference as ref
from tests.helpers import assert_weights_close, keras_mlp

RNG = np.random.default_rng(4)
X = RNG.normal(size=(8, 3)).astype("float32")
Y = RNG.normal(size=(8, 2)).astype("float32")


@pytest.mark.parametrize(("eta", "jit_compile"), [(0.01, False), (0.0, True), (0.5, False)])
def test_asam_steps_match_numpy(eta, jit_compile):
    params = ref.init_params(seed=2)
    expected = params
    for _ in range(2):
        expected = ref.sam_sgd_step(
            expected, X, Y, 0.1, lambda p, g: ref.asam_epsilon(p, g, 0.5, eta)
        )
    trainer = keras_sam.ASAM(keras_mlp(params), rho=0.5, eta=eta)
    trainer.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=jit_compile)
    trainer.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert_weights_close(trainer.model.get_weights(), expected, atol=1e-6)


def test_biases_are_not_rescaled():
    """T = 1 on biases: rescaling them too (as some ports do) gives another step."""
    params = ref.init_params(seed=5)
    params[1] = params[1] + 3.0  # large biases make the difference visible
    trainer = keras_sam.ASAM(keras_mlp(params), rho=0.5)
    trainer.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    trainer.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    got = trainer.model.get_weights()

    def all_adaptive(p, g):
        scales = [np.abs(t) + 0.01 for t in p]
        norm = ref.global_norm([s * t for s, t in zip(scales, g)])
        return [0.5 * s**2 * t / norm for s, t in zip(scales, g)]

    wrong = ref.sam_sgd_step(params, X, Y, 0.1, all_adaptive)
    right = ref.sam_sgd_step(params, X, Y, 0.1, lambda p, g: ref.asam_epsilon(p, g, 0.5, 0.01))
    assert_weights_close(got, right, atol=1e-6)
    assert max(np.abs(a - b).max() for a, b in zip(got, wrong)) > 1e-3
