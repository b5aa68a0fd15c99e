"""Test configuration: two logical CPU devices (tf.distribute / keras.distribution tests),
quiet TF, and the `tf_only` marker.

The suite runs on TensorFlow by default. `tests/test_jax_backend.py` runs the
method-level tests again in a subprocess with ``KERAS_BACKEND=jax``; tests marked
``tf_only`` (tf.distribute, TF-specific API) are skipped there.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
if os.environ["KERAS_BACKEND"] == "jax":
    # Four host devices for keras.distribution tests (read when jax starts).
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in _flags:
        os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=4".strip()

import keras
import pytest

if keras.backend.backend() == "tensorflow":
    import tensorflow as tf

    _cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "tf_only: needs the TensorFlow backend (tf.distribute, TF-specific API)"
    )


def pytest_collection_modifyitems(config, items):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return
    skip = pytest.mark.skip(reason=f"TensorFlow-only test; the Keras backend is {backend!r}")
    # On PyTorch the wrappers refuse jit_compile=True (torch.compile), which
    # tests/backend/test_torch.py checks; the compiled variants of other tests skip.
    skip_compiled = pytest.mark.skip(reason="jit_compile=True is refused on PyTorch")
    for item in items:
        if "tf_only" in item.keywords:
            item.add_marker(skip)
        parameters = getattr(getattr(item, "callspec", None), "params", {})
        if backend == "torch" and parameters.get("jit_compile") is True:
            item.add_marker(skip_compiled)


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Every test starts from the same seed and global policy."""
    keras.utils.set_random_seed(0)
    keras.config.set_dtype_policy("float32")
    yield
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()
