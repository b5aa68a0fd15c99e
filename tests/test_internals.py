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
