"""The PyTorch backend in a subprocess: wrappers refuse clearly, Momentum-SAM works.

Usage: ``KERAS_BACKEND=torch python torch_script.py``; prints ``OK`` on success.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import keras
import numpy as np

import keras_sam
from tests.optimizers.msam_reference import linear_mse_grads, msam_reference

X = np.random.RandomState(1).randn(32, 3).astype("float32")
Y = (X @ np.array([[1.0, -2.0], [0.5, 1.0], [-1.0, 0.3]]) + 0.1).astype("float32")
W0 = [np.array([[0.2, -0.1], [0.4, 0.3], [-0.5, 0.1]], "float32"),
      np.array([0.05, -0.05], "float32")]


def main() -> None:
    assert keras.backend.backend() == "torch"
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    wrappers = [m.cls for m in keras_sam.registry.METHODS.values() if not m.is_optimizer]
    for wrapper in wrappers:
        try:
            wrapper(model)
        except NotImplementedError as error:
            assert "TensorFlow and JAX" in str(error), error
        else:
            raise AssertionError(f"{wrapper.__name__} did not refuse the torch backend")
    model.set_weights(W0)
    model.compile(optimizer=keras_sam.optimizers.MSAM(0.05, momentum=0.9, rho=0.2), loss="mse")
    model.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[keras_sam.callbacks.MSAMCallback()])
    batches = [(X[i:i + 8].astype(np.float64), Y[i:i + 8]) for _ in range(2)
               for i in range(0, 32, 8)]
    reference = msam_reference(W0, linear_mse_grads, batches, 0.05, 0.9, 0.2)
    for got, want in zip(model.get_weights(), reference["w"]):
        np.testing.assert_allclose(got, want, atol=2e-6)
    print("OK")


if __name__ == "__main__":
    main()
