"""Keras habits that must work with the wrappers, or be refused with a way out."""

from __future__ import annotations

import importlib.util

import keras
import numpy as np
import pytest

import keras_sam
from tests.helpers import (
    JIT_COMPILE,
    Subclassed,
    assert_weights_close,
    bn_dropout_model,
    classification_data,
    logits_loss,
    max_abs_diff,
    plain_model,
)
from tests.methods import METHODS, WRAPPERS

#: A wrapper without and one with state of its own, and one that ranks samples.
QUICK_WRAPPERS = [m for m in WRAPPERS if m.name in {"SAM", "LookSAM-k=2", "KSAM-k=1.0"}]

X, Y = classification_data(n=32)


class CustomStep(Subclassed):
    """keras-io's VAE/GAN pattern: the model trains itself with its own step."""

    def train_step(self, *args):
        return super().train_step(*args)


@pytest.mark.parametrize("method", WRAPPERS, ids=str)
def test_a_model_with_its_own_train_step_is_refused_with_a_way_out(method):
    with pytest.raises(TypeError, match=r"overrides `train_step`.*Momentum-SAM"):
        method.construct(CustomStep())


# --------------------------------------------------------------------------- weights files
def _trained(method, model, epochs=1, **fit):
    trainer = method.trainer(model, 0.1)
    trainer.compile(optimizer=method.optimizer(0.1), loss=logits_loss(), jit_compile=JIT_COMPILE)
    keras.utils.set_random_seed(5)
    trainer.fit(X, Y, batch_size=8, epochs=epochs, shuffle=False, verbose=0,
                callbacks=method.callbacks() + fit.pop("callbacks", []), **fit)
    return trainer


@pytest.mark.parametrize("method", WRAPPERS, ids=str)
def test_the_wrappers_weights_load_into_a_fresh_model_and_back(method, tmp_path):
    trainer = _trained(method, bn_dropout_model())
    path = str(tmp_path / "trainer.weights.h5")
    trainer.save_weights(path)
    deployed = bn_dropout_model(seed=9)  # other initial weights
    deployed.load_weights(path)
    assert_weights_close(deployed.get_weights(), trainer.model.get_weights(), atol=0.0)
    # ...and a wrapper warm-starts from a model's own file.
    model_path = str(tmp_path / "model.weights.h5")
    deployed.save_weights(model_path)
    warm = method.trainer(bn_dropout_model(seed=11), 0.1)
    warm.compile(optimizer=method.optimizer(0.1), loss=logits_loss())
    warm.load_weights(model_path)
    assert_weights_close(warm.model.get_weights(), trainer.model.get_weights(), atol=0.0)
    # ...and a wrapper reads its own file back with the optimizer's and its own state.
    again = method.trainer(bn_dropout_model(seed=12), 0.1)
    again.compile(optimizer=method.optimizer(0.1), loss=logits_loss())
    again.load_weights(path)
    assert_weights_close(again.get_weights(), trainer.get_weights(), atol=0.0)
    assert_weights_close([v.numpy() for v in again.optimizer.variables],
                         [v.numpy() for v in trainer.optimizer.variables], atol=0.0)


def test_model_checkpoint_of_a_wrapper_writes_files_the_model_reads(tmp_path):
    path = str(tmp_path / "best.weights.h5")
    checkpoint = keras.callbacks.ModelCheckpoint(
        path, save_weights_only=True, save_best_only=True, monitor="loss"
    )
    epochs = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: epochs.append((logs["loss"], model.get_weights()))
    )
    model = bn_dropout_model()
    _trained(WRAPPERS[0], model, epochs=4, callbacks=[checkpoint, record])
    deployed = bn_dropout_model(seed=9)
    deployed.load_weights(path)
    best_weights = min(epochs, key=lambda e: e[0])[1]
    assert_weights_close(deployed.get_weights(), best_weights, atol=0.0)


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("interrupted")


@pytest.mark.parametrize("method", [m for m in WRAPPERS if m.name in {"SAM", "LookSAM-k=2"}]
                         + [m for m in METHODS if not m.is_wrapper][:1], ids=str)
