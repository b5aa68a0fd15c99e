"""Every public method of keras_sam, listed once.

Each entry says what the package knows about a method beyond its class: the
hyperparameters the demo, the benchmarks and the shared tests use, the base
optimizer it is compared against, its cost model, its reference and its docs
page. The contract test suite, the cross-backend tests, the demo, the
benchmarks and the docs' table of methods all read `METHODS`; a test fails when a
public wrapper or optimizer is missing here. Adding a method is its own file, one
entry below, its reference test and its docs page.

`get` is the Keras-style lookup (as `keras.optimizers.get`):

Examples:
    >>> import keras, keras_sam
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> type(keras_sam.get("gsam", model, rho=0.1)).__name__
    'GSAM'
    >>> keras_sam.get("sam-on", model).perturb
    'normalization'
    >>> type(keras_sam.get("msam", learning_rate=0.1)).__name__
    'MSAM'
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any

import keras

from keras_sam.models.asam import ASAM
from keras_sam.models.esam import ESAM
from keras_sam.models.friendly_sam import FriendlySAM
from keras_sam.models.gsam import GSAM
from keras_sam.models.ksam import KSAM
from keras_sam.models.layerwise import LayerwiseSAM
from keras_sam.models.looksam import LookSAM
from keras_sam.models.sam import SAM
from keras_sam.models.trainer import SharpnessAwareTrainer
from keras_sam.models.wsam import WSAM
from keras_sam.optimizers.adamw_msam import AdamWMSAM
from keras_sam.optimizers.msam import MSAM

#: Momentum of the SGD base optimizer (and of MSAM) in the demo and benchmarks.
SGD_MOMENTUM = 0.9
#: Weight decay of the AdamW base optimizer (and of AdamW-MSAM) there.
ADAMW_WEIGHT_DECAY = 0.004


def _frozen(mapping: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(mapping or {}))


@dataclasses.dataclass(frozen=True)
class Base:
    """A base optimizer methods are compared against.

    Examples:
        >>> type(BASES["sgd"].make(0.1)).__name__
        'SGD'
    """

    name: str
    title: str
    #: learning rate -> the optimizer.
    make: Callable[[Any], keras.optimizers.Optimizer]


BASES: dict[str, Base] = {
    "sgd": Base("sgd", "SGD-momentum", lambda lr: keras.optimizers.SGD(lr, momentum=SGD_MOMENTUM)),
    "adamw": Base(
        "adamw",
        "AdamW",
        lambda lr: keras.optimizers.AdamW(lr, weight_decay=ADAMW_WEIGHT_DECAY),
    ),
}


@dataclasses.dataclass(frozen=True)
class Method:
    """One public method: a train-step wrapper or a Momentum-SAM optimizer.

    Examples:
        >>> entry = METHODS["looksam"]
        >>> entry.cls.__name__, entry.cost, dict(entry.hyperparameters)
        ('LookSAM', '1 + 1/k', {'alpha': 0.7, 'k': 5})
    """

    #: The lookup name (`get`, ``--methods`` of the demo and benchmarks).
    name: str
    #: The display name.
    title: str
    #: The class (a `SharpnessAwareTrainer` or an optimizer).
    cls: type
    #: The key of its base optimizer in `BASES`.
    base: str
    #: ρ in the demo and benchmarks.
    rho: float
    #: Its other hyperparameters there (and in `get`, below the user's).
    hyperparameters: Mapping[str, Any]
    #: The ρ values a benchmark's validation search tries.
    rho_grid: tuple[float, ...]
    #: Step cost as a multiple of the base optimizer's (the cost model).
    cost: str
    #: Memory beyond the base optimizer's, in copies of the parameters.
    memory: str
    #: The paper.
    reference: str
    #: Its page in the docs, relative to docs/ (with an anchor where the page has several).
    page: str
    #: Arguments that define the method in terms of its class (SAM-ON is `SAM` with
    #: ``perturb="normalization"``); `get` and `build` always pass them.
    preset: Mapping[str, Any] = dataclasses.field(default_factory=_frozen)
    #: Hyperparameters the shared contract suite uses, so that ρ = 0 equals the base
    #: optimizer and every code path runs on its tiny models; ``None``: the entry is an
    #: option of another entry's class, run by the suite through that entry.
    contract: Mapping[str, Any] | None = dataclasses.field(default_factory=_frozen)

    @property
    def is_optimizer(self) -> bool:
        """True for the Momentum-SAM optimizers (no wrapper; compile the model with it)."""
        return not issubclass(self.cls, SharpnessAwareTrainer)

    @property
    def options(self) -> str:
        """The arguments beyond ρ, as ``name=value`` text."""
        return self.describe()

    def describe(self, **overrides: Any) -> str:
        """The arguments beyond ρ with ``overrides`` applied, as ``name=value`` text."""
        return ", ".join(f"{k}={v!r}" for k, v in self._arguments(overrides).items())

    def build(
        self, model: keras.Model, learning_rate: Any, rho: Any = None, **overrides: Any
    ) -> tuple[keras.Model, keras.optimizers.Optimizer]:
        """``(the model to fit, the optimizer to compile it with)`` for this method.

        ``rho`` defaults to `rho`; ``overrides`` replace `hyperparameters`.

        Examples:
            >>> import keras
            >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
            >>> trainer, optimizer = METHODS["ksam"].build(model, learning_rate=0.05)
            >>> trainer.k, type(optimizer).__name__
            (0.25, 'SGD')
        """
        return (
            self.make_trainer(model, rho, **overrides),
            self.make_optimizer(learning_rate, rho, **overrides),
        )

    def make_trainer(self, model: keras.Model, rho: Any = None, **overrides: Any) -> keras.Model:
        """The wrapper around ``model`` (``model`` itself for an optimizer method)."""
        if self.is_optimizer:
            return model
        return self.cls(model, rho=self._rho(rho), **self._arguments(overrides))

    def make_optimizer(
        self, learning_rate: Any, rho: Any = None, **overrides: Any
    ) -> keras.optimizers.Optimizer:
        """The optimizer to compile with: the method's, or its base optimizer."""
        if self.is_optimizer:
            return self.cls(learning_rate, rho=self._rho(rho), **self._arguments(overrides))
        return BASES[self.base].make(learning_rate)

    def _rho(self, rho: Any) -> Any:
        return self.rho if rho is None else rho

    def _arguments(self, overrides: Mapping[str, Any]) -> dict:
        return {**self.preset, **self.hyperparameters, **overrides}


