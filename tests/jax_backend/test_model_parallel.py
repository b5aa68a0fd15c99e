"""keras.distribution.ModelParallel on four host devices (JAX only): weights sharded.

Runs in the JAX subprocess of tests/test_jax_backend.py, where conftest.py sets
``XLA_FLAGS=--xla_force_host_platform_device_count=4``. The mesh is 2 × 2: the
batch is split over the ``"batch"`` axis and every Dense kernel over the
``"model"`` axis. `jax.jit` compiles one SPMD program, so every method computes
exactly what one device computes on the global batch: its weights after training
equal the single-device run's. ``perturbation_scope="replica"`` (per-device
perturbations) is defined for data parallelism only; under ModelParallel it warns
and computes the global-batch perturbation, the same result as ``"global"``.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tests.helpers import assert_weights_close, classification_data, logits_loss, plain_model
from tests.methods import METHODS

if keras.backend.backend() != "jax":
    pytest.skip(
        "JAX-only (keras.distribution.ModelParallel); tests/test_jax_backend.py runs it "
        "with KERAS_BACKEND=jax",
        allow_module_level=True,
    )

import jax

X, Y = classification_data(n=32, n_classes=4)


def _model_parallel():
    devices = jax.devices("cpu")
    if len(devices) < 4:
        pytest.skip("needs 4 host devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
    mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices=devices[:4])
    layout = keras.distribution.LayoutMap(mesh)
    layout["dense.*kernel"] = (None, "model")
    return keras.distribution.ModelParallel(layout_map=layout, batch_dim_name="batch")


def _fit(method, distribution=None, scope="global"):
    keras.distribution.set_distribution(distribution)
    try:
        trainer = method.trainer(plain_model(n_classes=4), 0.25)
        if method.is_wrapper:
            trainer.perturbation_scope = scope
        trainer.compile(optimizer=method.optimizer(0.25), loss=logits_loss())
        keras.utils.set_random_seed(5)
        history = trainer.fit(X, Y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                              callbacks=method.callbacks())
        model = getattr(trainer, "model", trainer)
        kernel = model.layers[1].kernel.value
        return model.get_weights(), history.history["loss"], kernel
    finally:
        keras.distribution.set_distribution(None)


@pytest.mark.parametrize("method", METHODS, ids=str)
def test_sharded_weights_train_as_on_one_device(method):
    distribution = _model_parallel()
    sharded, losses, kernel = _fit(method, distribution)
    # The kernel really is split over the "model" axis: each device holds half.
    assert {shard.data.shape for shard in kernel.addressable_shards} == {(8, 8)}
    single, single_losses, _ = _fit(method)
    assert_weights_close(sharded, single, atol=1e-5)
    np.testing.assert_allclose(losses, single_losses, rtol=1e-5)


def test_replica_scope_warns_and_perturbs_with_the_global_batch():
    from tests.methods import WRAPPERS

    method = WRAPPERS[0]  # SAM
    with pytest.warns(UserWarning, match="ModelParallel with 2 data-parallel devices"):
        replica, _, _ = _fit(method, _model_parallel(), scope="replica")
    global_, _, _ = _fit(method, _model_parallel(), scope="global")
    assert_weights_close(replica, global_, atol=1e-6)