def test_backup_and_restore_resumes_as_if_uninterrupted(method, tmp_path):
    uninterrupted = _trained(method, bn_dropout_model(dropout=0.0), epochs=2)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    resumed = method.trainer(bn_dropout_model(dropout=0.0), 0.1)
    resumed.compile(optimizer=method.optimizer(0.1), loss=logits_loss(), jit_compile=JIT_COMPILE)
    keras.utils.set_random_seed(5)
    with pytest.raises(RuntimeError, match="interrupted"):
        resumed.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                    callbacks=[*method.callbacks(), backup, _Interrupt()])
    keras.utils.set_random_seed(5)
    resumed.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                callbacks=[*method.callbacks(), backup])
    inner = getattr(resumed, "model", resumed)
    expected = getattr(uninterrupted, "model", uninterrupted)
    assert_weights_close(inner.get_weights(), expected.get_weights(), atol=1e-6)


def test_momentum_sam_weights_files_hold_the_clean_weights(tmp_path):
    model = bn_dropout_model(dropout=0.0)
    trainer = keras_sam.models.ModelWrapper(model)
    optimizer = keras_sam.optimizers.MSAM(0.1, rho=0.3)
    trainer.compile(optimizer=optimizer, loss=logits_loss())
    trainer.train_on_batch(X[:8], Y[:8])
    assert optimizer.is_perturbed
    path = str(tmp_path / "msam.weights.h5")
    trainer.save_weights(path)
    assert optimizer.is_perturbed  # training goes on at the perturbed point
    with optimizer.unperturbed():
        clean = model.get_weights()
    deployed = bn_dropout_model(seed=9, dropout=0.0)
    deployed.load_weights(path)
    assert_weights_close(deployed.get_weights(), clean, atol=1e-7)
    assert max_abs_diff(clean, model.get_weights()) > 1e-4  # the perturbation was real


# --------------------------------------------------------------------------- callbacks, data
@pytest.mark.parametrize("method", QUICK_WRAPPERS, ids=str)
def test_common_callbacks_validation_split_and_class_weight(method, tmp_path):
    csv = tmp_path / "log.csv"
    rates = []
    callbacks = [
        keras.callbacks.EarlyStopping("val_loss", patience=1, restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau("val_loss", factor=0.5, patience=1),
        keras.callbacks.CSVLogger(str(csv)),
        keras.callbacks.LearningRateScheduler(lambda epoch, lr: rates.append(lr) or lr * 0.9),
    ]
    trainer = _trained(method, bn_dropout_model(), epochs=4, callbacks=callbacks,
                       validation_split=0.25, class_weight={0: 1.0, 1: 2.0, 2: 0.5})
    history = trainer.history.history
    assert {"loss", "val_loss"} <= set(history) and np.all(np.isfinite(history["loss"]))
    assert len(csv.read_text().splitlines()) == len(history["loss"]) + 1
    assert rates[1] == pytest.approx(rates[0] * 0.9, rel=1e-5)
    best = int(np.argmin(history["val_loss"]))
    trainer.compile(optimizer="sgd", loss=logits_loss())
    val = trainer.evaluate(X[24:], Y[24:], verbose=0)
    assert val == pytest.approx(history["val_loss"][best], rel=1e-4)  # best weights restored


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="tensorboard is not installed")
def test_tensorboard_logs_a_wrappers_training(tmp_path):
    board = keras.callbacks.TensorBoard(str(tmp_path / "tensorboard"))
    _trained(WRAPPERS[0], bn_dropout_model(), epochs=2, callbacks=[board])
    assert any((tmp_path / "tensorboard").rglob("*events*"))


@pytest.mark.tf_only
@pytest.mark.parametrize("method", QUICK_WRAPPERS, ids=str)
def test_tf_data_with_several_steps_per_execution(method):
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((X, Y)).batch(8)
    results = []
    for steps in (1, 2):
        trainer = method.trainer(plain_model(), 0.1)
        trainer.compile(optimizer=method.optimizer(0.1), loss=logits_loss(),
                        steps_per_execution=steps, jit_compile=True)
        keras.utils.set_random_seed(5)
        trainer.fit(dataset, epochs=2, verbose=0)
        results.append(trainer.model.get_weights())
    assert_weights_close(results[1], results[0], atol=1e-5)


