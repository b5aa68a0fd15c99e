"""What is particular to the PyTorch backend (run under ``KERAS_BACKEND=torch``).

The wrappers run eagerly there and refuse ``jit_compile=True`` (`torch.compile`) at
`compile` with an error that names the argument; the Momentum-SAM optimizers, one
ordinary Keras step each, also train a model under `torch.compile`.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_sam
from tests.helpers import assert_weights_close, bn_dropout_model, classification_data, logits_loss

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="PyTorch-specific (KERAS_BACKEND=torch)"
)
X, Y = classification_data(n=32)
WRAPPERS = [m for m in keras_sam.registry.METHODS.values() if not m.is_optimizer]


@pytest.mark.parametrize("method", WRAPPERS, ids=lambda m: m.name)
def test_wrappers_refuse_jit_compile_at_compile(method):
    trainer = method.make_trainer(bn_dropout_model())
    with pytest.raises(ValueError, match="jit_compile=True"):
        trainer.compile(optimizer="sgd", loss=logits_loss(), jit_compile=True)


def test_a_wrapper_whose_jit_compile_is_set_later_refuses_at_fit():
    trainer = keras_sam.SAM(bn_dropout_model())
    trainer.compile(optimizer="sgd", loss=logits_loss())
    assert trainer.jit_compile is False  # "auto" is eager on PyTorch
    trainer.jit_compile = True
    with pytest.raises(ValueError, match="jit_compile=True"):
        trainer.fit(X, Y, batch_size=8, epochs=1, verbose=0)


def test_the_step_leaves_no_gradient_on_the_parameters():
    """The passes use torch.autograd.grad: nothing accumulates in ``.grad`` and no
    graph outlives the step."""
    trainer = keras_sam.SAM(bn_dropout_model(), rho=0.1)
    trainer.compile(optimizer="sgd", loss=logits_loss())
    trainer.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    for variable in trainer.trainable_variables:
        assert variable.value.grad is None, variable.path
    assert all(not v.value.requires_grad for v in trainer.non_trainable_variables)


def test_torch_compile_trains_msam_as_eager():
    weights = []
    for jit_compile in (False, True):
        model = bn_dropout_model(dropout=0.0)
        model.compile(optimizer=keras_sam.optimizers.MSAM(0.05, rho=0.2), loss=logits_loss(),
                      jit_compile=jit_compile)
        model.fit(X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0,
                  callbacks=[keras_sam.callbacks.MSAMCallback()])
        weights.append(model.get_weights())
    assert_weights_close(weights[1], weights[0], atol=1e-5)
    assert not np.allclose(weights[0][0], bn_dropout_model(dropout=0.0).get_weights()[0])
