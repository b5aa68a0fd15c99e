"""keras.distribution.DataParallel on two host devices (JAX only).

Runs in the JAX subprocess of tests/test_jax_backend.py, where conftest.py sets
``XLA_FLAGS=--xla_force_host_platform_device_count=2``.

``perturbation_scope="global"`` is the SPMD step (one device on the global batch);
``"replica"`` runs one step per device (`keras_sam.backend.jax.replicas`) and is
checked against a numpy reference of per-device SAM and K-SAM, the base optimizer
at ρ = 0, hand-computed BatchNorm statistics and logs, and a shard with a NaN.
"""

from __future__ import annotations

import functools
import math
import warnings

import keras
import numpy as np
import pytest

import keras_sam
from tests import numpy_reference as ref
from tests.helpers import (
    assert_weights_close,
    bn_dropout_model,
    classification_data,
    keras_mlp,
    logits_loss,
    max_abs_diff,
    plain_model,
)
from tests.methods import METHODS, WRAPPERS

if keras.backend.backend() != "jax":
    pytest.skip(
        "JAX-only (keras.distribution.DataParallel); tests/test_jax_backend.py runs it "
        "with KERAS_BACKEND=jax",
        allow_module_level=True,
    )

import jax

X, Y = classification_data(n=40)


@pytest.fixture
def data_parallel():
    devices = jax.devices("cpu")
    if len(devices) < 2:
        pytest.skip("needs 2 host devices (XLA_FLAGS=--xla_force_host_platform_device_count=2)")
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices[:2]))
    try:
        yield
    finally:
        keras.distribution.set_distribution(None)


def _fit(method, make_model, scope=None, rho=0.25):
    trainer = method.trainer(make_model(), rho)
    if scope is not None:
        trainer.perturbation_scope = scope
    trainer.compile(optimizer=method.optimizer(rho), loss=logits_loss())
    keras.utils.set_random_seed(5)
    history = trainer.fit(X, Y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                          callbacks=method.callbacks())
    inner = getattr(trainer, "model", None) or trainer
    return inner.get_weights(), history.history["loss"]


