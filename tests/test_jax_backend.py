"""The JAX backend, from the default (TensorFlow) test run.

`python -m pytest` runs the suite on TensorFlow. These tests cover JAX too:

* `test_method_tests_pass_on_jax` runs the method-level tests (numeric references
  of every method, the contract suite, keras.distribution.DataParallel on two host
  devices) in a subprocess with ``KERAS_BACKEND=jax``;
* `test_tensorflow_and_jax_give_the_same_weights` trains every method a few
  steps under each backend (subprocesses) and compares the weights.

Both are skipped, with the reason, when jax is not installed. Under
``KERAS_BACKEND=jax`` (the subprocess itself) this module is skipped: the tests
run directly there.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_sam

ROOT = Path(__file__).resolve().parents[1]
CROSS_BACKEND_SCRIPT = ROOT / "tests" / "jax_backend" / "cross_backend_script.py"

#: What the JAX run covers: the numeric references of SAM, ASAM and Layer-wise SAM
#: (whose per-cut compiled steps are backend-specific), keras.distribution
#: (tests/jax_backend), sharpness, BatchNorm statistics, and the part of the contract
#: and hardening suites that exercises backend code (compiled steps, BatchNorm,
#: skipped steps, mixed precision, saving). Every other method (K-SAM, the zoo, the
#: Momentum-SAM optimizers) is checked on JAX by the cross-backend test below: its
#: weights after six steps on a BatchNorm model equal TensorFlow's to 1e-5, and
#: TensorFlow's equal the numpy references. The GitHub workflow's JAX job
#: (``KERAS_SAM_TEST_BACKEND=jax bash .ci/run``) runs all of tests/models,
#: tests/optimizers and the contract suite on JAX (tf.distribute tests are marked
#: `tf_only` and skip there).
JAX_TESTS = [
    "tests/models/test_sam.py",
    "tests/models/test_asam.py",
    "tests/models/test_layerwise.py",
    "tests/jax_backend",
    "tests/test_contract.py",
    "tests/test_hardening.py",
    "tests/test_sharpness.py",
    "tests/test_batchnorm.py",
]
#: ``jit_compile=False`` variants are left out: on JAX they run eagerly, op by op, which
#: costs minutes and exercises no backend code the compiled run does not.
JAX_SELECTION = (
    "(not (test_contract or test_hardening)"
    " or (test_rho_zero_equals_base_optimizer and True)"
    " or test_batchnorm_statistics_updated_once"
    " or test_non_finite_batch_skips_the_step"
    " or test_keras_file_round_trip"
    " or test_overflowing_step_is_skipped) and not False"
)
#: The JAX run's time limit; it takes about 6 min alone on 2 cores, more beside the rest.
JAX_TIMEOUT_S = 900

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("jax") is None,
        reason="jax is not installed: the JAX-backend tests need `pip install jax[cpu]` "
        "(included in keras-sam[test])",
    ),
    pytest.mark.skipif(
        keras.backend.backend() != "tensorflow",
        reason="launches the JAX subprocess from the default TensorFlow run",
    ),
]


def _env(backend: str) -> dict:
    env = dict(os.environ)
    env["KERAS_BACKEND"] = backend
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _run(command: list, backend: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=ROOT, env=_env(backend), capture_output=True, text=True, timeout=timeout
    )


def test_method_tests_pass_on_jax():
    result = _run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", JAX_SELECTION,
         *JAX_TESTS],
        "jax",
        JAX_TIMEOUT_S,
    )
    summary = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, f"the JAX test run failed:\n{summary}"
    assert " passed" in result.stdout, summary


def test_tensorflow_and_jax_give_the_same_weights(tmp_path):
    files = {}
    for backend in ("tensorflow", "jax"):
        files[backend] = tmp_path / f"{backend}.npz"
        result = _run([sys.executable, str(CROSS_BACKEND_SCRIPT), str(files[backend])],
                      backend, 300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tf_weights, jax_weights = (np.load(files[b]) for b in ("tensorflow", "jax"))
    assert str(tf_weights["backend"]) == "tensorflow"
    assert str(jax_weights["backend"]) == "jax"
    names = sorted(k for k in tf_weights.files if k != "backend")
    assert names == sorted(k for k in jax_weights.files if k != "backend")
    assert {n.split("/")[0] for n in names} == {*keras_sam.registry.METHODS, "sam_splits"}
    for name in names:
        np.testing.assert_allclose(jax_weights[name], tf_weights[name], atol=1e-5,
                                   err_msg=name)
