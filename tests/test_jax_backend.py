"""The JAX backend, from the default (TensorFlow) test run.

`python -m pytest` runs the suite on TensorFlow. `test_method_tests_pass_on_jax`
runs the method-level tests (numeric references, the contract suite,
keras.distribution on four host devices) in a subprocess with ``KERAS_BACKEND=jax``;
tests/test_cross_backend.py compares every method's weights with TensorFlow's.
Skipped, with the reason, when jax is not installed. Under ``KERAS_BACKEND=jax``
(the subprocess itself) this module is skipped: the tests run directly there.
"""

from __future__ import annotations

import importlib.util

import keras
import pytest

from tests.helpers import run_tests_under_backend

#: What the JAX run covers: the numeric references of SAM, ASAM and Layer-wise SAM
#: (whose per-cut compiled steps are backend-specific), keras.distribution
#: (tests/jax_backend), sharpness, BatchNorm statistics, and the part of the contract
#: and hardening suites that exercises backend code (compiled steps, BatchNorm,
#: skipped steps, mixed precision, saving). Every other method (K-SAM, the zoo, the
#: Momentum-SAM optimizers) is checked on JAX by tests/test_cross_backend.py: its
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
    "tests/test_keras_habits.py",
]
#: ``jit_compile=False`` variants are left out: on JAX they run eagerly, op by op, which
#: costs minutes; the backend code only an eager step runs (the host-side skip, the
#: fused per-variable updates) has its own tests in tests/jax_backend.
JAX_SELECTION = (
    "(not (test_contract or test_hardening or test_keras_habits)"
    " or (test_rho_zero_equals_base_optimizer and True)"
    " or test_batchnorm_statistics_updated_once"
    " or test_non_finite_batch_skips_the_step"
    " or test_keras_file_round_trip"
    " or (test_keras_habits and (weights or checkpoint or backup_and_restore))"
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


def test_method_tests_pass_on_jax():
    run_tests_under_backend(JAX_TESTS, JAX_SELECTION, "jax", JAX_TIMEOUT_S)
