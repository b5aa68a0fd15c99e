"""Tests of keras_sam.optimizers.MSAM against independent NumPy references."""

from __future__ import annotations

import math
import os
import warnings

import keras
import numpy as np
import pytest

from keras_sam.backend import apply_gradients
from keras_sam.callbacks import MSAMCallback
from keras_sam.optimizers import MSAM
from tests.optimizers.msam_reference import (
    A,
    global_norm,
    linear_mse,
    linear_mse_grads,
    msam_reference,
)

pytestmark = pytest.mark.filterwarnings("ignore:MSAM. the model variables")

X = np.random.RandomState(1).randn(32, 3).astype("float32")
Y = (X @ np.array([[1.0, -2.0], [0.5, 1.0], [-1.0, 0.3]]) + 0.1).astype("float32")
W0 = [
    np.array([[0.2, -0.1], [0.4, 0.3], [-0.5, 0.1]], "float32"),
    np.array([0.05, -0.05], "float32"),
]


def quad_run(rho, steps, **kwargs):
    """MSAM on the §1.10 quadratic through optimizer.apply; returns clean and stored weights."""
    w = keras.Variable(np.array([1.0, 1.0], "float32"))
    opt = MSAM(learning_rate=0.05, momentum=0.9, rho=rho, **kwargs)
    clean, stored = [], []
    for _ in range(steps):
        opt.apply([(A @ w.numpy()).astype("float32")], [w])
        stored.append(w.numpy().copy())
        with opt.unperturbed():
            clean.append(w.numpy().copy())
    return opt, w, clean, stored


def linear_model(jit=False, optimizer=None, strategy=None):
    scope = strategy.scope() if strategy is not None else _Null()
    with scope:
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.set_weights(W0)
        model.compile(optimizer=optimizer, loss="mse", jit_compile=jit)
    return model


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def batches(epochs, batch_size=8):
    out = []
    for _ in range(epochs):
        for i in range(0, len(X), batch_size):
            out.append((X[i : i + batch_size].astype(np.float64), Y[i : i + batch_size]))
    return out


# --------------------------------------------------------------------------- §1.10 vectors
def test_rho_zero_is_sgd_momentum_vectors():
    _, _, clean, stored = quad_run(0.0, 4)
    expected = [(0.95, 0.5), (0.8575, -0.2), (0.731375, -0.73), (0.58129375, -0.842)]
    np.testing.assert_allclose(clean, expected, atol=1e-6)
    np.testing.assert_allclose(stored, expected, atol=1e-6)


def test_rho_point_one_vectors():
    opt, _, clean, stored = quad_run(0.1, 4)
    np.testing.assert_allclose(clean[0], (0.95, 0.5), atol=1e-6)
    np.testing.assert_allclose(stored[0], (0.9400496281, 0.400496281), atol=1e-6)
    np.testing.assert_allclose(clean[1], (0.8579975186, -0.1502481405), atol=1e-6)
    np.testing.assert_allclose(clean[2], (0.7329958742, -0.6108404789), atol=1e-6)
    np.testing.assert_allclose(clean[3], (0.5851541949, -0.6716988493), atol=1e-6)
    # naive-form reference agrees as well
    ref = msam_reference([np.ones(2)], lambda p: [A @ p[0]], [()] * 4, 0.05, 0.9, 0.1)
    np.testing.assert_allclose(clean[3], ref["w"][0], atol=1e-6)
    np.testing.assert_allclose(opt.momentums[0].numpy(), ref["v"][0], rtol=1e-6)
    assert opt.is_perturbed


def test_momentum_after_two_steps():
    opt, *_ = quad_run(0.1, 2)
    np.testing.assert_allclose(opt.momentums[0].numpy(), (1.8400496281, 13.0049628098), atol=1e-5)


