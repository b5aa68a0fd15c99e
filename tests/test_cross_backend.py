"""Every method gives the same weights on TensorFlow, JAX and PyTorch.

`tests/cross_backend_script.py` trains every method of the registry six steps on a
BatchNorm model from fixed weights, in a subprocess per backend; the weights (and
BatchNorm statistics) must agree with TensorFlow's to 1e-5. TensorFlow's equal the
numpy references (tests/models, tests/optimizers), so this carries those references
to the other backends for the methods whose reference tests their runs leave out.
A backend that is not installed is skipped with the reason.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_sam
from tests.helpers import ROOT, run_under_backend

SCRIPT = ROOT / "tests" / "cross_backend_script.py"

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="launches the backends' subprocesses from the default TensorFlow run",
)


def _weights(backend: str, path: Path) -> dict:
    result = run_under_backend([str(SCRIPT), str(path)], backend, 300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    arrays = np.load(path)
    assert str(arrays["backend"]) == backend
    return {name: arrays[name] for name in arrays.files if name != "backend"}


@pytest.fixture(scope="module")
def tensorflow_weights(tmp_path_factory):
    return _weights("tensorflow", tmp_path_factory.mktemp("tensorflow") / "weights.npz")


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_every_method_gives_tensorflows_weights(backend, tensorflow_weights, tmp_path):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed (keras-sam[test] installs it)")
    weights = _weights(backend, tmp_path / "weights.npz")
    assert sorted(weights) == sorted(tensorflow_weights)
    assert {n.split("/")[0] for n in weights} == {*keras_sam.registry.METHODS, "sam_splits"}
    for name, expected in tensorflow_weights.items():
        np.testing.assert_allclose(weights[name], expected, atol=1e-5, err_msg=name)
