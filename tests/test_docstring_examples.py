"""Every public class and function has an example in its docstring, and it runs.

The examples are doctests (``>>>``), executed here with the active backend: what
users copy from the API reference cannot rot unseen.
"""

from __future__ import annotations

import doctest
import inspect

import pytest

import keras_sam
from keras_sam import callbacks, ops, optimizers, registry, rho, sharpness, validation
from keras_sam import models as models_module

#: The modules of the public API (the docs' API reference, plus the registry and the
#: argument checks new methods use).
PUBLIC_MODULES = [
    keras_sam, models_module, optimizers, callbacks, sharpness, rho, ops, registry, validation,
]


def _public_objects():
    seen = {}
    for module in PUBLIC_MODULES:
        names = getattr(module, "__all__", None) or [
            n for n in vars(module) if not n.startswith("_")
        ]
        for name in names:
            value = getattr(module, name)
            if not (inspect.isclass(value) or inspect.isfunction(value)):
                continue
            if not getattr(value, "__module__", "").startswith("keras_sam"):
                continue  # re-exported Keras or typing names
            seen.setdefault(f"{value.__module__}.{value.__qualname__}", value)
    return sorted(seen.items())


OBJECTS = _public_objects()


def test_the_public_api_is_enumerated():
    names = {name.rsplit(".", 1)[1] for name, _ in OBJECTS}
    assert {"SAM", "MSAM", "MSAMCallback", "hessian_eigenvalues", "dual_vector", "get"} <= names
    assert len(OBJECTS) >= 40


@pytest.mark.parametrize(("name", "value"), OBJECTS, ids=[name for name, _ in OBJECTS])
def test_docstring_example_runs(name, value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    tests = [t for t in doctest.DocTestFinder(recurse=False).find(value, name) if t.examples]
    assert tests, f"{name} has no `>>>` example in its docstring"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} failing example(s); see the output above"
