"""The registry the contract suite runs every method through.

A new method gets the shared checks (ρ = 0 equals the base optimizer, BatchNorm
updated once, XLA, serialization, distribution, bad input, ...) by being listed
here. Wrappers are fitted as ``Wrapper(model)``; optimizers as ``model`` compiled
with them.
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

    def __str__(self) -> str:
        return self.name


@keras.saving.register_keras_serializable(package="keras_sam_tests")
def kernels_only(variable: Any) -> bool:
    """A `perturb` predicate: only the kernels of Dense/Conv layers."""
    return variable.name == "kernel"


def _sgd(**kwargs: Any) -> keras.optimizers.Optimizer:
    return keras.optimizers.SGD(LR, momentum=0.9, **kwargs)


def _wrapper(cls: type, **extra: Any) -> Method:
    return Method(
        name=cls.__name__ + "".join(f"-{k}={getattr(v, '__name__', v)}" for k, v in extra.items()),
        trainer=lambda model, rho: cls(model, rho=rho, **extra),
        optimizer=lambda rho, **kwargs: _sgd(**kwargs),
        base_optimizer=_sgd,
        construct=lambda model, **kwargs: cls(model, **{**extra, **kwargs}),
    )


WRAPPERS = [
    _wrapper(keras_sam.SAM),
    _wrapper(keras_sam.ASAM),
    # k = 1.0 (the whole batch) so that "rho = 0 equals the base optimizer" holds;
    # tests/models/test_ksam.py covers k < 1.
    _wrapper(keras_sam.KSAM, k=1.0),
    # One layer (the backward is cut) and all layers (reduces to SAM).
    _wrapper(keras_sam.LayerwiseSAM, num_layers=1),
    _wrapper(keras_sam.LayerwiseSAM, num_layers=1.0, layers=None),
    _wrapper(keras_sam.GSAM, alpha=0.4),
    # k = 2: the SAM step and the reuse step both run in every test.
    _wrapper(keras_sam.LookSAM, k=2),
    # gamma = 1.0 keeps every sample (rho = 0 equals the base optimizer);
    # tests/models/test_zoo.py covers the selection.
    _wrapper(keras_sam.ESAM, beta=0.6, gamma=1.0, seed=3),
    _wrapper(keras_sam.FriendlySAM, sigma=0.7),
    _wrapper(keras_sam.WSAM),
    # The variable filter every wrapper takes (a serializable predicate: the contract
    # models have no normalization layer for perturb="normalization").
    _wrapper(keras_sam.SAM, perturb=kernels_only),
]

def _optimizer(cls: type, base: Callable[[], keras.optimizers.Optimizer], **extra: Any) -> Method:
    return Method(
        name=cls.__name__,
        trainer=lambda model, rho: model,
        optimizer=lambda rho, **kwargs: cls(LR, rho=rho, **extra, **kwargs),
        base_optimizer=base,
        construct=lambda model, **kwargs: cls(**{**extra, **kwargs}),
        is_wrapper=False,
        callbacks=lambda: [keras_sam.callbacks.MSAMCallback()],
    )


OPTIMIZERS = [
    _optimizer(keras_sam.optimizers.MSAM, _sgd, momentum=0.9),
    # weight_decay=None: AdamWMSAM decays after the Adam step (the paper's order),
    # Keras' AdamW before it; without decay the two must agree exactly.
    _optimizer(keras_sam.optimizers.AdamWMSAM, lambda **kwargs: keras.optimizers.Adam(LR, **kwargs),
               weight_decay=None),
]

METHODS = WRAPPERS + OPTIMIZERS
