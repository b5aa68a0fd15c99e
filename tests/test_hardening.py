"""Conditions real training meets, for every method of tests/methods.py:
mixed precision, gradient accumulation, clipping, exact resume, non-finite data."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tests.helpers import (
    assert_weights_close,
    bn_dropout_model,
    classification_data,
    logits_loss,
    plain_model,
)
from tests.methods import METHODS

X, Y = classification_data(n=48)
all_methods = pytest.mark.parametrize("method", METHODS, ids=str)


def _inner(trainer):
    return getattr(trainer, "model", None) or trainer


def _trainer(method, model, rho, optimizer=None, **optimizer_kwargs):
    trainer = method.trainer(model, rho)
    trainer.compile(
        optimizer=optimizer or method.optimizer(rho, **optimizer_kwargs), loss=logits_loss()
    )
    return trainer


def _all_variables(trainer):
    return [v.numpy() for v in _inner(trainer).variables]


def _guarded_variables(method, trainer):
    """What a method protects from a bad step: everything for a wrapper (it owns the
    step); the trainable weights and its own state for an optimizer (the forward pass,
    and so BatchNorm statistics, belong to Keras' train_step)."""
    model = _inner(trainer)
    variables = model.variables if method.is_wrapper else model.trainable_variables
    return [v.numpy() for v in variables]


# --------------------------------------------------------------------------- mixed precision
@all_methods
def test_mixed_precision_trains_like_float32(method):
    losses = {}
    for policy in ("float32", "mixed_float16"):
        keras.config.set_dtype_policy(policy)
        trainer = _trainer(method, plain_model(), 0.1)
        if policy == "mixed_float16":
            assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
        history = trainer.fit(X, Y, batch_size=16, epochs=4, shuffle=False, verbose=0)
        losses[policy] = history.history["loss"]
    assert all(np.isfinite(losses["mixed_float16"]))
    assert losses["mixed_float16"][-1] < losses["mixed_float16"][0]
    np.testing.assert_allclose(losses["mixed_float16"], losses["float32"], atol=0.02)


@all_methods
def test_overflowing_step_is_skipped_and_changes_nothing(method):
    keras.config.set_dtype_policy("mixed_float16")
    model = bn_dropout_model()
    inner = method.optimizer(0.1)
    trainer = _trainer(
        method, model, 0.1,
        optimizer=keras.optimizers.LossScaleOptimizer(inner, initial_scale=2.0**100),
    )
    trainer.optimizer.build(model.trainable_variables)
    # A wrapper also keeps BatchNorm statistics and RNG state; with an optimizer-only
    # method, Keras' own train_step has updated them in the forward pass.
    watched = model.variables if method.is_wrapper else model.trainable_variables
    watched = watched + trainer.optimizer.inner_optimizer.variables[1:]  # not iterations
    before = [v.numpy() for v in watched]
    trainer.fit(X[:16], Y[:16], batch_size=16, epochs=1, verbose=0)
    assert trainer.optimizer.dynamic_scale.numpy() == 2.0**99  # the step overflowed
    assert_weights_close([v.numpy() for v in watched], before, atol=0.0)
    trainer.optimizer.dynamic_scale.assign(2.0**10)
    trainer.fit(X[:16], Y[:16], batch_size=16, epochs=1, verbose=0)  # recovers
    assert all(np.all(np.isfinite(w)) for w in _all_variables(trainer))


# --------------------------------------------------------------------------- accumulation, clipping
@all_methods
@pytest.mark.parametrize(
    "optimizer_kwargs",
    [{"gradient_accumulation_steps": 2}, {"clipnorm": 0.05}, {"global_clipnorm": 0.05},
     {"clipvalue": 0.002}],
    ids=lambda kwargs: next(iter(kwargs)),
)
def test_rho_zero_equals_base_with_optimizer_option(method, optimizer_kwargs):
    base = plain_model()
    base.compile(optimizer=method.base_optimizer(**optimizer_kwargs), loss=logits_loss())
    base.fit(X, Y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    trainer = _trainer(method, plain_model(), 0.0, **optimizer_kwargs)
    trainer.fit(X, Y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert_weights_close(_inner(trainer).get_weights(), base.get_weights(), atol=method.base_atol)


# --------------------------------------------------------------------------- exact resume
class _Interrupt(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if self._epoch == 1 and batch == 1:
            raise RuntimeError("simulated preemption")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch


@all_methods
def test_backup_and_restore_resumes_bit_identically(method, tmp_path):
    def run(callbacks):
        keras.utils.set_random_seed(3)
        trainer = _trainer(method, bn_dropout_model(dropout=0.0), 0.1)
        keras.utils.set_random_seed(4)
        try:
            trainer.fit(X, Y, batch_size=16, epochs=3, shuffle=False, verbose=0,
                        callbacks=[*method.callbacks(), *callbacks])
        except RuntimeError:
            return None
        return _all_variables(trainer)

    uninterrupted = run([])
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    assert run([backup, _Interrupt()]) is None
    resumed = run([keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))])
    assert_weights_close(resumed, uninterrupted, atol=0.0)


# --------------------------------------------------------------------------- bad data
@all_methods
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_batch_writes_no_nan(method, bad):
    trainer = _trainer(method, bn_dropout_model(), 0.1)
    trainer.fit(X, Y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    before = _guarded_variables(method, trainer)
    x = X.copy()
    x[20, 1] = bad  # one sample of the second batch
    trainer.fit(x, Y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    after = _guarded_variables(method, trainer)
    assert all(np.all(np.isfinite(w)) for w in after)
    assert any(np.any(a != b) for a, b in zip(after, before))  # other batches did train


@all_methods
def test_terminate_on_nan_keeps_the_last_finite_weights(method):
    trainer = _trainer(method, plain_model(), 0.1)
    x = X.copy()
    x[20:, :] = np.nan  # batches 2 and 3 are entirely NaN
    history = trainer.fit(x, Y, batch_size=16, epochs=3, shuffle=False, verbose=0,
                          callbacks=[*method.callbacks(), keras.callbacks.TerminateOnNaN()])
    assert len(history.history["loss"]) == 1
    reference = _trainer(method, plain_model(), 0.1)
    reference.fit(X[:16], Y[:16], batch_size=16, epochs=1, verbose=0,
                  callbacks=method.callbacks())
    assert_weights_close(_inner(trainer).get_weights(), _inner(reference).get_weights(),
                         atol=1e-6)


@all_methods
def test_zero_sample_weights_give_no_nan(method):
    trainer = _trainer(method, plain_model(), 0.1)
    before = _inner(trainer).get_weights()
    trainer.fit(X, Y, sample_weight=np.zeros(len(X), "float32"), batch_size=16, epochs=1,
                verbose=0)
    after = _inner(trainer).get_weights()
    assert all(np.all(np.isfinite(w)) for w in after)
    if method.is_wrapper:
        assert_weights_close(after, before, atol=0.0)  # zero gradient: SGD leaves w


@all_methods
def test_dict_inputs(method):
    keras.utils.set_random_seed(1)
    inputs = {"a": keras.Input((5,), name="a"), "b": keras.Input((3,), name="b")}
    h = keras.layers.Concatenate()([inputs["a"], inputs["b"]])
    model = keras.Model(inputs, keras.layers.Dense(3)(h))
    trainer = _trainer(method, model, 0.1)
    history = trainer.fit({"a": X[:, :5], "b": X[:, 5:]}, Y, batch_size=16, epochs=2,
                          verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
