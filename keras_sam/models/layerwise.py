"""Layer-wise SAM: perturb only the few critical layers (Lee, KDD 2024)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_sam import backend, internals
from keras_sam import rho as rho_lib
from keras_sam.models.trainer import Ascent, SharpnessAwareTrainer
from keras_sam.ops import dual_vector, global_norm
from keras_sam.validation import check_count_or_fraction, check_int, check_real

RADII = ("joint", "per_layer", "scaled")

LayersLike = float | Sequence[Any] | Callable[[keras.layers.Layer], bool] | None


@keras.saving.register_keras_serializable(package="keras_sam")
class LayerwiseSAM(SharpnessAwareTrainer):
    r"""Layer-wise SAM: SAM's perturbation on only the K layers with the largest gradients.

    A *layer* is one Keras layer with all its trainable variables (kernel and
    bias, BatchNorm γ and β, ...). Let S be the K chosen layers and g_S the
    clean gradient restricted to them. One step is

    .. math::

        \epsilon_l = \rho \sqrt{\frac{n}{n_S}} \frac{g_l}{\lVert g_S \rVert_2}
        \ (l \in S), \quad
        \epsilon_l = 0 \ (l \notin S), \quad
        w \leftarrow \mathrm{opt}\big(w, \nabla L_B(w + \epsilon)\big)

    with n the model's trainable parameters and n_S those of the chosen layers
    (``radius="scaled"``, the default: ε has the root-mean-square per parameter
    that SAM's ρ-ball over the whole model has, so SAM's ρ carries over). With
    S = all layers this is exactly `SAM`, and with K = 0 it is the base
    optimizer. ``radius="joint"`` is one ρ-ball over the chosen layers (no
    √(n/n_S)); ``radius="per_layer"`` gives each chosen layer its own ρ-ball,
    ε_l = ρ g_l/‖g_l‖, so ‖ε‖ = ρ√K.

    What the paper establishes (arXiv 2503.14205): perturbing only the few
    *critical* layers, those with the largest gradient norm (usually on the
    output side), suppresses the gradient norm of the whole model at near-SGD
    cost, without harming SAM's convergence rate. The following are **choices of
    this package**, not the paper's (which we could not read in full):

    * **Ranking signal, free of cost.** Each step's descent gradient (the one
      handed to the optimizer, computed for every variable anyway) gives one L2
      norm per layer; layers are ranked by an exponential moving average of these
      norms (``ranking_decay``), kept in non-trainable wrapper variables (saved
      with the model, XLA-friendly). Non-finite steps do not update it.
    * **Re-selection** every ``reselect_every`` optimizer steps (default 1).
      Before the first re-selection there is no history: the K output-side-most
      layers (last in the model's variable order) are used.
    * **Candidates: the output-side quarter of the layers** by default
      (``layers=0.25``). The paper finds the critical layers mostly on the
      output side, and the step's cost grows with the depth of the lowest
      chosen layer (see the cost below): a large-gradient layer near the input
      makes the step cost SAM's. ``layers=None`` searches every layer.
    * **K**: ``num_layers``, a count or a fraction of the candidate layers
      (default 0.25, rounded up).
    * **Scaled radius** by default, so that the method reduces to SAM and
      SAM's ρ keeps SAM's gain. With one ρ-ball over a few small layers
      (``"joint"``) the perturbation is far weaker than SAM's. Measured with
      ``python -m benchmarks.generalization`` (an MLP on digits, 40 % of the
      labels flipped, 60 epochs, 3 seeds, ρ chosen on validation): the defaults
      at SAM's ρ = 0.4 keep 83 % of SAM's 17-point gain (90.8 % test accuracy,
      SGD 76.7 %, SAM 93.7 %); the joint radius on the same output layer kept
      about a third of it at SAM's ρ and needed ρ ≈ 4 to catch up.
    * **Truncated ascent, reused activations.** Let the *cut* be the highest of
      at most ``max_cuts`` precomputed depths at or below the lowest chosen
      layer (spread over the layers that can be the lowest chosen one: all but
      the top K - 1). The clean backward asks only for the gradients of the
      layers from the cut up, so backpropagation stops there; layers below the
      cut are not perturbed (ε = 0 is known when the step is compiled), so the
      perturbed pass computes the same activations below the cut as the clean
      pass, and XLA (``jit_compile=True``, the default on TensorFlow) computes
      them once. On JAX, XLA does not merge the two passes through reductions
      such as BatchNorm's: the perturbed forward is recomputed from the first
      such layer below the cut up. The perturbed backward is full: the descent
      gradient of every layer is needed. Each cut depth in use is one compiled
      step (compiled on first use, at most ``len(cut_points)``); the selection
      is renewed between steps, on the host, so re-selection never retraces.
    * **Re-selection timing.** With ``steps_per_execution`` > 1 the layers are
      re-chosen after the execution in which a re-selection fell due.

    Cost with S above the cut, counting a backward as two forwards and F for
    the whole model's forward: about 3F + 3F·(fraction of the model above the
    cut) under XLA (without XLA, add up to F: the perturbed forward below the
    cut is recomputed),
    against SGD's 3F and SAM's 6F. So the step costs nearly SGD's when the
    critical layers are on the output side, and SAM's when the lowest chosen
    layer is the first one.

    Under `tf.distribute` every replica perturbs the same layers: the ranking
    variables are written from replica 0 (``aggregation="only_first_replica"``).
    With ``perturbation_scope="replica"`` (default) layers are ranked by replica
    0's descent gradient and each replica's ascent gradient is its own. With
    ``"global"`` the ascent gradient and the ranking signal are summed over
    replicas (one extra all-reduce of the gradients per step), so N replicas
    compute exactly what one device computes on the global batch.

    Args:
        model: the `keras.Model` to train. Its variables must exist (functional
            and Sequential models with an ``Input`` have them; call a subclassed
            model once on a batch, ``model(x[:1])``, first).
        rho: radius ρ >= 0 (float or a schedule of the step). Defaults to `0.05`.
        num_layers: how many layers to perturb: an int >= 0 (a count; more than
            the candidates means all of them), or a float in [0, 1] (a fraction
            of the candidates, rounded up). Defaults to `0.25`.
        reselect_every: re-rank the layers every this many optimizer steps
            (int >= 1). Defaults to `1`.
        layers: which layers may be chosen (the candidates). A float in (0, 1]
            (default `0.25`): the output-side fraction of the model's layers
            (rounded up; a layer is one that owns trainable variables itself,
            nested models are entered; ordered as the model's variables).
            ``None``: every such layer. Or a list of layers or layer names (each
            with all its trainable variables, e.g. a whole residual block), or a
            predicate ``layer -> bool`` over every such layer. Other variables
            are never perturbed.
        radius: ``"scaled"`` (default; one ball over the chosen layers of radius
            ρ√(n/n_S), SAM's perturbation size per parameter; reduces to SAM),
            ``"joint"`` (one ρ-ball over the chosen layers; reduces to SAM) or
            ``"per_layer"`` (a ρ-ball per chosen layer).
        ranking_decay: decay β in [0, 1) of the moving average of the layer
            gradient norms; 0 ranks by the last step alone. Defaults to `0.9`.
        max_cuts: at most this many depths (int >= 1) at which the ascent
            backward can be cut; each is one compiled variant of the step. 1
            turns truncation off (the ascent gradient of every candidate is
            computed, one compiled step). Defaults to `8`.
        **kwargs: the options every wrapper takes (``perturbation_scope``,
            ``perturb``, ``num_batch_splits``; see `SharpnessAwareTrainer`) and
            `keras.Model`'s (e.g. ``name``).

    Raises:
        TypeError: ``model`` not a `keras.Model`; an argument of a wrong type.
        ValueError: an argument out of range; ``model`` not built; ``layers``
            naming a layer that is not in ``model``, has no trainable variables
            or overlaps another; no candidate layer at all; bad ``rho``.

    Examples:
        >>> import keras, numpy as np, keras_sam
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="head")])
        >>> trainer = keras_sam.LayerwiseSAM(model, rho=0.05, num_layers=1, layers=None)
        >>> trainer.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        ...                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> x, y = np.random.rand(32, 4), np.random.randint(0, 3, 32)
        >>> history = trainer.fit(x, y, batch_size=8, epochs=2, verbose=0)
        >>> len(history.history["loss"])
        2
        >>> trainer.selected_layers  # the layers perturbed at the next step
        ['head']

    References:
        Sunwoo Lee. Layer-wise Adaptive Gradient Norm Penalizing Method for
        Efficient and Accurate Deep Learning. KDD 2024.
        [arXiv:2503.14205](https://arxiv.org/abs/2503.14205)
    """

    def __init__(
        self,
        model: keras.Model,
        *,
        rho: rho_lib.RhoLike = 0.05,
        num_layers: float | int = 0.25,
        reselect_every: int = 1,
        layers: LayersLike = 0.25,
        radius: str = "scaled",
        ranking_decay: float = 0.9,
        max_cuts: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, rho=rho, **kwargs)
        self.num_layers = check_count_or_fraction(
            num_layers, "num_layers", min_count=0, what="the candidate layers"
        )
        self.reselect_every = check_int(reselect_every, "reselect_every", low=1)
        self.max_cuts = check_int(max_cuts, "max_cuts", low=1)
        if radius not in RADII:
            raise ValueError(f"`radius` must be one of {RADII}, got {radius!r}.")
        self.radius = radius
        self.ranking_decay = check_real(
            ranking_decay, "ranking_decay", low=0.0, high=1.0, high_open=True
        )
        self._layers_argument = layers
        self._layers_config = layers
        if model.built and model.trainable_variables:
            # A bad `layers` fails here, not at `fit`; a callable is saved as names.
            _, self._layers_config = _candidate_units(model, layers)
        else:
            _check_layers_type(layers)

    def build_state(self) -> None:
        """The candidate layers, the selection and the ranking signal (per layer)."""
        units, self._layers_config = _candidate_units(self.model, self._layers_argument)
        self._candidates = _Untracked(tuple(units))  # the layers stay the model's
        n = len(units)
        self._num_chosen_layers = _count(self.num_layers, n)
        # The lowest chosen layer is never above n - K: no cut is needed there.
        self.cut_points = _cut_points(n - self._num_chosen_layers + 1, self.max_cuts)
        initial = np.zeros((n,), "float32")
        initial[n - self._num_chosen_layers :] = 1.0  # output side until the first ranking
        self._selection = self.add_weight(
            shape=(n,),
            initializer=keras.initializers.Constant(initial),
            trainable=False,
            aggregation="only_first_replica",
            name="layerwise_selection",
        )
        self._grad_norms = self.add_weight(
            shape=(n,),
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
            name="layerwise_grad_norms",
        )

    # ------------------------------------------------------------------ public
    @property
    def candidate_layers(self) -> list[str]:
        """Names of the layers that may be chosen, input side first."""
        return [layer.name for layer, _ in self._units]

    @property
    def selected_layers(self) -> list[str]:
        """Names of the layers the next step perturbs, input side first."""
        _sync_jax_state(self)
        mask = keras.ops.convert_to_numpy(self._selection.value)
        return [layer.name for (layer, _), m in zip(self._units, mask) if m > 0]

    @property
    def layer_grad_norms(self) -> dict[str, float]:
        """The ranking signal: moving average of each candidate's gradient norm.

        Not bias-corrected (the correction is the same for every layer, so the
        ranking does not depend on it).
        """
        _sync_jax_state(self)
        norms = keras.ops.convert_to_numpy(self._grad_norms.value)
        return {layer.name: float(v) for (layer, _), v in zip(self._units, norms)}

    @property
    def _units(self) -> tuple:
        """The candidate (layer, its variables) pairs, input side first."""
        self._require_state("the candidate layers")
        return self._candidates.items

    @property
    def num_chosen_layers(self) -> int:
        """K, the number of layers each step perturbs (``num_layers`` resolved)."""
        self._require_state("num_chosen_layers")
        return self._num_chosen_layers

    @property
    def num_chosen(self) -> int:
        """The former name of `num_chosen_layers`, kept working."""
        return self.num_chosen_layers

    # ------------------------------------------------------------------ the step
    def step_variants(self) -> list:
        """One compiled step per cut depth.

        The ascent backward stops at the cut, and the layers below it are not
        perturbed, so both passes compute the same activations below the cut;
        inside one XLA program (``jit_compile=True``, and always on JAX) the
        perturbed pass reuses them instead of recomputing them. Both savings
        need the cut to be static, so each cut depth in use gets its own
        compiled step (at most ``len(cut_points)``, each compiled on first use),
        and the selection is renewed between calls (`_reselect`), never inside a
        step.
        """
        return list(self.cut_points)

    def choose_step_variant(self, read: Callable) -> int:
        return self._cut_below(read(self._selection))

    def after_train_call(self, read: Callable, write: Callable, steps_before: int) -> None:
        self._reselect(steps_before, read, write)

    def ascent(self, x: Any, y: Any, sample_weight: Any, state_before: list) -> Ascent:
        """Clean pass; ascent gradients of the candidate layers from the cut up only."""
        variables = self.trainable_variables
        groups = self._unit_positions(variables)
        cut = self.step_variant or 0  # 0 (no cut) outside a per-cut train function
        above = [p for group in groups[cut:] for p in group] if self.num_chosen_layers else []
        loss, y_pred, computed = backend.forward_and_gradients(
            self, x, y, sample_weight, [variables[p] for p in above]
        )
        grads = [None] * len(variables)
        for position, gradient in zip(above, computed):
            grads[position] = gradient
        return Ascent(loss, y_pred, grads, (x, y, sample_weight))

    def perturbation(self, grads: list, variables: list) -> list:
        """ε on the chosen layers only; ``None`` (w unchanged) everywhere else."""
        rho = self.current_rho()
        mask = self._selection.value
        masked = [None] * len(grads)
        groups = self._unit_positions(variables)
        for unit, group in enumerate(groups):
            for p in group:
                if grads[p] is not None:
                    masked[p] = ops.cast(grads[p], "float32") * mask[unit]
        if self.radius == "joint":
            return dual_vector(masked, rho)
        if self.radius == "scaled":
            return dual_vector(masked, rho * self._radius_scale(groups, variables, mask))
        epsilon = [None] * len(grads)
        for group in groups:
            for p, e in zip(group, dual_vector([masked[p] for p in group], rho)):
                epsilon[p] = e
        return epsilon

    @staticmethod
    def _radius_scale(groups: list, variables: list, mask: Any) -> Any:
        """√(n / n_S): n trainable parameters in all, n_S in the chosen layers (≥ 1)."""
        total = sum(math.prod(v.shape) for v in variables)
        sizes = [sum(math.prod(variables[p].shape) for p in group) for group in groups]
        chosen = ops.sum(mask * ops.convert_to_tensor(np.asarray(sizes, "float32")))
        return ops.sqrt(float(total) / ops.maximum(chosen, 1.0))

    def after_step(self, sam_grads: list) -> None:
        """Updates the moving average of the layers' gradient norms (the ranking)."""
        groups = self._unit_positions(self.trainable_variables)
        if self.perturbation_scope == "global":
            # Rank by the global batch's gradient, as one device would (one more
            # all-reduce of the gradients per step, the price of exactness).
            sam_grads = backend.all_reduce_sum(sam_grads)
        norms = ops.stack([global_norm([sam_grads[p] for p in group]) for group in groups])
        old = self._grad_norms.value
        decay = self.ranking_decay
        averaged = ops.where(ops.all(ops.isfinite(norms)), decay * old + (1.0 - decay) * norms, old)
        self._grad_norms.assign(averaged)

    def _reselect(self, iterations_before: int, read: Callable, write: Callable) -> None:
        """After a call of the train function: the top-K layers by the ranking, if due.

        Due when the optimizer's step count crossed a multiple of
        ``reselect_every`` during the call (one step per call unless
        ``steps_per_execution`` > 1; a skipped non-finite step does not count).
        """
        if self.num_chosen_layers in (0, len(self._units)):
            return  # nothing to rank
        iterations = self._optimizer_steps(read)
        if iterations // self.reselect_every <= iterations_before // self.reselect_every:
            return
        norms = np.asarray(read(self._grad_norms), "float32")
        selection = np.zeros_like(norms)
        selection[np.argsort(-norms, kind="stable")[: self.num_chosen_layers]] = 1.0
        write(self._selection, selection)

    # ------------------------------------------------------------------ helpers
    def _cut_below(self, selection: Any) -> int:
        """The highest cut depth at or below the lowest chosen layer."""
        chosen = np.flatnonzero(np.asarray(selection) > 0)
        lowest = int(chosen[0]) if chosen.size else len(self._units)
        return max(cut for cut in self.cut_points if cut <= lowest)

    def _unit_positions(self, variables: Sequence[Any]) -> list[list[int]]:
        """Per candidate layer, the positions of its variables in ``variables``."""
        position = {id(v): i for i, v in enumerate(variables)}
        return [
            [position[id(v)] for v in unit_variables if id(v) in position]
            for _, unit_variables in self._units
        ]

    # ------------------------------------------------------------------ config
    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "num_layers": self.num_layers,
                "reselect_every": self.reselect_every,
                "layers": self._layers_config,
                "radius": self.radius,
                "ranking_decay": self.ranking_decay,
                "max_cuts": self.max_cuts,
            }
        )
        return config


