"""The registry lists every public method once, and `keras_sam.get` finds them."""

import inspect
import pathlib

import keras
import pytest

import keras_sam
from keras_sam.registry import METHODS, markdown_table
from tests.helpers import plain_model

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


def _public_classes():
    wrappers = [
        value for value in vars(keras_sam).values()
        if inspect.isclass(value) and issubclass(value, keras_sam.SharpnessAwareTrainer)
        and value is not keras_sam.SharpnessAwareTrainer
    ]
    optimizers = [
        value for value in vars(keras_sam.optimizers).values()
        if inspect.isclass(value) and issubclass(value, keras.optimizers.Optimizer)
        and value is not keras_sam.optimizers.MomentumPerturbationOptimizer
    ]
    return wrappers + optimizers


@pytest.mark.parametrize("cls", _public_classes(), ids=lambda c: c.__name__)
def test_every_public_method_is_registered(cls):
    assert any(entry.cls is cls for entry in METHODS.values()), (
        f"{cls.__name__} is public but not in keras_sam.registry.METHODS"
    )


@pytest.mark.parametrize("entry", METHODS.values(), ids=lambda e: e.name)
def test_entries_build_and_their_docs_page_exists(entry):
    page = entry.page.split("#")[0]
    assert (DOCS / page).is_file(), page
    trainer, optimizer = entry.build(plain_model(), learning_rate=0.05)
    if entry.is_optimizer:
        assert isinstance(optimizer, entry.cls)
        assert optimizer.rho == entry.rho
    else:
        assert isinstance(trainer, entry.cls)
        assert trainer.rho == entry.rho
        assert type(optimizer).__name__ == {"sgd": "SGD", "adamw": "AdamW"}[entry.base]
    for name, value in {**entry.preset, **entry.hyperparameters}.items():
        assert getattr(trainer if not entry.is_optimizer else optimizer, name) == value


def test_get_finds_methods_by_name_and_class_name():
    model = plain_model()
    assert isinstance(keras_sam.get("SAM", model), keras_sam.SAM)
    assert isinstance(keras_sam.get("friendly_sam", model, sigma=0.5), keras_sam.FriendlySAM)
    assert keras_sam.get("FriendlySAM", model).sigma == 1.0  # the class default
    assert keras_sam.get("sam-on", model).perturb == "normalization"
    assert keras_sam.get("sam-on", model, perturb=None).perturb is None
    optimizer = keras_sam.get("adamw-msam", learning_rate=0.01, rho=0.2)
    assert isinstance(optimizer, keras_sam.optimizers.AdamWMSAM) and optimizer.rho == 0.2
    trainer = keras_sam.SAM(model)
    assert keras_sam.get(trainer) is trainer


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("adam",), {}, ValueError, "identifier"),
        ((3,), {}, ValueError, "identifier"),
        (("sam",), {}, TypeError, "model"),
        (("msam", plain_model()), {}, TypeError, "model"),
        (("sam", plain_model()), {"rho": -1.0}, ValueError, "rho"),
    ],
)
def test_get_refuses_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        keras_sam.get(*args, **kwargs)


def test_the_docs_table_of_methods_is_the_registry():
    text = (DOCS / "concepts" / "choosing.md").read_text(encoding="utf-8")
    start, end = "<!-- methods-table:start -->", "<!-- methods-table:end -->"
    assert start in text and end in text
    table = text.split(start)[1].split(end)[0].strip()
    assert table == markdown_table(), (
        "docs/concepts/choosing.md is out of date: paste `python -m keras_sam.registry`"
    )
