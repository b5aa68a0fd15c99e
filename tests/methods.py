"""The methods the contract suite runs through its checks, from `keras_sam.registry`.

A new method gets the shared checks (ρ = 0 equals the base optimizer, BatchNorm
updated once, XLA, serialization, distribution, bad input, ...) by its registry
entry, with the entry's ``contract`` hyperparameters; two test-only
configurations are added below. Wrappers are fitted as ``Wrapper(model)``;
optimizers as ``model`` compiled with them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import keras

import keras_sam

LR = 0.05


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    #: (model, rho) -> the keras.Model to compile and fit.
    trainer: Callable[[keras.Model, Any], keras.Model]
    #: (rho, **optimizer_kwargs) -> the optimizer to compile the trainer with.
    optimizer: Callable[..., keras.optimizers.Optimizer]
    #: (**optimizer_kwargs) -> the base optimizer the method must equal at rho = 0.
    base_optimizer: Callable[..., keras.optimizers.Optimizer]
    #: (model, **kwargs) -> construct with bad keyword arguments (for error tests).
    construct: Callable[..., Any]
    is_wrapper: bool = True
    #: () -> the callbacks `fit` needs for this method (MSAMCallback for MSAM).
    callbacks: Callable[[], list] = list
    #: How far (absolute) the weights at rho = 0 may be from the base optimizer's.
    base_atol: float = 1e-6

    def __str__(self) -> str:
        return self.name


@keras.saving.register_keras_serializable(package="keras_sam_tests")
def kernels_only(variable: Any) -> bool:
    """A `perturb` predicate: only the kernels of Dense/Conv layers."""
    return variable.name == "kernel"


def _sgd(**kwargs: Any) -> keras.optimizers.Optimizer:
    return keras.optimizers.SGD(LR, momentum=0.9, **kwargs)


def _adam(**kwargs: Any) -> keras.optimizers.Optimizer:
    return keras.optimizers.Adam(LR, **kwargs)


#: The base optimizer a method must equal at ρ = 0, per registry base. AdamW-MSAM runs
#: without weight decay here (see the registry), so its base is plain Adam.
BASE_OPTIMIZERS = {"sgd": _sgd, "adamw": _adam}


def _label(cls: type, extra: dict) -> str:
    return cls.__name__ + "".join(f"-{k}={getattr(v, '__name__', v)}" for k, v in extra.items())


def _wrapper(cls: type, base: str = "sgd", **extra: Any) -> Method:
    return Method(
        name=_label(cls, extra),
        trainer=lambda model, rho: cls(model, rho=rho, **extra),
        optimizer=lambda rho, **kwargs: BASE_OPTIMIZERS[base](**kwargs),
        base_optimizer=BASE_OPTIMIZERS[base],
        construct=lambda model, **kwargs: cls(model, **{**extra, **kwargs}),
    )


def _optimizer(cls: type, base: str = "sgd", **extra: Any) -> Method:
    return Method(
        name=cls.__name__,
        trainer=lambda model, rho: model,
        optimizer=lambda rho, **kwargs: cls(LR, rho=rho, **extra, **kwargs),
        base_optimizer=BASE_OPTIMIZERS[base],
        construct=lambda model, **kwargs: cls(**{**extra, **kwargs}),
        is_wrapper=False,
        callbacks=lambda: [keras_sam.callbacks.MSAMCallback()],
    )


#: Methods that step with kernels rounding differently from their base optimizer:
#: TensorFlow's in-place ResourceApplyAdam (AdamW-MSAM without XLA) forms 1 - beta in
#: float32 (1 - beta_2 = 0.99998713e-3 for 0.999), a relative 1.3e-5 in each step;
#: the suite's few dozen steps of lr 0.05 then differ by up to about 1e-5.
BASE_ATOL = {keras_sam.optimizers.AdamWMSAM: 2e-5}


def _from_registry(entry: keras_sam.registry.Method) -> Method:
    make = _optimizer if entry.is_optimizer else _wrapper
    method = make(entry.cls, entry.base, **entry.preset, **entry.contract)
    return dataclasses.replace(method, base_atol=BASE_ATOL.get(entry.cls, method.base_atol))


_REGISTERED = [
    _from_registry(entry)
    for entry in keras_sam.registry.METHODS.values()
    if entry.contract is not None
]

WRAPPERS = [m for m in _REGISTERED if m.is_wrapper] + [
    # Layer-wise SAM with every layer chosen (it reduces to SAM).
    _wrapper(keras_sam.LayerwiseSAM, num_layers=1.0, layers=None),
    # The variable filter every wrapper takes (a serializable predicate: the contract
    # models have no normalization layer for perturb="normalization").
    _wrapper(keras_sam.SAM, perturb=kernels_only),
]
OPTIMIZERS = [m for m in _REGISTERED if not m.is_wrapper]
METHODS = WRAPPERS + OPTIMIZERS