# --------------------------------------------------------------------------- evaluation
@pytest.mark.parametrize("method", QUICK_WRAPPERS + [m for m in METHODS if not m.is_wrapper][:1],
                         ids=str)
def test_the_model_evaluates_as_the_wrapper_after_training(method, tmp_path):
    model = bn_dropout_model()
    trainer = method.trainer(model, 0.1)
    if trainer is model:  # Momentum-SAM: the model itself is compiled
        trainer = keras_sam.models.ModelWrapper(model)
    trainer.compile(optimizer=method.optimizer(0.1), loss=logits_loss(),
                    metrics=[keras.metrics.SparseCategoricalAccuracy()])
    trainer.fit(X, Y, batch_size=8, epochs=1, verbose=0, callbacks=method.callbacks())
    expected = trainer.evaluate(X, Y, verbose=0)
    assert model.evaluate(X, Y, verbose=0) == pytest.approx(expected, rel=1e-6)
    assert model.optimizer is None  # nothing of the training state is duplicated
    path = str(tmp_path / "trainer.keras")
    trainer.save(path)
    restored = keras.models.load_model(path)
    assert restored.model.evaluate(X, Y, verbose=0) == pytest.approx(expected, rel=1e-6)
    # The model's own file is a plain Keras model (uncompiled: it had no optimizer).
    model_path = str(tmp_path / "model.keras")
    model.save(model_path)
    plain = keras.models.load_model(model_path)
    assert type(plain).__module__.startswith("keras")
    np.testing.assert_allclose(
        plain.predict(X, verbose=0), model.predict(X, verbose=0), rtol=1e-5, atol=1e-6
    )


def test_a_model_compiled_by_the_user_keeps_its_own_compile():
    model = bn_dropout_model()
    model.compile(loss="mse")  # e.g. for another purpose
    trainer = keras_sam.SAM(model)
    trainer.compile(optimizer="sgd", loss=logits_loss())
    assert model.loss == "mse"


# --------------------------------------------------------------------------- GAN pattern
class _TwoOptimizers(keras.Model):
    """keras-io's GAN pattern: a custom `train_step` updates two sub-models, each with
    an optimizer held as an attribute (Momentum-SAM here)."""

    def __init__(self):
        super().__init__()
        self.first = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
        self.second = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
        self.first_optimizer = keras_sam.optimizers.MSAM(0.1, rho=0.3)
        self.second_optimizer = keras_sam.optimizers.AdamWMSAM(0.01, rho=0.3)

    def call(self, x):
        return self.first(x) + self.second(x)

    def train_step(self, data):
        import tensorflow as tf

        x, y = data
        for part, optimizer in ((self.first, self.first_optimizer),
                                (self.second, self.second_optimizer)):
            with tf.GradientTape() as tape:
                loss = keras.ops.mean(logits_loss()(y, part(x, training=True)))
            grads = tape.gradient(loss, part.trainable_variables)
            optimizer.apply(grads, part.trainable_variables)
        return {"loss": loss}


@pytest.mark.tf_only
def test_msam_callback_cleans_the_optimizers_a_custom_train_step_holds():
    model = _TwoOptimizers()
    model.compile()
    model.fit(X, Y, batch_size=8, epochs=2, verbose=0,
              callbacks=[keras_sam.callbacks.MSAMCallback()])
    assert not model.first_optimizer.is_perturbed
    assert not model.second_optimizer.is_perturbed
    assert int(model.first_optimizer.iterations) == 8


@pytest.mark.tf_only
def test_without_the_callback_a_custom_train_step_is_warned():
    model = _TwoOptimizers()
    model.compile()
    with pytest.warns(UserWarning, match="MSAMCallback"):
        model.fit(X, Y, batch_size=8, epochs=1, verbose=0)
