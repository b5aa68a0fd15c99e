"""The contract every method keeps, run over the registry in tests/methods.py."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from tests.helpers import (
    JIT_COMPILE,
    assert_weights_close,
    bn_dropout_model,
    classification_data,
    lazy_models,
    logits_loss,
    max_abs_diff,
    mirrored_strategy,
    plain_model,
)
from tests.methods import METHODS, WRAPPERS

X, Y = classification_data(n=40)
all_methods = pytest.mark.parametrize("method", METHODS, ids=str)
wrappers = pytest.mark.parametrize("method", WRAPPERS, ids=str)


def _compiled(method, model, rho, jit_compile=False, **compile_kwargs):
    trainer = method.trainer(model, rho)
    trainer.compile(
        optimizer=method.optimizer(rho), loss=logits_loss(), jit_compile=jit_compile,
        **compile_kwargs,
    )
    return trainer


def _compiled_base(method, model, jit_compile=False, **compile_kwargs):
    model.compile(
        optimizer=method.base_optimizer(), loss=logits_loss(), jit_compile=jit_compile,
        **compile_kwargs,
    )
    return model


def _fit(trainer, seed=5, **kwargs):
    keras.utils.set_random_seed(seed)
    kwargs = {"batch_size": 16, "epochs": 2, "shuffle": False, "verbose": 0, **kwargs}
    return trainer.fit(X, Y, **kwargs)


def _inner(trainer):
    return getattr(trainer, "model", None) or trainer


def _bn_moving_stats(model):
    bn = model.get_layer("bn")
    return [bn.moving_mean.numpy(), bn.moving_variance.numpy()]


# --------------------------------------------------------------------------- equivalences
@all_methods
@pytest.mark.parametrize("jit_compile", [False, True])
def test_rho_zero_equals_base_optimizer(method, jit_compile):
    """BatchNorm + Dropout model, a last batch of 8: same weights, stats and losses."""
    trainer = _compiled(method, bn_dropout_model(), 0.0, jit_compile)
    base = _compiled_base(method, bn_dropout_model(), jit_compile)
    base_history = _fit(base)
    history = _fit(trainer)
    assert_weights_close(_inner(trainer).get_weights(), base.get_weights(), atol=method.base_atol)
    np.testing.assert_allclose(
        history.history["loss"], base_history.history["loss"], atol=method.base_atol
    )


@all_methods
def test_rho_positive_differs_from_base(method):
    base = _compiled_base(method, plain_model())
    _fit(base)
    trainer = _compiled(method, plain_model(), 0.5)
    _fit(trainer)
    assert max_abs_diff(_inner(trainer).get_weights(), base.get_weights()) > 1e-4


@all_methods
def test_batchnorm_statistics_updated_once_at_clean_weights(method):
    reference = bn_dropout_model()
    reference(X[:16], training=True)
    trainer = _compiled(method, bn_dropout_model(), 0.5)
    trainer.fit(X[:16], Y[:16], batch_size=16, epochs=1, verbose=0)
    for got, want in zip(_bn_moving_stats(_inner(trainer)), _bn_moving_stats(reference)):
        np.testing.assert_allclose(got, want, atol=1e-6)


@all_methods
def test_rho_schedule_first_step_is_the_base_step(method):
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([1], [0.0, 0.5])
    base = _compiled_base(method, plain_model())
    base.fit(X[:16], Y[:16], batch_size=16, epochs=1, verbose=0)
    trainer = _compiled(method, plain_model(), schedule)
    trainer.fit(X[:16], Y[:16], batch_size=16, epochs=1, verbose=0)
    assert_weights_close(_inner(trainer).get_weights(), base.get_weights(), atol=1e-6)
    history = trainer.fit(X, Y, batch_size=16, epochs=1, verbose=0)
    assert math.isfinite(history.history["loss"][-1])


# --------------------------------------------------------------------------- robustness
@all_methods
def test_zero_gradient_gives_no_nan(method):
    model = plain_model()
    model.set_weights([np.zeros_like(w) for w in model.get_weights()])
    trainer = _compiled(method, model, 0.5)
    x = np.zeros_like(X)
    y = np.zeros_like(Y)
    trainer.fit(x, y, batch_size=16, epochs=2, verbose=0)
    for w in _inner(trainer).get_weights():
        assert np.all(np.isfinite(w))


@wrappers
def test_non_finite_batch_skips_the_step(method):
    trainer = _compiled(method, plain_model(), 0.5)
    before = _inner(trainer).get_weights()
    x = X[:16].copy()
    x[3, 2] = np.inf
    trainer.fit(x, Y[:16], batch_size=16, epochs=1, verbose=0)
    assert_weights_close(_inner(trainer).get_weights(), before, atol=0.0)


@wrappers
def test_variable_without_gradient_is_skipped(method):
    class WithUnused(keras.Model):
        def __init__(self):
            super().__init__()
            self.used = keras.layers.Dense(3)
            self.unused = keras.layers.Dense(3)

        def build(self, input_shape):
            self.used.build(input_shape)
            self.unused.build(input_shape)

        def call(self, inputs):
            return self.used(inputs)

    model = WithUnused()
    model.build((None, 8))
    unused_before = model.unused.get_weights()
    trainer = _compiled(method, model, 0.5)
    history = _fit(trainer, epochs=1)
    assert math.isfinite(history.history["loss"][0])
    assert_weights_close(model.unused.get_weights(), unused_before, atol=0.0)


@wrappers
def test_sample_and_class_weights_at_rho_zero(method):
    sample_weight = np.linspace(0.0, 2.0, len(X)).astype("float32")
    class_weight = {0: 1.0, 1: 3.0, 2: 0.5}
    for kwargs in ({"sample_weight": sample_weight}, {"class_weight": class_weight}):
        base = _compiled_base(method, plain_model())
        _fit(base, **kwargs)
        trainer = _compiled(method, plain_model(), 0.0)
        _fit(trainer, **kwargs)
        assert_weights_close(_inner(trainer).get_weights(), base.get_weights(), atol=1e-6)


@wrappers
def test_multi_output_loss_metrics_counted_once(method):
    def two_heads():
        keras.utils.set_random_seed(2)
        inputs = keras.Input((8,))
        h = keras.layers.Dense(8, activation="tanh")(inputs)
        heads = {"a": keras.layers.Dense(3, name="a")(h), "b": keras.layers.Dense(1, name="b")(h)}
        return keras.Model(inputs, heads)

    targets = {"a": Y, "b": X[:, :1]}
    losses = {"a": logits_loss(), "b": "mse"}
    base = two_heads()
    base.compile(optimizer=method.base_optimizer(), loss=losses, loss_weights={"a": 1.0, "b": 0.5})
    base_logs = base.fit(X, targets, batch_size=16, epochs=1, shuffle=False, verbose=0).history
    trainer = method.trainer(two_heads(), 0.0)
    trainer.compile(optimizer=method.optimizer(0.0), loss=losses, loss_weights={"a": 1.0, "b": 0.5})
    logs = trainer.fit(X, targets, batch_size=16, epochs=1, shuffle=False, verbose=0).history
    assert set(logs) == set(base_logs)
    for key in base_logs:
        np.testing.assert_allclose(logs[key], base_logs[key], rtol=1e-5, err_msg=key)


# --------------------------------------------------------------------------- bad input
@all_methods
@pytest.mark.parametrize(
    ("rho", "error"),
    [(-0.1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
     ("big", TypeError), (None, TypeError), (True, TypeError)],
)
def test_bad_rho_raises_at_construction(method, rho, error):
    with pytest.raises(error, match="rho"):
        method.construct(plain_model(), rho=rho)


@wrappers
@pytest.mark.parametrize("model", [keras.layers.Dense(3), "resnet", None])
def test_model_must_be_a_keras_model(method, model):
    with pytest.raises(TypeError, match="`model`"):
        method.construct(model)


@wrappers
def test_bad_perturbation_scope(method):
    with pytest.raises(ValueError, match="perturbation_scope"):
        method.construct(plain_model(), perturbation_scope="local")


# --------------------------------------------------------------------------- serialization
@all_methods
def test_config_round_trip(method):
    trainer = method.trainer(plain_model(), 0.25)
    if method.is_wrapper:
        clone = type(trainer).from_config(trainer.get_config())
        assert clone.get_config() == trainer.get_config()
    optimizer = method.optimizer(0.25)
    assert type(optimizer).from_config(optimizer.get_config()).get_config() == (
        optimizer.get_config()
    )


@all_methods
def test_keras_file_round_trip_resumes_training(method, tmp_path):
    # No Dropout: Keras does not save SeedGenerator states, so even a plain model
    # draws other dropout masks after loading.
    trainer = _compiled(method, bn_dropout_model(dropout=0.0), 0.25)
    _fit(trainer, epochs=1)
    path = str(tmp_path / "trainer.keras")
    trainer.save(path)
    restored = keras.models.load_model(path)
    assert type(restored) is type(trainer)
    assert_weights_close(_inner(restored).get_weights(), _inner(trainer).get_weights(), atol=0.0)
    assert_weights_close(
        [v.numpy() for v in restored.optimizer.variables],
        [v.numpy() for v in trainer.optimizer.variables],
        atol=0.0,
    )
    _fit(trainer, epochs=1, seed=9)
    _fit(restored, epochs=1, seed=9)
    assert_weights_close(_inner(restored).get_weights(), _inner(trainer).get_weights(), atol=1e-6)


# --------------------------------------------------------------------------- kinds of model
@wrappers
@pytest.mark.parametrize("kind", sorted(lazy_models()))
def test_a_model_built_by_its_first_batch_trains_as_one_built_up_front(method, kind):
    weights = []
    for build_first in (False, True):
        keras.utils.set_random_seed(0)
        model = lazy_models()[kind]()
        if build_first:
            model(X[:1])
        trainer = _compiled(method, model, 0.2, JIT_COMPILE)
        _fit(trainer)
        weights.append(model.get_weights())
    assert len(weights[0]) == 4
    assert_weights_close(weights[0], weights[1], atol=1e-6)


def _dict_input_model():
    keras.utils.set_random_seed(3)
    inputs = {"left": keras.Input((5,), name="left"), "right": keras.Input((3,), name="right")}
    h = keras.layers.Concatenate()([inputs["left"], inputs["right"]])
    h = keras.layers.Dense(8, activation="tanh")(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h))


@wrappers
def test_dict_inputs_train_as_the_concatenated_features(method):
    """A model fed ``{"left": x[:, :5], "right": x[:, 5:]}`` trains exactly as its twin
    fed ``x`` (the first layer concatenates; the same initial weights)."""
    trainer = _compiled(method, _dict_input_model(), 0.2)
    keras.utils.set_random_seed(5)
    trainer.fit({"left": X[:, :5], "right": X[:, 5:]}, Y, batch_size=16, epochs=2,
                shuffle=False, verbose=0)
    twin_inputs = keras.Input((8,))
    twin_body = keras.Sequential(_dict_input_model().layers[-2:])
    twin = keras.Model(twin_inputs, twin_body(twin_inputs))
    twin_trainer = _compiled(method, twin, 0.2)
    _fit(twin_trainer)
    assert_weights_close(_inner(trainer).get_weights(), twin.get_weights(), atol=1e-5)


class _AddLossOnly(keras.layers.Layer):
    """keras-io's endpoint-layer pattern: the loss is `add_loss`, none is compiled."""

    def call(self, targets, logits):
        self.add_loss(keras.ops.mean(
            keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)))
        return logits