@pytest.mark.parametrize("method", WRAPPERS, ids=str)
def test_global_scope_on_two_devices_equals_one_device(method, data_parallel):
    """The batch (16, and a last batch of 8) is split over 2 devices; SPMD gives the
    global gradient, so the result is what one device computes on the whole batch."""
    distributed, losses = _fit(method, plain_model, scope="global")
    keras.distribution.set_distribution(None)
    single, single_losses = _fit(method, plain_model, scope="global")
    assert_weights_close(distributed, single, atol=1e-5)
    np.testing.assert_allclose(losses, single_losses, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_data_parallel_trains_with_finite_loss(method, data_parallel):
    """Default scope ("replica"): one step per device, BatchNorm and dropout included;
    no warning, and every variable ends identical on both devices."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, weights, losses = _fit_trainer(method, bn_dropout_model)
    assert not [w for w in caught if "perturbation_scope" in str(w.message)]
    assert all(math.isfinite(v) for v in losses)
    assert all(np.all(np.isfinite(w)) for w in weights)
    _assert_replicated(trainer)
    if isinstance(trainer, keras_sam.LayerwiseSAM):
        selected = trainer.selected_layers
        expected = 1 if isinstance(trainer.num_layers, int) else len(trainer.candidate_layers)
        assert len(selected) == expected
        assert set(selected) <= set(trainer.candidate_layers)
        for v in trainer.non_trainable_variables:
            if "selection" in v.path:  # a 0/1 mask over the candidate layers
                mask = np.asarray(v.value)
                assert set(np.unique(mask)) <= {0.0, 1.0}
                assert mask.sum() == len(selected)


def test_replica_scope_warns_only_where_not_implemented(data_parallel):
    """DataParallel: no warning. ModelParallel splitting the batch over 2 devices keeps
    the global semantics and says so."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _fit(WRAPPERS[0], plain_model, scope="replica")
    mesh = keras.distribution.DeviceMesh((2, 1), ["batch", "model"], jax.devices("cpu")[:2])
    keras.distribution.set_distribution(keras.distribution.ModelParallel(
        layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name="batch"))
    with pytest.warns(UserWarning, match="perturbation_scope='replica'.*DataParallel only"):
        _fit(WRAPPERS[0], plain_model, scope="replica")


def test_replica_scope_on_one_device_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _fit(WRAPPERS[0], plain_model, scope="replica")


def _fit_trainer(method, make_model, rho=0.25):
    trainer = method.trainer(make_model(), rho)
    trainer.compile(optimizer=method.optimizer(rho), loss=logits_loss())
    keras.utils.set_random_seed(5)
    history = trainer.fit(X, Y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                          callbacks=method.callbacks())
    inner = getattr(trainer, "model", None) or trainer
    return trainer, inner.get_weights(), history.history["loss"]


def _assert_replicated(trainer):
    """Every variable (optimizer's included) holds the same value on both devices."""
    for v in list(trainer.variables) + list(trainer.optimizer.variables):
        shards = [np.asarray(s.data) for s in v.value.addressable_shards]
        assert len(shards) == 2, v.path
        np.testing.assert_array_equal(shards[1], shards[0], err_msg=v.path)


# ---------------------------------------------------------------- perturbation_scope="replica"
RNG = np.random.default_rng(7)
X_MLP = RNG.normal(size=(32, 3)).astype("float32")
Y_MLP = RNG.normal(size=(32, 2)).astype("float32")
LR = 0.1


def _per_device_reference(params, rho, devices, k=None, batch_size=16, epochs=2):
    """Per-device SAM (K-SAM with ``k``) with SGD, by hand: each device's shard gives its
    own ascent gradient, ε = ρ g_d/‖g_d‖ and gradient at w + ε_d (K-SAM: on the top-k
    samples of its shard); the step uses their mean. Returns (weights, epoch losses)."""
    params = [p.astype("float64") for p in params]
    x, y = X_MLP.astype("float64"), Y_MLP.astype("float64")
    epoch_losses = []
    for _ in range(epochs):
        batch_losses, sizes = [], []
        for start in range(0, len(x), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            loss, _, _ = ref.loss_and_grads(params, xb, yb)  # clean loss, global batch
            batch_losses.append(loss)
            sizes.append(len(xb))
            n = len(xb) // devices
            mean_grads = [np.zeros_like(p) for p in params]
            for d in range(devices):
                xd, yd = xb[d * n:(d + 1) * n], yb[d * n:(d + 1) * n]
                if k is not None:
                    _, _, per_sample = ref.loss_and_grads(params, xd, yd)
                    count = max(1, int(np.round(np.float32(n) * np.float32(k))))
                    chosen = np.sort(np.argsort(-per_sample)[:count])
                    xd, yd = xd[chosen], yd[chosen]
                _, grads, _ = ref.loss_and_grads(params, xd, yd)
                eps = ref.sam_epsilon(grads, rho)
                _, sam_grads, _ = ref.loss_and_grads(
                    [p + e for p, e in zip(params, eps)], xd, yd
                )
                mean_grads = [m + g / devices for m, g in zip(mean_grads, sam_grads)]
            params = [p - LR * g for p, g in zip(params, mean_grads)]
        epoch_losses.append(np.average(batch_losses, weights=sizes))
    return params, epoch_losses


@pytest.mark.parametrize("k", [None, 0.5], ids=["SAM", "KSAM-k=0.5"])
def test_replica_scope_equals_per_device_numpy_reference(k, data_parallel):
    """Each device perturbs with its own shard's gradient (K-SAM: ranks its own shard);
    the optimizer steps with the devices' mean; the logged loss is the global batch's."""
    params = ref.init_params(seed=2)
    model = keras_mlp(params)
    rho = 0.3
    trainer = (keras_sam.SAM(model, rho=rho) if k is None
               else keras_sam.KSAM(model, rho=rho, k=k))
    trainer.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        history = trainer.fit(X_MLP, Y_MLP, batch_size=16, epochs=2, shuffle=False, verbose=0)
    expected, expected_losses = _per_device_reference(params, rho, devices=2, k=k)
    got = trainer.model.get_weights()
    assert_weights_close(got, expected, atol=1e-5)
    np.testing.assert_allclose(history.history["loss"], expected_losses, rtol=1e-5)
    # One device on the global batch (= perturbation_scope="global") is measurably different.
    one_device, _ = _per_device_reference(params, rho, devices=1, k=k)
    assert max_abs_diff(got, one_device) > 1e-3
    _assert_replicated(trainer)


@functools.cache
def _base_optimizer_run():
    """Plain Keras `fit` with the base optimizer under the same DataParallel."""
    model = plain_model()
    model.compile(optimizer=WRAPPERS[0].base_optimizer(), loss=logits_loss())
    history = model.fit(X, Y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    return model.get_weights(), history.history["loss"]


@pytest.mark.parametrize("method", WRAPPERS, ids=str)
def test_rho_zero_replica_scope_equals_base_optimizer(method, data_parallel):
    """Gradients scaled and summed like Keras under tf.distribute: with ρ = 0 each
    wrapper's per-device step is the base optimizer's step on the global batch
    (the last batch of 8 included), and so are the logged losses."""
    base, base_losses = _base_optimizer_run()
    trainer = method.trainer(plain_model(), 0.0)
    assert trainer.perturbation_scope == "replica"
    trainer.compile(optimizer=method.optimizer(0.0), loss=logits_loss())
    history = trainer.fit(X, Y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert_weights_close(trainer.model.get_weights(), base, atol=1e-5)
    np.testing.assert_allclose(history.history["loss"], base_losses, rtol=1e-5)


def _bn_model(params):
    inputs = keras.Input((3,))
    h = keras.layers.Dense(4, name="dense_in")(inputs)
    h = keras.layers.BatchNormalization(momentum=0.5, name="bn")(h)
    outputs = keras.layers.Dense(3, name="dense_out")(h)
    model = keras.Model(inputs, outputs)
    model.set_weights(params)
    return model


def _bn_params_and_data():
    rng = np.random.default_rng(11)
    params = [rng.normal(size=(3, 4)), rng.normal(size=(4,)) * 0.1, np.ones(4), np.zeros(4),
              np.zeros(4), np.ones(4), rng.normal(size=(4, 3)), rng.normal(size=(3,)) * 0.1]
    x = rng.normal(size=(16, 3))
    x[8:] = 2.0 * x[8:] + 1.5  # the two devices' shards differ in mean and spread
    y = rng.integers(0, 3, size=(16,))
    return [p.astype("float32") for p in params], x.astype("float32"), y.astype("int32")


def test_batchnorm_replica_scope_averages_device_statistics(data_parallel):
    """One step on a batch of 16 (8 per device): each device normalizes with its own
    shard's statistics; the moving statistics are the mean of the devices' updates; the
    logged loss and accuracy are those of all 16 samples (each at its device's BN)."""
    params, x, y = _bn_params_and_data()
    trainer = keras_sam.SAM(_bn_model(params), rho=0.1)
    trainer.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=logits_loss(),
                    metrics=["accuracy"])
    batch_logs = []
    logger = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: batch_logs.append(dict(logs)))
    history = trainer.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0,
                          callbacks=[logger])

    w1, b1, _, _, _, _, w2, b2 = [p.astype("float64") for p in params]
    means, variances, losses, correct = [], [], [], []
    for shard in (slice(0, 8), slice(8, 16)):
        h = x[shard].astype("float64") @ w1 + b1
        mean, var = h.mean(0), h.var(0)
        means.append(mean)
        variances.append(var)
        logits = (h - mean) / np.sqrt(var + 1e-3) @ w2 + b2  # gamma = 1, beta = 0
        log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        losses.extend(-log_probs[np.arange(8), y[shard]])
        correct.extend(np.argmax(logits, 1) == y[shard])
    bn = trainer.model.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.5 * np.mean(means, 0), atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), 0.5 + 0.5 * np.mean(variances, 0),
                               atol=1e-5)
    # Not the global batch's statistics (what perturbation_scope="global" computes).
    h = x.astype("float64") @ w1 + b1
    assert np.max(np.abs(bn.moving_variance.numpy() - (0.5 + 0.5 * h.var(0)))) > 0.05
    for logs in (batch_logs[-1], {k: v[-1] for k, v in history.history.items()}):
        np.testing.assert_allclose(logs["loss"], np.mean(losses), rtol=1e-5)
        np.testing.assert_allclose(logs["accuracy"], np.mean(correct), rtol=1e-6)
    _assert_replicated(trainer)


