"""Every Keras internal keras_sam uses still exists in the installed Keras."""

import keras
import pytest

from keras_sam import internals


def test_every_internal_exists_in_the_installed_keras():
    internals.check()  # raises, naming each missing internal and the Keras version


def test_a_missing_internal_is_reported_with_the_keras_version(monkeypatch):
    monkeypatch.delattr(keras.layers.Layer, "_flatten_layers")
    with pytest.raises(RuntimeError, match=f"keras {keras.__version__}.*_flatten_layers"):
        internals.check()


def test_a_replaced_train_step_leaves_nothing_on_the_model():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    with internals.train_step_replaced(model, lambda *args: None):
        assert model.train_step is not type(model).train_step
    assert "train_step" not in vars(model)


def test_replaced_batchnorm_moments_hold_per_thread_and_nest():
    """MirroredStrategy's replica threads take turns inside the same layers: each
    thread sees its own innermost replacement, another thread Keras' own, and the
    layer is left untouched once the last context closes, whatever the order."""
    import threading

    import numpy as np

    layer = keras.layers.BatchNormalization()
    model = keras.Sequential([keras.Input((2,)), layer])
    x = np.array([[1.0, 2.0], [3.0, 6.0]], "float32")

    def constant(value):
        return lambda layer, inputs, mask, default: (value * keras.ops.ones(2),) * 2

    def mean_seen():
        return keras.ops.convert_to_numpy(layer._moments(x, None)[0])

    entered, closed = threading.Event(), threading.Event()
    seen = {}

    def other_thread():
        seen["before"] = mean_seen()
        with internals.batchnorm_moments_replaced(model, constant(7.0)):
            entered.set()
            closed.wait()
            seen["inside"] = mean_seen()

    with internals.batchnorm_moments_replaced(model, constant(1.0)):
        thread = threading.Thread(target=other_thread)
        thread.start()
        entered.wait()
        with internals.batchnorm_moments_replaced(model, constant(2.0)):
            np.testing.assert_allclose(mean_seen(), [2.0, 2.0])
        np.testing.assert_allclose(mean_seen(), [1.0, 1.0])
    closed.set()
    thread.join()
    np.testing.assert_allclose(seen["before"], [2.0, 4.0])  # Keras' own: the batch mean
    np.testing.assert_allclose(seen["inside"], [7.0, 7.0])
    np.testing.assert_allclose(mean_seen(), [2.0, 4.0])
    assert "_moments" not in vars(layer)
