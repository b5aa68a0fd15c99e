"""keras.distribution.DataParallel on two host devices (JAX only).

Runs in the JAX subprocess of tests/test_jax_backend.py, where conftest.py sets
``XLA_FLAGS=--xla_force_host_platform_device_count=2``.
"""

from __future__ import annotations

import math
import warnings

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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the replica-scope warning, tested below
        weights, losses = _fit(method, bn_dropout_model)
    assert all(math.isfinite(v) for v in losses)
    assert all(np.all(np.isfinite(w)) for w in weights)


def test_replica_scope_warns_on_more_than_one_device(data_parallel):
    method = WRAPPERS[0]
    with pytest.warns(UserWarning, match="perturbation_scope='replica'.*not implemented"):
        _fit(method, plain_model, scope="replica")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _fit(method, plain_model, scope="global")


def test_replica_scope_on_one_device_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _fit(WRAPPERS[0], plain_model, scope="replica")
