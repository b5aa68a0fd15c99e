"""keras_sam.batchnorm: a pass on a subset of the batch normalizes with the whole
batch's statistics (K-SAM's k-sample passes)."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_sam import batchnorm


def _conv_bn_model():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((4, 4, 2))
    h = keras.layers.Conv2D(3, 3, padding="same")(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(5)(h)
    h = keras.layers.BatchNormalization()(h)  # a Dense BatchNorm: no inner axes
    return keras.Model(inputs, keras.layers.Dense(2)(h))


X = np.random.default_rng(0).normal(size=(10, 4, 4, 2)).astype("float32") * 3.0 + 1.0
CHOSEN = np.array([1, 4, 7])


def _subset_output(model, chosen):
    with batchnorm.record(model) as recorded:
        full = model(X, training=True)
    statistics = batchnorm.rest_of_batch(recorded, ops.convert_to_tensor(chosen), len(X))
    with batchnorm.replay(model, statistics):
        subset = model(X[chosen], training=True)
    return ops.convert_to_numpy(full), ops.convert_to_numpy(subset)


def test_a_subset_pass_sees_the_whole_batch_statistics():
    model = _conv_bn_model()
    full, subset = _subset_output(model, CHOSEN)
    # At the same weights, each chosen sample is normalized exactly as in the batch.
    np.testing.assert_allclose(subset, full[CHOSEN], atol=1e-5)
    # Without replay the subset is normalized among itself: a different network.
    alone = ops.convert_to_numpy(model(X[CHOSEN], training=True))
    assert np.max(np.abs(alone - full[CHOSEN])) > 0.1


def test_the_whole_batch_as_subset_has_its_own_statistics_and_gradients():
    """S = B: the replayed statistics are the batch's own, gradients included."""
    model = _conv_bn_model()
    everything = np.arange(len(X))
    full, subset = _subset_output(model, everything)
    np.testing.assert_allclose(subset, full, atol=1e-5)


def test_the_statistics_follow_the_chosen_samples_current_values():
    """Moving the chosen samples moves the statistics by their share only."""
    model = _conv_bn_model()
    layer = model.layers[2]
    with batchnorm.record(model) as recorded:
        model(X, training=True)
    statistics = batchnorm.rest_of_batch(recorded, ops.convert_to_tensor(CHOSEN), len(X))
    shifted = X.copy()
    shifted[CHOSEN] += 2.0
    with batchnorm.replay(model, statistics):  # the first BatchNorm's moments, live
        conv_out = model.layers[1](shifted[CHOSEN])
        mean, variance = layer._moments(conv_out, None)
    whole = np.concatenate([
        ops.convert_to_numpy(model.layers[1](X[np.setdiff1d(np.arange(10), CHOSEN)])),
        ops.convert_to_numpy(conv_out),
    ])
    np.testing.assert_allclose(ops.convert_to_numpy(mean), whole.mean(axis=(0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(
        ops.convert_to_numpy(variance), whole.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5
    )


def _gradient(fn, x: np.ndarray) -> np.ndarray:
    """d Σ fn(x) / dx on the current backend."""
    name = keras.backend.backend()
    if name == "jax":
        import jax

        return np.asarray(jax.grad(lambda v: ops.sum(fn(v)))(x))
    if name == "torch":
        import torch

        value = torch.tensor(x, requires_grad=True)
        ops.sum(fn(value)).backward()
        return value.grad.cpu().numpy()
    import tensorflow as tf

    value = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(value)
        total = ops.sum(fn(value))
    return tape.gradient(total, value).numpy()


@pytest.mark.parametrize("chosen", [np.array([1, 4, 7]), np.arange(8)], ids=["subset", "all"])
def test_the_chosen_samples_stand_for_the_batch_in_the_statistics_gradient(chosen):
    """Values: the whole batch's moments. Gradient: each of the k chosen samples
    weighs 1/k (the whole batch's BatchNorm gives 1/n to each of its n samples),
    so d mean / dx_i = 1/k and d var / dx_i = 2 (x_i - mean) / k; with k = n these
    are the batch's own."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 3)).astype("float32") * 2.0 + 1.0
    model = keras.Sequential([keras.Input((3,)), keras.layers.BatchNormalization()])
    layer = model.layers[0]
    with batchnorm.record(model) as recorded:
        model(x, training=True)
    statistics = batchnorm.rest_of_batch(recorded, ops.convert_to_tensor(chosen), len(x))

    def moment(index):
        def fn(values):
            with batchnorm.replay(model, list(statistics)):
                return layer._moments(values, None)[index]

        return fn

    mean, variance = x.mean(axis=0), x.var(axis=0)
    k = len(chosen)
    np.testing.assert_allclose(
        ops.convert_to_numpy(moment(1)(x[chosen])), variance, rtol=1e-5
    )
    np.testing.assert_allclose(_gradient(moment(0), x[chosen]), np.full((k, 3), 1 / k), rtol=1e-5)
    np.testing.assert_allclose(
        _gradient(moment(1), x[chosen]), 2 * (x[chosen] - mean) / k, rtol=1e-4, atol=1e-6
    )


def test_more_calls_than_recorded_is_an_error():
    model = _conv_bn_model()
    with batchnorm.record(model) as recorded:
        model(X, training=True)
    statistics = batchnorm.rest_of_batch(recorded, ops.convert_to_tensor(CHOSEN), len(X))
    with batchnorm.replay(model, statistics), pytest.raises(RuntimeError, match="more BatchNorm"):
        model(X[CHOSEN], training=True)
        model(X[CHOSEN], training=True)