# ---------------------------------------------------------------------- helpers
def _sync_jax_state(trainer: keras.Model) -> None:
    """On JAX, during `fit` the variables hold no values until the state is synced back
    (Keras does so for callbacks that read `self.model`); the next step re-reads them."""
    sync = getattr(trainer, "jax_state_sync", None)
    if sync is not None:
        sync()


def _count(num_layers: float | int, n: int) -> int:
    if isinstance(num_layers, int):
        return min(num_layers, n)
    return min(n, math.ceil(num_layers * n - 1e-9))


def _cut_points(n: int, max_cuts: int) -> list[int]:
    """At most ``max_cuts`` evenly spaced indices in [0, n), always including 0."""
    count = min(max_cuts, n)
    return sorted({(j * n) // count for j in range(count)})


def _own_trainable_variables(layer: keras.layers.Layer) -> list:
    nested = {id(v) for sub in internals.all_layers(layer) for v in sub.trainable_variables}
    return [v for v in layer.trainable_variables if id(v) not in nested]


@dataclasses.dataclass(frozen=True)
class _Untracked:
    """Holds objects without Keras tracking them (Keras tracks layers, variables and
    the lists, dicts and tuples holding them, but not other objects)."""

    items: tuple


def _check_layers_type(layers: Any) -> None:
    """A `TypeError` for a ``layers`` of none of the accepted kinds; a `ValueError`
    for a float outside (0, 1]."""
    if layers is None or isinstance(layers, (list, tuple)):
        return
    if isinstance(layers, numbers.Real) and not isinstance(layers, (bool, numbers.Integral)):
        if not math.isfinite(layers) or not 0.0 < float(layers) <= 1.0:
            raise ValueError(
                "`layers` as a float is the output-side fraction of the layers and must be "
                f"in (0, 1], got {layers}."
            )
        return
    if callable(layers) and not isinstance(layers, keras.layers.Layer):
        return
    raise TypeError(
        "`layers` must be a float in (0, 1] (an output-side fraction of the layers), "
        "None (every layer), a list of layers or layer names, or a predicate "
        f"`layer -> bool`, got {type(layers).__name__}."
    )


def _candidate_units(model: keras.Model, layers: LayersLike) -> tuple[list, Any]:
    """(layer, its variables) pairs, sorted input side first; and ``layers`` for the config."""
    all_layers = list(internals.all_layers(model))
    order = {id(v): i for i, v in enumerate(model.trainable_variables)}
    default = [(layer, _own_trainable_variables(layer)) for layer in all_layers]
    default = [(layer, vs) for layer, vs in default if vs]
    default.sort(key=lambda unit: min(order[id(v)] for v in unit[1]))
    if layers is None:
        units, config = default, None
    elif isinstance(layers, numbers.Real) and not isinstance(layers, (bool, numbers.Integral)):
        _check_layers_type(layers)
        units, config = default[len(default) - _count(float(layers), len(default)) :], layers
    elif callable(layers) and not isinstance(layers, keras.layers.Layer):
        units = [(layer, vs) for layer, vs in default if layers(layer)]
        config = [layer.name for layer, _ in units]
    elif isinstance(layers, (list, tuple)):
        units = [_resolve(model, all_layers, item) for item in layers]
        config = [layer.name for layer, _ in units]
    else:
        _check_layers_type(layers)
    if not units:
        raise ValueError("`layers`: no candidate layer with trainable variables in `model`.")
    seen: dict[int, str] = {}
    for layer, variables in units:
        for v in variables:
            if id(v) in seen:
                raise ValueError(
                    f"`layers`: {layer.name!r} shares the variable {v.path!r} with "
                    f"{seen[id(v)]!r}; candidate layers must not overlap."
                )
            seen[id(v)] = layer.name
    units.sort(key=lambda unit: min(order[id(v)] for v in unit[1]))
    if isinstance(config, list):
        config = [layer.name for layer, _ in units]
    return units, config


def _resolve(model: keras.Model, all_layers: list, item: Any) -> tuple:
    if isinstance(item, str):
        matches = [layer for layer in all_layers if layer.name == item]
        if not matches:
            raise ValueError(f"`layers`: no layer named {item!r} in `model`.")
        if len(matches) > 1:
            raise ValueError(
                f"`layers`: the name {item!r} is ambiguous in `model`; pass the layer object."
            )
        layer = matches[0]
    elif isinstance(item, keras.layers.Layer):
        if not any(layer is item for layer in all_layers):
            raise ValueError(f"`layers`: the layer {item.name!r} is not part of `model`.")
        layer = item
    else:
        raise TypeError(
            f"`layers` entries must be layers or layer names, got {type(item).__name__}."
        )
    variables = list(layer.trainable_variables)
    if not variables:
        raise ValueError(f"`layers`: the layer {layer.name!r} has no trainable variables.")
    return layer, variables