def _method(
    name: str,
    title: str,
    cls: type,
    *,
    rho: float,
    rho_grid: tuple[float, ...],
    cost: str,
    memory: str,
    reference: str,
    page: str,
    base: str = "sgd",
    hyperparameters: Mapping[str, Any] | None = None,
    preset: Mapping[str, Any] | None = None,
    contract: Mapping[str, Any] | None = _frozen(),
) -> Method:
    return Method(
        name=name,
        title=title,
        cls=cls,
        base=base,
        rho=rho,
        hyperparameters=_frozen(hyperparameters),
        rho_grid=rho_grid,
        cost=cost,
        memory=memory,
        reference=reference,
        page=page,
        preset=_frozen(preset),
        contract=None if contract is None else _frozen(contract),
    )


_METHODS = [
    _method(
        "sam",
        "SAM",
        SAM,
        rho=0.05,
        rho_grid=(0.05, 0.1, 0.2, 0.4),
        cost="2",
        memory="1",
        reference="Foret et al., ICLR 2021 (arXiv:2010.01412)",
        page="api/wrappers.md",
    ),
    _method(
        "asam",
        "ASAM",
        ASAM,
        rho=0.5,
        rho_grid=(0.2, 0.5, 1.0, 2.0),
        cost="2",
        memory="1",
        hyperparameters={"eta": 0.01},
        reference="Kwon et al., ICML 2021 (arXiv:2102.11600)",
        page="api/wrappers.md",
    ),
    _method(
        # k = 1.0 in the contract suite: the whole batch, so that ρ = 0 equals the base
        # optimizer; tests/models/test_ksam.py covers k < 1.
        "ksam",
        "K-SAM",
        KSAM,
        rho=0.05,
        rho_grid=(0.02, 0.05, 0.1, 0.2),
        cost="1/3 + 2k",
        memory="1",
        hyperparameters={"k": 0.25},
        contract={"k": 1.0},
        reference="Ni et al., 2022 (arXiv:2210.12864)",
        page="api/wrappers.md",
    ),
    _method(
        # One layer in the contract suite: the ascent backward is cut.
        "layerwise",
        "Layer-wise SAM",
        LayerwiseSAM,
        rho=0.05,
        rho_grid=(0.05, 0.1, 0.2, 0.4),
        cost="1 + a (share of the model above the lowest chosen layer)",
        memory="≤ 1",
        hyperparameters={"num_layers": 0.25},
        contract={"num_layers": 1},
        reference="Lee, KDD 2024 (arXiv:2503.14205)",
        page="api/wrappers.md",
    ),
    _method(
        "gsam",
        "GSAM",
        GSAM,
        rho=0.05,
        rho_grid=(0.02, 0.05, 0.1, 0.2),
        cost="2",
        memory="2",
        hyperparameters={"alpha": 0.1},
        contract={"alpha": 0.4},
        reference="Zhuang et al., ICLR 2022 (arXiv:2203.08065)",
        page="api/methods/gsam.md",
    ),
    _method(
        # k = 2 in the contract suite: the SAM step and the reuse step both run.
        "looksam",
        "LookSAM",
        LookSAM,
        rho=0.05,
        rho_grid=(0.02, 0.05, 0.1, 0.2),
        cost="1 + 1/k",
        memory="3 on its SAM steps, 1 between",
        hyperparameters={"alpha": 0.7, "k": 5},
        contract={"k": 2},
        reference="Liu et al., CVPR 2022 (arXiv:2203.02714)",
        page="api/methods/looksam.md",
    ),
    _method(
        # γ = 1 in the contract suite keeps every sample (ρ = 0 equals the base
        # optimizer); tests/models/test_zoo.py covers the selection.
        "esam",
        "ESAM",
        ESAM,
        rho=0.05,
        rho_grid=(0.02, 0.05, 0.1, 0.2),
        cost="(4 + 3γ)/3",
        memory="1",
        hyperparameters={"beta": 0.6, "gamma": 0.5},
        contract={"beta": 0.6, "gamma": 1.0, "seed": 3},
        reference="Du et al., ICLR 2022 (arXiv:2110.03141)",
        page="api/methods/esam.md",
    ),
    _method(
        "friendly-sam",
        "Friendly-SAM",
        FriendlySAM,
        rho=0.05,
        rho_grid=(0.02, 0.05, 0.1, 0.2),
        cost="2",
        memory="2",
        hyperparameters={"sigma": 1.0, "lmbda": 0.9},
        contract={"sigma": 0.7},
        reference="Li et al., CVPR 2024 (arXiv:2403.12350)",
        page="api/methods/friendly-sam.md",
    ),
    _method(
        "wsam",
        "WSAM",
        WSAM,
        rho=0.05,
        rho_grid=(0.02, 0.05, 0.1, 0.2),
        cost="2",
        memory="2",
        hyperparameters={"gamma": 0.9},
        reference="Yue et al., KDD 2023 (arXiv:2305.15817)",
        page="api/methods/wsam.md",
    ),
    _method(
        "sam-on",
        "SAM-ON",
        SAM,
        rho=0.5,
        rho_grid=(0.2, 0.5, 1.0, 2.0),
        cost="≈ 1.7–1.9",
        memory="normalization parameters only",
        preset={"perturb": "normalization"},
        contract=None,
        reference="Mueller et al., NeurIPS 2023 (arXiv:2306.04226)",
        page="api/methods/options.md",
    ),
    _method(
        "msam",
        "MSAM",
        MSAM,
        rho=0.3,
        rho_grid=(0.3, 1.0, 2.0, 3.0),
        cost="1",
        memory="0",
        hyperparameters={"momentum": SGD_MOMENTUM},
        contract={"momentum": SGD_MOMENTUM},
        reference="Becker, Altrock and Risse, 2024 (arXiv:2401.12033)",
        page="api/optimizers.md",
    ),
    _method(
        # No weight decay in the contract suite: AdamWMSAM decays after the Adam step
        # (the paper's order), Keras' AdamW before it; without decay the two agree.
        "adamw-msam",
        "AdamW-MSAM",
        AdamWMSAM,
        base="adamw",
        rho=0.3,
        rho_grid=(0.1, 0.3, 1.0, 3.0),
        cost="1",
        memory="0",
        hyperparameters={"weight_decay": ADAMW_WEIGHT_DECAY},
        contract={"weight_decay": None},
        reference="Becker, Altrock and Risse, 2024 (arXiv:2401.12033)",
        page="api/optimizers.md",
    ),
]

