"""Tests of keras_sam.callbacks: clean weights for validation, checkpoints, backups; BN."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest

from keras_sam.callbacks import (
    BatchNormRecalibration,
    MSAMCallback,
    find_momentum_sam_optimizer,
    recalibrate_batchnorm,
)
from keras_sam.optimizers import MSAM, AdamWMSAM
from tests.optimizers.msam_reference import linear_mse, linear_mse_grads, msam_reference

pytestmark = pytest.mark.filterwarnings("ignore:MSAM. the model variables")

X = np.random.RandomState(3).randn(32, 3).astype("float32")
Y = (X @ np.array([[1.0, -2.0], [0.5, 1.0], [-1.0, 0.3]]) + 0.1).astype("float32")
XV = np.random.RandomState(4).randn(16, 3).astype("float32")
YV = (XV @ np.array([[1.0, -2.0], [0.5, 1.0], [-1.0, 0.3]])).astype("float32")
W0 = [
    np.array([[0.2, -0.1], [0.4, 0.3], [-0.5, 0.1]], "float32"),
    np.array([0.05, -0.05], "float32"),
]
LR, MU, RHO = 0.05, 0.9, 0.5


def linear_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.set_weights(W0)
    model.compile(optimizer=MSAM(LR, momentum=MU, rho=RHO), loss="mse")
    return model


def reference_after_epochs(epochs, batch_size=8):
    per_epoch = len(X) // batch_size
    batches = [
        (X[i : i + batch_size].astype(np.float64), Y[i : i + batch_size])
        for _ in range(epochs)
        for i in range(0, len(X), batch_size)
    ]
    ref = msam_reference(W0, linear_mse_grads, batches, LR, MU, RHO)
    return [ref["history"][(e + 1) * per_epoch - 1] for e in range(epochs)]


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.at_test_begin = []
        self.at_epoch_end = []

    def on_test_begin(self, logs=None):
        self.at_test_begin.append(self.model.get_weights())

    def on_epoch_end(self, epoch, logs=None):
        self.at_epoch_end.append(self.model.get_weights())


def test_validation_and_model_checkpoint_see_clean_weights(tmp_path):
    model = linear_model()
    recorder = Recorder()
    pattern = os.path.join(tmp_path, "ep{epoch}.weights.h5")
    history = model.fit(
        X, Y, batch_size=8, epochs=3, shuffle=False, verbose=0, validation_data=(XV, YV),
        callbacks=[
            MSAMCallback(),
            recorder,
            keras.callbacks.ModelCheckpoint(pattern, save_weights_only=True),
            keras.callbacks.ModelCheckpoint(os.path.join(tmp_path, "last.keras")),
        ],
    )
    clean = reference_after_epochs(3)
    for epoch in range(3):
        assert history.history["val_loss"][epoch] == pytest.approx(
            linear_mse(clean[epoch], XV, YV), rel=1e-5
        )
        for got, want in zip(recorder.at_test_begin[epoch], clean[epoch]):
            np.testing.assert_allclose(got, want, atol=2e-6)
        for got, want in zip(recorder.at_epoch_end[epoch], clean[epoch]):
            np.testing.assert_allclose(got, want, atol=2e-6)
        probe = linear_model()
        probe.optimizer.build(probe.trainable_variables)
        probe.load_weights(os.path.join(tmp_path, f"ep{epoch + 1}.weights.h5"))
        for got, want in zip(probe.get_weights(), clean[epoch]):
            np.testing.assert_allclose(got, want, atol=2e-6)
    loaded = keras.saving.load_model(os.path.join(tmp_path, "last.keras"))
    for got, want in zip(loaded.get_weights(), clean[-1]):
        np.testing.assert_allclose(got, want, atol=2e-6)
    assert not loaded.optimizer.is_perturbed
    for got, want in zip(model.get_weights(), clean[-1]):
        np.testing.assert_allclose(got, want, atol=2e-6)


def test_predict_and_evaluate_swap_back_afterwards():
    model = linear_model()
    opt = model.optimizer
    for _ in range(3):
        grads = linear_mse_grads([v.numpy() for v in model.trainable_variables], X, Y)
        opt.apply([g.astype("float32") for g in grads], model.trainable_variables)
    assert opt.is_perturbed
    perturbed = model.get_weights()
    with opt.unperturbed():
        clean = model.get_weights()
    callback = MSAMCallback()
    out = model.predict(XV, verbose=0, callbacks=[callback])
    np.testing.assert_allclose(out, XV @ clean[0] + clean[1], atol=1e-5)
    assert opt.is_perturbed
    for got, want in zip(model.get_weights(), perturbed):
        np.testing.assert_allclose(got, want, atol=1e-6)
    loss = model.evaluate(XV, YV, verbose=0, callbacks=[callback])
    assert loss == pytest.approx(linear_mse(clean, XV, YV), rel=1e-5)
    assert opt.is_perturbed


class StopAt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("simulated interruption")


def test_backup_and_restore_resumes_bit_exactly(tmp_path):
    backup = os.path.join(tmp_path, "backup")
    full = linear_model()
    full.fit(X, Y, batch_size=8, epochs=4, shuffle=False, verbose=0, callbacks=[MSAMCallback()])

    first = linear_model()
    with pytest.raises(RuntimeError, match="simulated"):
        first.fit(X, Y, batch_size=8, epochs=4, shuffle=False, verbose=0, callbacks=[
            MSAMCallback(), keras.callbacks.BackupAndRestore(backup), StopAt(2),
        ])
    saved = linear_model()
    saved.optimizer.build(saved.trainable_variables)
    saved.load_weights(os.path.join(backup, "latest.weights.h5"))
    for got, want in zip(saved.get_weights(), reference_after_epochs(2)[-1]):
        np.testing.assert_allclose(got, want, atol=2e-6)  # the backup holds clean weights
    assert not saved.optimizer.is_perturbed

    resumed = linear_model()
    resumed.fit(X, Y, batch_size=8, epochs=4, shuffle=False, verbose=0, callbacks=[
        MSAMCallback(), keras.callbacks.BackupAndRestore(backup),
    ])
    assert int(resumed.optimizer.iterations.numpy()) == 16
    for a, b in zip(full.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_callback_rejects_other_optimizers_and_unwraps_loss_scaling():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="Momentum-SAM"):
        model.fit(X, Y, epochs=1, verbose=0, callbacks=[MSAMCallback()])
    inner = AdamWMSAM()
    assert find_momentum_sam_optimizer(keras.optimizers.LossScaleOptimizer(inner)) is inner
    assert MSAMCallback.from_config(MSAMCallback(False).get_config()).swap_on_epoch is False


def bn_model():
    inputs = keras.Input((3,))
    hidden = keras.layers.Dense(4, name="hidden")(inputs)
    hidden = keras.layers.BatchNormalization(name="bn", momentum=0.9)(hidden)
    outputs = keras.layers.Dense(1)(keras.layers.Dropout(0.5)(hidden))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=MSAM(0.05, rho=0.5), loss="mse")
    return model


def expected_stats(kernel, bias, x, batch_size):
    means, variances = [], []
    for i in range(0, len(x), batch_size):
        h = x[i : i + batch_size].astype(np.float64) @ kernel + bias
        means.append(h.mean(axis=0))
        variances.append(h.var(axis=0))
    return np.mean(means, axis=0), np.mean(variances, axis=0)


def test_recalibrate_batchnorm_uses_clean_weights_and_restores_perturbation():
    model = bn_model()
    target = Y[:, :1]
    model.fit(X, target, batch_size=8, epochs=1, verbose=0, callbacks=[MSAMCallback()])
    opt = model.optimizer
    opt.apply_perturbation()
    perturbed = [v.numpy().copy() for v in model.trainable_variables]
    with opt.unperturbed():
        kernel, bias = (v.numpy() for v in model.get_layer("hidden").weights)
    used = recalibrate_batchnorm(model, (X, target), batch_size=8, steps=3)
    assert used == 3
    mean, var = expected_stats(kernel, bias, X[:24], 8)
    bn = model.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), var, atol=1e-5)
    assert bn.momentum == 0.9
    assert opt.is_perturbed
    for got, want in zip(model.trainable_variables, perturbed):
        np.testing.assert_allclose(got.numpy(), want, atol=1e-6)


def test_batchnorm_recalibration_callback_at_train_end():
    import tensorflow as tf

    model = bn_model()
    target = Y[:, :1]
    dataset = tf.data.Dataset.from_tensor_slices((X, target)).batch(16)
    callback = BatchNormRecalibration(dataset)
    model.fit(dataset, epochs=2, verbose=0, callbacks=[MSAMCallback(), callback])
    assert callback.batches_used == 2
    assert not model.optimizer.is_perturbed
    kernel, bias = (v.numpy() for v in model.get_layer("hidden").weights)
    mean, var = expected_stats(kernel, bias, X, 16)
    bn = model.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), var, atol=1e-5)
