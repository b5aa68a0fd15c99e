"""The PyTorch backend (a subprocess): train-step wrappers raise NotImplementedError with
the reason; the Momentum-SAM optimizers train and match the NumPy reference.

Skipped when torch is not installed (it is not part of keras-sam[test]).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "torch_backend" / "torch_script.py"


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="launched from the default TensorFlow run")
def test_torch_backend_wrappers_refuse_and_msam_trains():
    env = dict(os.environ, KERAS_BACKEND="torch")
    result = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, (
        result.stdout[-3000:] + result.stderr[-3000:]
    )
