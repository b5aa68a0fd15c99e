"""Keras habits that must work with the wrappers, or be refused with a way out."""

from __future__ import annotations

import keras
import pytest

import keras_sam
from tests.helpers import assert_weights_close, classification_data, logits_loss
from tests.methods import WRAPPERS

X, Y = classification_data(n=32)


class Subclassed(keras.Model):
    """The usual `class MyModel(keras.Model)`: no Input, built by its first batch."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="tanh")
        self.out = keras.layers.Dense(3)

    def call(self, inputs: object) -> object:
        return self.out(self.hidden(inputs))


#: Wrappers without per-variable state of their own train a model built lazily.
LAZY = [
    lambda m: keras_sam.SAM(m, rho=0.1),
    lambda m: keras_sam.ASAM(m, rho=0.5),
    lambda m: keras_sam.KSAM(m, rho=0.1, k=0.5),
    lambda m: keras_sam.GSAM(m, rho=0.1),
    lambda m: keras_sam.ESAM(m, rho=0.1, beta=1.0, gamma=0.5),
    lambda m: keras_sam.WSAM(m, rho=0.1),
]


@pytest.mark.parametrize("wrap", LAZY, ids=["SAM", "ASAM", "KSAM", "GSAM", "ESAM", "WSAM"])
def test_unbuilt_subclassed_model_trains_like_the_same_model_built_up_front(wrap):
    results = []
    for build_first in (False, True):
        keras.utils.set_random_seed(0)
        model = Subclassed()
        if build_first:
            model.build((None, X.shape[1]))
        trainer = wrap(model)
        trainer.compile(optimizer=keras.optimizers.SGD(0.05), loss=logits_loss(),
                        jit_compile=True)
        trainer.fit(X, Y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        results.append(model.get_weights())
    assert len(results[0]) == 4
    assert_weights_close(results[0], results[1], atol=1e-6)


@pytest.mark.parametrize("cls", [keras_sam.LookSAM, keras_sam.FriendlySAM, keras_sam.LayerwiseSAM])
def test_wrappers_with_per_variable_state_ask_for_a_built_model(cls):
    with pytest.raises(ValueError, match=r"model\(x\[:1\]\)"):
        cls(Subclassed())


class CustomStep(Subclassed):
    """keras-io's VAE/GAN pattern: the model trains itself with its own step."""

    def train_step(self, *args):
        return super().train_step(*args)


@pytest.mark.parametrize("method", WRAPPERS, ids=str)
def test_a_model_with_its_own_train_step_is_refused_with_a_way_out(method):
    with pytest.raises(TypeError, match=r"overrides `train_step`.*Momentum-SAM"):
        method.construct(CustomStep())


class EndpointLoss(keras.layers.Layer):
    """keras-io's endpoint-layer pattern: the loss is `add_loss`, not compiled."""

    def call(self, targets, logits):
        self.add_loss(keras.ops.mean(
            keras.losses.sparse_categorical_crossentropy(targets, logits, from_logits=True)))
        return logits


def _endpoint_model():
    inputs, targets = keras.Input((8,)), keras.Input((), dtype="int32")
    logits = keras.layers.Dense(3)(inputs)
    return keras.Model([inputs, targets], EndpointLoss()(targets, logits))


def test_ksam_refuses_an_add_loss_only_model_and_sam_trains_it():
    trainer = keras_sam.KSAM(_endpoint_model(), rho=0.1, k=0.5)
    with pytest.raises(ValueError, match=r"K-SAM ranks the samples.*compile\(loss="):
        trainer.compile(optimizer="sgd")
    trainer = keras_sam.SAM(_endpoint_model(), rho=0.1)
    trainer.compile(optimizer="sgd")
    history = trainer.fit([X, Y], batch_size=16, epochs=2, verbose=0)
    assert history.history["loss"][1] < history.history["loss"][0]