@pytest.mark.parametrize("rho", [0.05, 0.3, 2.0])
def test_invariants_global_norm_and_direction(rho):
    model = linear_model(optimizer=MSAM(0.05, momentum=0.9, rho=rho))
    opt = model.optimizer
    for step in range(3):
        grads = linear_mse_grads([v.numpy() for v in model.trainable_variables], X, Y)
        opt.apply([g.astype("float32") for g in grads], model.trainable_variables)
        stored = [v.numpy().astype(np.float64) for v in model.trainable_variables]
        with opt.unperturbed():
            clean = [v.numpy().astype(np.float64) for v in model.trainable_variables]
        diff = np.concatenate([(s - c).ravel() for s, c in zip(stored, clean)])
        mom = np.concatenate([m.numpy().ravel() for m in opt.momentums]).astype(np.float64)
        assert math.isclose(np.linalg.norm(diff), rho, rel_tol=1e-5), step
        cosine = diff @ mom / (np.linalg.norm(diff) * np.linalg.norm(mom))
        assert cosine == pytest.approx(-1.0, abs=1e-6)
        assert opt.perturbation_scale == pytest.approx(rho / np.linalg.norm(mom), rel=1e-6)


def test_rho_zero_matches_keras_sgd_with_weight_decay():
    a = linear_model(optimizer=MSAM(0.05, momentum=0.9, rho=0.0, weight_decay=0.1))
    b = linear_model(optimizer=keras.optimizers.SGD(0.05, momentum=0.9, weight_decay=0.1))
    for xb, yb in batches(1):
        for model in (a, b):
            grads = linear_mse_grads([v.numpy() for v in model.trainable_variables], xb, yb)
            model.optimizer.apply(
                # tensors: Keras' own optimizers on PyTorch take no numpy arrays
                [keras.ops.convert_to_tensor(g, "float32") for g in grads],
                model.trainable_variables,
            )
    for va, vb in zip(a.trainable_variables, b.trainable_variables):
        np.testing.assert_allclose(va.numpy(), vb.numpy(), atol=1e-6)


def test_zero_gradients_and_zero_momentum_no_nan():
    w = keras.Variable(np.array([1.0, -2.0], "float32"))
    opt = MSAM(0.1, momentum=0.9, rho=0.5)
    for _ in range(3):
        opt.apply([np.zeros(2, "float32")], [w])
    np.testing.assert_array_equal(w.numpy(), [1.0, -2.0])
    assert opt.perturbation_scale == 0.0
    opt2 = MSAM(0.1, momentum=0.0, rho=0.5)
    opt2.apply([np.zeros(2, "float32")], [w])
    assert np.all(np.isfinite(w.numpy()))


# --------------------------------------------------------------------------- through fit
@pytest.mark.parametrize("jit", [False, True])
def test_fit_matches_reference_and_ends_clean(jit):
    model = linear_model(jit=jit, optimizer=MSAM(0.05, momentum=0.9, rho=0.2))
    with pytest.warns(UserWarning, match="MSAMCallback"):
        model.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    ref = msam_reference(W0, linear_mse_grads, batches(2), 0.05, 0.9, 0.2)
    assert not model.optimizer.is_perturbed
    for got, want in zip(model.get_weights(), ref["w"]):
        np.testing.assert_allclose(got, want, atol=2e-6)
    np.testing.assert_allclose(
        model.predict(X, verbose=0), X @ ref["w"][0] + ref["w"][1], atol=1e-5
    )
    loss = model.evaluate(X, Y, verbose=0)
    assert loss == pytest.approx(linear_mse(ref["w"], X, Y), rel=1e-5)


def test_rho_schedule_jump_leaves_no_residue():
    def rho_fn(step):
        # PiecewiseConstantDecay: value[i] for boundary[i-1] < step <= boundary[i]
        return 0.0 if step <= 3 else (1.5 if step <= 6 else 0.0)

    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([3, 6], [0.0, 1.5, 0.0])
    model = linear_model(optimizer=MSAM(0.05, momentum=0.9, rho=schedule))
    model.fit(X, Y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[MSAMCallback()])
    ref = msam_reference(W0, linear_mse_grads, batches(1, 4), 0.05, 0.9, rho_fn)
    for got, want in zip(model.get_weights(), ref["w"]):
        np.testing.assert_allclose(got, want, atol=2e-6)
    # the last steps have rho = 0: stored weights == clean weights
    model.optimizer.apply_perturbation()
    for got, want in zip(model.get_weights(), ref["w"]):
        np.testing.assert_allclose(got, want, atol=2e-6)


