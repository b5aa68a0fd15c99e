"""The PyTorch backend, from the default (TensorFlow) test run.

`test_method_tests_pass_on_pytorch` runs the method-level tests in a subprocess
with ``KERAS_BACKEND=torch``: the numeric references of SAM, ASAM, K-SAM and
Layer-wise SAM, the Momentum-SAM optimizers' references, the PyTorch-specific
tests (tests/torch_backend) and the parts of the contract and hardening suites
that exercise backend code. tests/test_cross_backend.py checks every other method
(the zoo) against TensorFlow's weights. The GitHub workflow's PyTorch job
(``KERAS_SAM_TEST_BACKEND=torch bash .ci/run``) runs all of tests/models,
tests/optimizers and the contract suite on PyTorch. Skipped, with the reason, when
torch is not installed.
"""

from __future__ import annotations

import importlib.util

import keras
import pytest

from tests.helpers import run_tests_under_backend

TORCH_TESTS = [
    "tests/models/test_sam.py",
    "tests/models/test_asam.py",
    "tests/models/test_ksam.py",
    "tests/models/test_layerwise.py",
    "tests/optimizers",
    "tests/torch_backend",
    "tests/test_contract.py",
    "tests/test_hardening.py",
    "tests/test_batchnorm.py",
    "tests/test_keras_habits.py",
]
#: As for JAX: from the contract and hardening suites, the tests that exercise backend
#: code; torch.compile of a plain model (minutes of compilation on a CPU) only in the
#: PyTorch job.
TORCH_SELECTION = (
    "(not (test_contract or test_hardening or test_keras_habits)"
    " or test_rho_zero_equals_base_optimizer"
    " or test_batchnorm_statistics_updated_once"
    " or test_non_finite_batch_skips_the_step"
    " or test_keras_file_round_trip"
    " or (test_keras_habits and (weights or checkpoint or backup_and_restore))"
    " or test_overflowing_step_is_skipped) and not torch_compile"
)
TORCH_TIMEOUT_S = 900

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("torch") is None,
        reason="torch is not installed: the PyTorch-backend tests need `pip install torch` "
        "(.ci/run installs the CPU build)",
    ),
    pytest.mark.skipif(
        keras.backend.backend() != "tensorflow",
        reason="launches the PyTorch subprocess from the default TensorFlow run",
    ),
]


def test_method_tests_pass_on_pytorch():
    run_tests_under_backend(TORCH_TESTS, TORCH_SELECTION, "torch", TORCH_TIMEOUT_S)
