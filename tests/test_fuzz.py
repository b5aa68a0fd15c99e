"""Fuzzed constructor arguments: a valid value constructs, anything else raises a
ValueError/TypeError naming the argument — never another exception, never later."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import keras_sam
from tests.helpers import plain_model
from tests.methods import METHODS

MODEL = plain_model()

ANYTHING = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.lists(st.floats(0, 1), max_size=2),
)

fuzz = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(construct, name, value, valid):
    if valid:
        construct(**{name: value})
        return
    with pytest.raises((ValueError, TypeError)) as info:
        construct(**{name: value})
    assert name in str(info.value)


@pytest.mark.parametrize("method", METHODS, ids=str)
@fuzz
@given(rho=ANYTHING)
def test_rho(method, rho):
    valid = _real(rho) and math.isfinite(rho) and rho >= 0
    _check(lambda **kw: method.construct(MODEL, **kw), "rho", rho, valid)


@fuzz
@given(k=ANYTHING)
def test_ksam_k(k):
    valid = _real(k) and (
        (isinstance(k, int) and k >= 1) or (isinstance(k, float) and 0 < k <= 1)
    )
    _check(lambda **kw: keras_sam.KSAM(MODEL, **kw), "k", k, valid)


@fuzz
@given(eta=ANYTHING)
def test_asam_eta(eta):
    valid = _real(eta) and math.isfinite(eta) and eta >= 0
    _check(lambda **kw: keras_sam.ASAM(MODEL, **kw), "eta", eta, valid)


@fuzz
@given(momentum=ANYTHING)
def test_msam_momentum(momentum):
    valid = _real(momentum) and math.isfinite(momentum) and 0 <= momentum < 1
    _check(lambda **kw: keras_sam.optimizers.MSAM(**kw), "momentum", momentum, valid)


@fuzz
@given(num_layers=ANYTHING)
def test_layerwise_num_layers(num_layers):
    valid = _real(num_layers) and (
        (isinstance(num_layers, int) and num_layers >= 0)
        or (isinstance(num_layers, float) and 0 <= num_layers <= 1)
    )
    _check(lambda **kw: keras_sam.LayerwiseSAM(MODEL, **kw), "num_layers", num_layers, valid)


@pytest.mark.parametrize("scope", [None, 3, "Replica", "", "global ", "sync"])
def test_perturbation_scope(scope):
    with pytest.raises((ValueError, TypeError), match="perturbation_scope"):
        keras_sam.SAM(MODEL, perturbation_scope=scope)