def test_lr_schedule_weight_decay_and_global_clipnorm():
    lr = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.8)
    opt = MSAM(lr, momentum=0.8, rho=0.3, weight_decay=0.05, global_clipnorm=0.5)
    model = linear_model(optimizer=opt)
    model.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[MSAMCallback()])
    ref = msam_reference(
        W0, linear_mse_grads, batches(2), lambda t: 0.1 * 0.8**t, 0.8, 0.3,
        weight_decay=0.05, clip_global=0.5,
    )
    for got, want in zip(model.get_weights(), ref["w"]):
        np.testing.assert_allclose(got, want, atol=2e-6)


def test_exclude_from_weight_decay():
    opt = MSAM(0.05, momentum=0.9, rho=0.0, weight_decay=0.5)
    opt.exclude_from_weight_decay(var_names=["bias"])
    model = linear_model(optimizer=opt)
    grads = [np.zeros((3, 2), "float32"), np.zeros(2, "float32")]
    opt.apply(grads, model.trainable_variables)
    np.testing.assert_allclose(model.get_weights()[0], W0[0] * (1 - 0.05 * 0.5), atol=1e-7)
    np.testing.assert_array_equal(model.get_weights()[1], W0[1])


def test_gradient_accumulation_perturbation_changes_only_on_update_steps():
    opt = MSAM(0.05, momentum=0.9, rho=0.2, gradient_accumulation_steps=2)
    model = linear_model(optimizer=opt)
    model.fit(X, Y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[MSAMCallback()])
    ref = msam_reference(W0, linear_mse_grads, batches(1, 4), 0.05, 0.9, 0.2, accumulation=2)
    for got, want in zip(model.get_weights(), ref["w"]):
        np.testing.assert_allclose(got, want, atol=2e-6)
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == 4


def test_loss_scale_factor_and_loss_scale_optimizer():
    ref = msam_reference(W0, linear_mse_grads, batches(1), 0.05, 0.9, 0.2)
    for opt in (
        MSAM(0.05, momentum=0.9, rho=0.2, loss_scale_factor=128.0),
        keras.optimizers.LossScaleOptimizer(MSAM(0.05, momentum=0.9, rho=0.2)),
    ):
        model = linear_model(optimizer=opt)
        model.fit(X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0,
                  callbacks=[MSAMCallback()])
        for got, want in zip(model.get_weights(), ref["w"]):
            np.testing.assert_allclose(got, want, atol=2e-6)


def test_loss_scale_optimizer_skips_non_finite_step_exactly():
    model = linear_model(optimizer=keras.optimizers.LossScaleOptimizer(MSAM(0.05, rho=0.2)))
    opt = model.optimizer
    grads = linear_mse_grads(W0, X, Y)
    # apply_gradients: optimizer.apply on TensorFlow; on JAX (where Keras'
    # LossScaleOptimizer.apply only works statefully) its stateless_apply, as fit uses.
    apply_gradients(opt, [g.astype("float32") for g in grads], model.trainable_variables)
    before = [v.numpy().copy() for v in model.trainable_variables + opt.inner_optimizer.variables]
    bad = [np.full((3, 2), np.inf, "float32"), np.zeros(2, "float32")]
    apply_gradients(opt, bad, model.trainable_variables)
    after = [v.numpy() for v in model.trainable_variables + opt.inner_optimizer.variables]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_ema_tracks_clean_weights():
    opt = MSAM(0.05, momentum=0.9, rho=0.5, use_ema=True, ema_momentum=0.5)
    model = linear_model(optimizer=opt)
    model.fit(X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    ref = msam_reference(W0, linear_mse_grads, batches(1), 0.05, 0.9, 0.5)
    ema = [np.asarray(p, np.float64) for p in ref["history"][0]]
    for clean in ref["history"][1:]:
        ema = [0.5 * e + 0.5 * c for e, c in zip(ema, clean)]
    for got, want in zip(model.get_weights(), ema):
        np.testing.assert_allclose(got, want, atol=2e-6)


@pytest.mark.tf_only
def test_mirrored_strategy_matches_single_device():
    from tests.helpers import mirrored_strategy

    strategy = mirrored_strategy()  # one per process (see tests/helpers.py)
    model = linear_model(optimizer=None, strategy=strategy)
    with strategy.scope():
        model.compile(optimizer=MSAM(0.05, momentum=0.9, rho=0.2), loss="mse")
    model.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[MSAMCallback()])
    ref = msam_reference(W0, linear_mse_grads, batches(2), 0.05, 0.9, 0.2)
    for got, want in zip(model.get_weights(), ref["w"]):
        np.testing.assert_allclose(got, want, atol=2e-6)
    opt = model.optimizer
    for var in model.trainable_variables + opt.momentums + [opt._perturbation_scale]:
        values = [t.numpy() for t in var.value.values]
        assert len(values) == 2
        np.testing.assert_array_equal(values[0], values[1])