@wrappers
def test_a_model_whose_loss_is_add_loss_only_trains_or_is_refused_at_compile(method):
    keras.utils.set_random_seed(0)
    inputs, targets = keras.Input((8,)), keras.Input((), dtype="int32")
    logits = keras.layers.Dense(3)(inputs)
    model = keras.Model([inputs, targets], _AddLossOnly()(targets, logits))
    trainer = method.trainer(model, 0.1)
    try:
        trainer.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=JIT_COMPILE)
    except ValueError as error:  # a method that ranks samples by their loss
        assert "add_loss" in str(error)
        return
    history = trainer.fit([X, Y], batch_size=16, epochs=3, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


# --------------------------------------------------------------------------- distribution
def _replicas_identical(trainer):
    for variable in _inner(trainer).trainable_variables:
        copies = [c.numpy() for c in variable.value.values]
        assert len(copies) == 2
        np.testing.assert_array_equal(copies[0], copies[1], err_msg=variable.path)


@pytest.mark.tf_only
@all_methods
@pytest.mark.parametrize("jit_compile", [False, True])
def test_mirrored_strategy_trains_with_identical_replicas(method, jit_compile):
    if jit_compile and not method.is_wrapper:
        pytest.skip("Keras' own jit_compile=True fails under a multi-device MirroredStrategy")
    with mirrored_strategy().scope():
        trainer = _compiled(method, bn_dropout_model(), 0.25, jit_compile)
    history = _fit(trainer)
    assert all(math.isfinite(v) for v in history.history["loss"])
    _replicas_identical(trainer)


@pytest.mark.tf_only
@wrappers
def test_mirrored_xla_refuses_synchronized_batchnorm_at_compile(method):
    """Under a multi-device MirroredStrategy, ``jit_compile=True`` compiles each pass
    on its own; a synchronized BatchNorm's all-reduce cannot sit inside one, so
    `compile` says so (TensorFlow's own error comes at the first step, from inside
    the pass). Without XLA the same model trains, replicas identical."""
    def model():
        keras.utils.set_random_seed(1)
        inputs = keras.Input((8,))
        hidden = keras.layers.Dense(16, use_bias=False)(inputs)
        hidden = keras.layers.BatchNormalization(synchronized=True, name="sync_bn")(hidden)
        return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.ReLU()(hidden)))

    with mirrored_strategy().scope():
        with pytest.raises(ValueError, match=r"jit_compile=True.*sync_bn"):
            _compiled(method, model(), 0.25, True)
        trainer = _compiled(method, model(), 0.25, False)
    _fit(trainer)
    _replicas_identical(trainer)


@pytest.mark.tf_only
@wrappers
def test_global_scope_on_two_replicas_equals_one_device(method):
    single = method.trainer(plain_model(), 0.25)
    single.perturbation_scope = "global"
    single.compile(optimizer=method.optimizer(0.25), loss=logits_loss())
    _fit(single)
    results = {}
    for scope in ("global", "replica"):
        with mirrored_strategy().scope():
            trainer = method.trainer(plain_model(), 0.25)
            trainer.perturbation_scope = scope
            trainer.compile(optimizer=method.optimizer(0.25), loss=logits_loss())
        _fit(trainer)
        _replicas_identical(trainer)
        results[scope] = trainer.model.get_weights()
    assert_weights_close(results["global"], single.model.get_weights(), atol=1e-5)
    assert max_abs_diff(results["replica"], results["global"]) > 1e-6