def test_non_finite_shard_skips_the_step_on_every_device(data_parallel):
    """A NaN in device 1's shard only: both devices skip the step; weights, BatchNorm
    statistics and optimizer state stay exactly as they were."""
    params, x, y = _bn_params_and_data()
    x[12, 0] = np.nan
    trainer = keras_sam.SAM(_bn_model(params), rho=0.1)
    trainer.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=logits_loss())
    trainer.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert_weights_close(trainer.model.get_weights(), params, atol=0.0)
    assert int(trainer.optimizer.iterations.numpy()) == 0
    momentums = [v for v in trainer.optimizer.variables if "momentum" in v.path]
    assert len(momentums) == len(params) - 2  # every trainable variable has one
    for v in momentums:
        assert np.all(np.asarray(v.value) == 0), v.path
    _assert_replicated(trainer)


def test_devices_draw_their_own_dropout_masks(data_parallel):
    """Both shards hold the same 8 samples. Were the masks the same on both devices,
    the step would equal one device's step on those 8 samples; they differ, and the
    dropout seed advances exactly as on one device."""

    def fit(x, y):
        inputs = keras.Input((3,))
        h = keras.layers.Dropout(0.5, seed=3, name="dropout")(inputs)
        model = keras.Model(inputs, keras.layers.Dense(2)(h))
        model.set_weights([p.astype("float32") for p in ref.init_params(n_hidden=2)[:2]])
        trainer = keras_sam.SAM(model, rho=0.2)
        trainer.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
        trainer.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
        seed = model.get_layer("dropout").seed_generator.state
        return trainer, model.get_weights(), np.asarray(seed.value)

    x, y = X_MLP[:8], Y_MLP[:8]
    trainer, two_devices, two_seed = fit(np.concatenate([x, x]), np.concatenate([y, y]))
    _assert_replicated(trainer)
    keras.distribution.set_distribution(None)
    _, one_device, one_seed = fit(x, y)
    assert max_abs_diff(two_devices, one_device) > 1e-4
    np.testing.assert_array_equal(two_seed, one_seed)