# --------------------------------------------------------------------------- saving
def test_config_round_trip_float_and_schedule():
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([10], [0.0, 0.5])
    for rho in (0.7, schedule):
        opt = MSAM(0.02, momentum=0.8, rho=rho, weight_decay=1e-3, clipnorm=1.0)
        config = opt.get_config()
        clone = MSAM.from_config(config)
        assert clone.momentum == 0.8 and clone.weight_decay == 1e-3 and clone.clipnorm == 1.0
        assert clone.nesterov is False
        if isinstance(rho, float):
            assert clone.rho == 0.7
        else:
            assert float(clone.rho(3)) == 0.0 and float(clone.rho(12)) == 0.5
        restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
        assert isinstance(restored, MSAM)


def test_keras_file_round_trip_and_bit_exact_resume(tmp_path):
    def fresh():
        return linear_model(optimizer=MSAM(0.05, momentum=0.9, rho=0.3))

    full = fresh()
    full.fit(X, Y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[MSAMCallback()])

    part = fresh()
    part.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[MSAMCallback()])
    path = os.path.join(tmp_path, "m.keras")
    part.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.optimizer, MSAM)
    assert loaded.optimizer.rho == 0.3
    assert not loaded.optimizer.is_perturbed
    for a, b in zip(part.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(part.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    loaded.fit(X, Y, batch_size=8, epochs=3, initial_epoch=2, shuffle=False, verbose=0,
               callbacks=[MSAMCallback()])
    for a, b in zip(full.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    ref = msam_reference(W0, linear_mse_grads, batches(3), 0.05, 0.9, 0.3)
    for got, want in zip(loaded.get_weights(), ref["w"]):
        np.testing.assert_allclose(got, want, atol=3e-6)


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"rho": -0.1}, ValueError, "rho"),
        ({"rho": float("nan")}, ValueError, "rho"),
        ({"rho": float("inf")}, ValueError, "rho"),
        ({"rho": "big"}, TypeError, "rho"),
        ({"rho": True}, TypeError, "rho"),
        ({"momentum": 1.0}, ValueError, "momentum"),
        ({"momentum": -0.1}, ValueError, "momentum"),
        ({"momentum": float("nan")}, ValueError, "momentum"),
        ({"momentum": "0.9"}, TypeError, "momentum"),
        ({"nesterov": True}, ValueError, "nesterov"),
        ({"nesterov": "yes"}, TypeError, "nesterov"),
        ({"weight_decay": -1e-4}, ValueError, "weight_decay"),
        ({"weight_decay": float("nan")}, ValueError, "weight_decay"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        MSAM(**kwargs)


def test_defaults_match_design():
    opt = MSAM()
    assert float(opt.learning_rate.numpy()) == pytest.approx(0.1)
    assert (opt.momentum, opt.rho, opt.nesterov, opt.weight_decay) == (0.9, 0.3, False, None)
    assert MSAM(momentum=0).momentum == 0.0


def test_apply_perturbation_round_trip_idempotent():
    opt, w, clean, stored = quad_run(0.1, 3)
    assert opt.apply_perturbation() is False  # already perturbed
    assert opt.remove_perturbation() is True
    assert opt.remove_perturbation() is False
    np.testing.assert_allclose(w.numpy(), clean[-1], atol=1e-7)
    assert opt.apply_perturbation() is True
    np.testing.assert_allclose(w.numpy(), stored[-1], atol=1e-7)
    diff = w.numpy() - clean[-1]  # (Keras' JAX Variable.numpy() warns under numpy 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert global_norm([diff]) == pytest.approx(0.1, rel=1e-5)
