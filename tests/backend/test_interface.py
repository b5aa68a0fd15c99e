"""The backend boundary: every backend package implements `Backend`, and nothing
outside `keras_sam/backend/` reaches a backend library or Keras internals."""

import ast
import inspect
import pathlib

import keras
import numpy as np
import pytest

from keras_sam import backend
from keras_sam.backend import common, interface

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "keras_sam"
BACKENDS = ("tensorflow", "jax", "torch", "unsupported")
#: Modules that must stay backend-free (the issue's list, plus the rest of the package).
BACKEND_FREE = sorted(
    p for p in PACKAGE.rglob("*.py") if "backend" not in p.relative_to(PACKAGE).parts
)
BACKEND_LIBRARIES = ("tensorflow", "jax", "torch")


def _protocol_parameters():
    return {
        name: [p for p in inspect.signature(getattr(interface.Backend, name)).parameters][1:]
        for name in interface.FUNCTIONS
    }


def _module_names(package: str) -> dict:
    """Top-level names of a backend package: {name: parameters, or None if not a def}."""
    tree = ast.parse((PACKAGE / "backend" / package / "__init__.py").read_text())
    names = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            args = node.args
            names[node.name] = [a.arg for a in args.posonlyargs + args.args]
            if args.vararg:
                names[node.name].append(args.vararg.arg)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = None
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                names[alias.asname or alias.name] = "imported"
    return names


def test_the_interface_lists_what_the_package_uses():
    assert len(interface.FUNCTIONS) >= 20
    assert "forward_and_gradients" in interface.FUNCTIONS
    assert "loss_scale" not in interface.FUNCTIONS  # written once, in common


@pytest.mark.parametrize("package", BACKENDS)
def test_every_backend_defines_every_function(package):
    names = _module_names(package)
    missing = [name for name in interface.FUNCTIONS if name not in names]
    assert not missing, f"backend/{package} lacks {missing}"


@pytest.mark.parametrize("package", ["tensorflow", "jax", "torch"])
def test_full_backends_take_the_interface_parameters(package):
    names = _module_names(package)
    expected = _protocol_parameters()
    wrong = {
        name: (names[name], params)
        for name, params in expected.items()
        if isinstance(names[name], list) and names[name] != [p.lstrip("*") for p in params]
    }
    assert not wrong, f"backend/{package}: parameters differ from the interface: {wrong}"


def test_the_active_backend_is_complete():
    from keras_sam import backend

    for name in interface.FUNCTIONS:
        assert callable(getattr(backend, name)), name


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


@pytest.mark.parametrize("path", BACKEND_FREE, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_backend_library_outside_the_backend_package(path):
    if path.name == "internals.py":  # the one module that reaches tf.__internal__, keras.src
        return
    for module in _imports(path):
        assert module.split(".")[0] not in BACKEND_LIBRARIES, f"{path.name} imports {module}"
        assert not module.startswith("keras_sam.backend."), f"{path.name} imports {module}"
        assert not module.startswith("keras.src"), f"{path.name} imports {module}"


def test_the_package_exports_exactly_the_interface():
    from keras_sam import backend

    exported = set(backend.__all__) - {"FUNCTIONS", "SUPPORTED_BACKENDS", "check_supported"}
    assert exported == {*interface.FUNCTIONS, "loss_scale"}


@pytest.mark.parametrize("count", [1, 3])
def test_sequenced_leaves_the_value_as_it_is(count):
    """The dependency it adds (`common.sequenced`, what a traced step gets) is 0 for
    every number, infinities included, and reads the first entry of each tensor."""
    tensors = [np.array([[np.inf, 1.0]], "float32"), np.array([-3.0], "float32"), np.zeros((0,))]
    value = common.sequenced(keras.ops.convert_to_tensor(0.25), tensors[:count])
    assert float(keras.ops.convert_to_numpy(value)) == 0.25
    tensors[0][0, 0] = np.nan
    value = common.sequenced(keras.ops.convert_to_tensor(0.25), tensors[:count])
    assert np.isnan(float(keras.ops.convert_to_numpy(value)))


def test_sequenced_adds_nothing_to_an_eager_step():
    value = keras.ops.convert_to_tensor(0.25)
    assert backend.sequenced(value, [keras.ops.ones((2,))]) is value


def test_traced_for_xla_only_while_xla_compiles_the_step():
    value = keras.ops.convert_to_tensor(0.25)
    assert backend.traced_for_xla(value) is False
    seen = []

    def record(tensor):
        seen.append(backend.traced_for_xla(tensor))
        return tensor

    name = keras.backend.backend()
    if name == "tensorflow":
        import tensorflow as tf

        tf.function(record, jit_compile=True)(value)
        tf.function(record, jit_compile=False)(value)
        assert seen == [True, False]
    elif name == "jax":
        import jax

        jax.jit(record)(value)
        assert seen == [True]
