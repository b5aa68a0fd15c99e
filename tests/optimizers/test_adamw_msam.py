"""Tests of keras_sam.optimizers.AdamWMSAM against independent NumPy references."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_sam.callbacks import MSAMCallback
from keras_sam.optimizers import AdamWMSAM
from tests.optimizers.msam_reference import A, adamw_msam_reference, linear_mse_grads

pytestmark = pytest.mark.filterwarnings("ignore:AdamWMSAM. the model variables")

X = np.random.RandomState(2).randn(24, 3).astype("float32")
Y = (X @ np.array([[1.0, -2.0], [0.5, 1.0], [-1.0, 0.3]]) - 0.2).astype("float32")
W0 = [
    np.array([[0.2, -0.1], [0.4, 0.3], [-0.5, 0.1]], "float32"),
    np.array([0.05, -0.05], "float32"),
]


def linear_model(optimizer, jit=False):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.set_weights(W0)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit)
    return model


def batches(epochs, batch_size=8):
    return [
        (X[i : i + batch_size].astype(np.float64), Y[i : i + batch_size])
        for _ in range(epochs)
        for i in range(0, len(X), batch_size)
    ]


def test_algorithms_vectors():
    w = keras.Variable(np.array([1.0, 1.0], "float32"))
    opt = AdamWMSAM(learning_rate=0.01, rho=0.1, epsilon=1e-8, weight_decay=0.1)
    clean, stored = [], []
    for _ in range(3):
        opt.apply([(A @ w.numpy()).astype("float32")], [w])
        stored.append(w.numpy().copy())
        with opt.unperturbed():
            clean.append(w.numpy().copy())
    np.testing.assert_allclose(clean[0], (0.9890100001, 0.98901), atol=1e-6)
    np.testing.assert_allclose(stored[0], (0.9790596282, 0.889506281), atol=1e-6)
    np.testing.assert_allclose(clean[1], (0.9780370596, 0.9780784319), atol=1e-6)
    np.testing.assert_allclose(clean[2], (0.9670813384, 0.9671728273), atol=1e-6)
    # PyTorch-epsilon reference of the authors' algorithm agrees to 1e-6 as well
    ref = adamw_msam_reference(
        [np.ones(2)], lambda p: [A @ p[0]], [()] * 3, 0.01, 0.1, eps=1e-8, wd=0.1,
        keras_eps=False,
    )
    np.testing.assert_allclose(clean[2], ref["w"][0], atol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_fit_matches_reference_with_global_norm(jit):
    model = linear_model(AdamWMSAM(0.02, rho=0.4, weight_decay=0.05), jit=jit)
    model.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[MSAMCallback()])
    ref = adamw_msam_reference(W0, linear_mse_grads, batches(2), 0.02, 0.4, wd=0.05)
    assert not model.optimizer.is_perturbed
    for got, want in zip(model.get_weights(), ref["w"]):
        np.testing.assert_allclose(got, want, atol=2e-6)
    assert model.optimizer.perturbation_scale == pytest.approx(ref["s"], rel=1e-5)


def test_invariants_after_each_step():
    model = linear_model(AdamWMSAM(0.02, rho=0.25))
    opt = model.optimizer
    for xb, yb in batches(1):
        grads = linear_mse_grads([v.numpy() for v in model.trainable_variables], xb, yb)
        opt.apply([g.astype("float32") for g in grads], model.trainable_variables)
        stored = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
        with opt.unperturbed():
            clean = np.concatenate([v.numpy().ravel() for v in model.trainable_variables])
        diff = (stored - clean).astype(np.float64)
        m = np.concatenate([s.numpy().ravel() for s in opt.momentums]).astype(np.float64)
        assert np.linalg.norm(diff) == pytest.approx(0.25, rel=1e-5)
        assert diff @ m / (np.linalg.norm(diff) * np.linalg.norm(m)) == pytest.approx(-1, abs=1e-6)


def test_rho_zero_equals_keras_adam_and_adamw():
    pairs = [
        (AdamWMSAM(0.02, rho=0.0, weight_decay=None), keras.optimizers.Adam(0.02), 1e-6),
        # Keras' AdamW decays before the step, the authors after: the Adam step (<= ~lr)
        # is decayed or not, so they differ by <= lr * wd * lr per step (3 steps here).
        (AdamWMSAM(0.02, rho=0.0, weight_decay=0.1),
         keras.optimizers.AdamW(0.02, weight_decay=0.1), 3 * 0.02 * 0.1 * 0.02 * 1.5),
    ]
    for ours, theirs, tol in pairs:
        a, b = linear_model(ours), linear_model(theirs)
        for xb, yb in batches(1):
            for model in (a, b):
                grads = linear_mse_grads([v.numpy() for v in model.trainable_variables], xb, yb)
                model.optimizer.apply(
                    # tensors: Keras' own optimizers on PyTorch take no numpy arrays
                    [keras.ops.convert_to_tensor(g, "float32") for g in grads],
                    model.trainable_variables,
                )
        for va, vb in zip(a.trainable_variables, b.trainable_variables):
            np.testing.assert_allclose(va.numpy(), vb.numpy(), atol=tol)


def test_warmup_schedule_leaves_no_residue():
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([2], [0.0, 0.8])
    model = linear_model(AdamWMSAM(0.02, rho=schedule, weight_decay=0.0))
    model.fit(X, Y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[MSAMCallback()])
    ref = adamw_msam_reference(
        W0, linear_mse_grads, batches(1, 4), 0.02, lambda t: 0.0 if t <= 2 else 0.8
    )
    for got, want in zip(model.get_weights(), ref["w"]):
        np.testing.assert_allclose(got, want, atol=2e-6)


def test_zero_gradients_no_nan():
    w = keras.Variable(np.array([1.0, -2.0], "float32"))
    opt = AdamWMSAM(0.1, rho=0.5, weight_decay=0.0)
    for _ in range(3):
        opt.apply([np.zeros(2, "float32")], [w])
    np.testing.assert_array_equal(w.numpy(), [1.0, -2.0])
    assert opt.perturbation_scale == 0.0


def test_config_round_trip_and_keras_file(tmp_path):
    opt = AdamWMSAM(3e-3, rho=1.5, beta_1=0.8, beta_2=0.99, epsilon=1e-6, weight_decay=0.1)
    clone = AdamWMSAM.from_config(opt.get_config())
    assert (clone.rho, clone.beta_1, clone.beta_2, clone.epsilon, clone.weight_decay) == (
        1.5, 0.8, 0.99, 1e-6, 0.1,
    )
    model = linear_model(opt)
    model.fit(X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[MSAMCallback()])
    path = str(tmp_path / "adamw.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer, AdamWMSAM)
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_defaults_match_design():
    opt = AdamWMSAM()
    assert float(opt.learning_rate.numpy()) == pytest.approx(1e-3)
    assert (opt.rho, opt.beta_1, opt.beta_2, opt.epsilon, opt.weight_decay) == (
        0.3, 0.9, 0.999, 1e-7, 0.004,
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"rho": -1.0}, ValueError, "rho"),
        ({"rho": float("nan")}, ValueError, "rho"),
        ({"beta_1": 1.0}, ValueError, "beta_1"),
        ({"beta_2": -0.5}, ValueError, "beta_2"),
        ({"epsilon": 0.0}, ValueError, "epsilon"),
        ({"epsilon": "tiny"}, TypeError, "epsilon"),
        ({"weight_decay": -0.1}, ValueError, "weight_decay"),
    ],
)
def test_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        AdamWMSAM(**kwargs)