#: Every public method, by `Method.name`, in the order the docs list them.
METHODS: dict[str, Method] = {method.name: method for method in _METHODS}


def get(identifier: Any, model: keras.Model | None = None, **hyperparameters: Any) -> Any:
    """A method by name, configured as the registry presets it (Keras-style lookup).

    Args:
        identifier: a `METHODS` name (``"sam"``, ``"friendly-sam"``; case and
            ``_``/``-`` do not matter) or class name (``"FriendlySAM"``), or an
            already built wrapper or optimizer (returned as is).
        model: the `keras.Model` to wrap (wrappers only).
        **hyperparameters: the method's arguments; they replace the preset ones
            (e.g. SAM-ON's ``perturb="normalization"``), and every other argument
            keeps the class's default.

    Returns:
        The wrapper around ``model``, or the optimizer.

    Raises:
        ValueError: ``identifier`` names no method.
        TypeError: a wrapper without ``model``, or an optimizer with one.

    Examples:
        >>> import keras, keras_sam
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        >>> keras_sam.get("looksam", model, k=3).k
        3
    """
    if isinstance(identifier, (keras.Model, keras.optimizers.Optimizer)):
        return identifier
    method = _lookup(identifier)
    kwargs = {**method.preset, **hyperparameters}
    if method.is_optimizer:
        if model is not None:
            raise TypeError(
                f"{method.title} is an optimizer: compile `model` with it instead of "
                "passing `model` to `get`."
            )
        return method.cls(**kwargs)
    if model is None:
        raise TypeError(f"{method.title} wraps a keras.Model: pass it as `model`.")
    return method.cls(model, **kwargs)


def _lookup(identifier: Any) -> Method:
    if isinstance(identifier, str):
        key = identifier.lower().replace("_", "-")
        for method in METHODS.values():
            if key == method.name or (identifier == method.cls.__name__ and not method.preset):
                return method
    raise ValueError(
        f"`identifier` must name a keras_sam method, one of {sorted(METHODS)} (or a class "
        f"name), got {identifier!r}."
    )


def markdown_table() -> str:
    """The docs' table of methods (docs/concepts/choosing.md), from `METHODS`.

    Examples:
        >>> print(markdown_table().splitlines()[2])
        | SAM | [`SAM`][keras_sam.SAM] | 2 | 1 | Foret et al., ICLR 2021 (arXiv:2010.01412) |
    """
    rows = [
        "| method | class | ≈ step cost | extra memory (parameter copies) | reference |",
        "|---|---|---|---|---|",
    ]
    for method in METHODS.values():
        module = "keras_sam.optimizers" if method.is_optimizer else "keras_sam"
        preset = "".join(f" ({k}={v!r})" for k, v in method.preset.items())
        rows.append(
            f"| {method.title} | [`{method.cls.__name__}`][{module}.{method.cls.__name__}]"
            f"{preset} | {method.cost} | {method.memory} | {method.reference} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
