"""Every Keras and TensorFlow internal keras_sam relies on, and nothing else.

keras_sam is written against Keras' public API. Where Keras offers no public way
to do something the package needs, the private attribute or module is reached
here, and only here (ruff's private-member rule, SLF001, enforces this for the
rest of the package). `check` verifies that each of them still exists, so an
upgrade of Keras that renames one fails a test with the installed version named,
instead of changing what keras_sam does without a word.

Each function says what it reaches and why no public API does the job.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import keras


# --------------------------------------------------------------------------- models
def all_layers(model: keras.Model, include_self: bool = False) -> list:
    """Every layer nested in ``model``, depth first (``Layer._flatten_layers``).

    ``model.layers`` lists only the top level of a subclassed or nested model.
    """
    return list(model._flatten_layers(include_self=include_self, recursive=True))


def layer_seed_generators(layer: keras.layers.Layer) -> list:
    """The `keras.random.SeedGenerator`s a layer owns (``Layer._seed_generators``)."""
    return list(getattr(layer, "_seed_generators", ()))


def symbolic_build(model: keras.Model, data_batch: Any) -> None:
    """Builds ``model`` and its compiled metrics from one batch (``Trainer._symbolic_build``)."""
    model._symbolic_build(data_batch=data_batch)


def default_symbolic_build(model: keras.Model, iterator: Any, data_batch: Any) -> None:
    """Keras' own build-before-the-first-step (``Trainer._maybe_symbolic_build``, of
    the TensorFlow trainer), which a wrapper extends by overriding the method of the
    same name."""
    keras.Model._maybe_symbolic_build(model, iterator=iterator, data_batch=data_batch)


def loss_tracker(model: keras.Model) -> Any:
    """The ``loss`` metric `fit` reports (``Trainer._loss_tracker``); a step that
    computes its loss without ``compute_loss`` updates it itself."""
    return model._loss_tracker


@contextlib.contextmanager
def losses_override(model: keras.Model, losses: list) -> Iterator[None]:
    """``model.losses`` reads ``losses`` inside (``Layer._losses_override``): the
    `add_loss` terms of a stateless call, for ``compute_loss`` to add."""
    model._losses_override = list(losses)
    try:
        yield
    finally:
        model._losses_override = []


def distribute_strategy(model: Any) -> Any:
    """The TensorFlow strategy ``model`` was created under, or None
    (``Trainer._distribute_strategy``; the public property returns the default
    strategy instead of None)."""
    return getattr(model, "_distribute_strategy", None)


@contextlib.contextmanager
def train_step_replaced(model: keras.Model, step: Callable) -> Iterator[None]:
    """``model.train_step`` is ``step`` inside; nothing of it is left afterwards.

    Keras reads ``train_step`` when it makes or traces a train function
    (TensorFlow, JAX) or each time the function runs (PyTorch), so a train function
    runs ``step`` when it is both made and called inside this scope.
    """
    model.train_step = step
    try:
        yield
    finally:
        del model.train_step


@contextlib.contextmanager
def state_unlocked(layer: keras.layers.Layer) -> Iterator[None]:
    """Inside, a built ``layer`` accepts new variables (``Layer._tracker``, locked
    once a layer is built; Keras unlocks it the same way to quantize a layer)."""
    locked = layer._tracker.locked
    layer._tracker.unlock()
    try:
        yield
    finally:
        if locked:
            layer._tracker.lock()


# --------------------------------------------------------------------------- weights files
#: The group of a ``.weights.h5`` file holding a wrapper's own variables.
WRAPPER_GROUP = "keras_sam"


def compiled_without_config(model: keras.Model, compile: Callable[[], None]) -> None:
    """Runs ``compile()`` on ``model`` without keeping its compile config
    (``model._compile_config``), so that the model's own `.keras` file loads as an
    uncompiled model: a compile with no optimizer does not load."""
    compile()
    if hasattr(model, "_compile_config"):
        del model._compile_config


def write_model_weights(path: str, model: keras.Model, optimizer: Any, wrapper: Any) -> None:
    """A ``.weights.h5`` file in ``model``'s own layout (what ``model.save_weights``
    writes, so ``model.load_weights`` reads it), with ``optimizer``'s variables in the
    ``optimizer`` group and ``wrapper``'s own variables in `WRAPPER_GROUP`.

    Written with Keras' own state walk (``saving_lib._save_state``, ``H5IOStore``).
    """
    from keras.src.saving import saving_lib

    store = saving_lib.H5IOStore(path, mode="w")
    try:
        skip = {id(getattr(model, "optimizer", None))}  # the model's own, if compiled
        saving_lib._save_state(model, store, None, "", skip)
        if optimizer is not None:
            saving_lib._save_state(optimizer, store, None, "optimizer", set())
        if wrapper.variables_of_its_own():
            wrapper.save_own_variables(store.make(WRAPPER_GROUP))
    finally:
        store.close()


def confirm_overwrite(path: str) -> bool:
    """Keras' interactive question before overwriting ``path``
    (``io_utils.ask_to_proceed_with_overwrite``)."""
    from keras.src.utils import io_utils

    return bool(io_utils.ask_to_proceed_with_overwrite(path))


def read_model_weights(
    path: str, model: keras.Model, optimizer: Any, wrapper: Any, skip_mismatch: bool
) -> None:
    """Reads a file in ``model``'s layout (`write_model_weights`, or
    ``model.save_weights``): the model's variables, then the optimizer's and the
    wrapper's where the file has them (a model's own file has neither of the latter).

    Raises:
        ValueError: the file does not hold ``model``'s variables (Keras' message).
    """
    import h5py
    from keras.src.saving import saving_lib

    with h5py.File(path, "r") as file:
        groups = set(file.keys())
    store = saving_lib.H5IOStore(path, mode="r")
    try:
        failed: set = set()
        errors: dict = {}
        skip = {id(getattr(model, "optimizer", None))}
        saving_lib._load_state(model, store, None, "", skip_mismatch, skip, failed, errors)
        if failed:
            saving_lib._raise_loading_failure(errors, warn_only=skip_mismatch)
        if optimizer is not None and "optimizer" in groups:
            saving_lib._load_state(optimizer, store, None, "optimizer", skip_mismatch, set())
        if WRAPPER_GROUP in groups and wrapper.variables_of_its_own():
            wrapper.load_own_variables(store.get(WRAPPER_GROUP))
    finally:
        store.close()


# --------------------------------------------------------------------------- BatchNorm
_moments_overrides = threading.local()  # per thread: {id(layer): [moments, ...]}
_moments_installed: dict[int, int] = {}  # id(layer): contexts holding the dispatcher
_moments_lock = threading.Lock()


@contextlib.contextmanager
def batchnorm_moments_replaced(model: keras.Model, moments: Callable) -> Iterator[None]:
    """Inside, every BatchNormalization layer of ``model`` computes the batch moments
    it normalizes with (in training mode) as ``moments(layer, inputs, mask, default)``
    (``BatchNormalization._moments``; ``default(inputs, mask)`` is Keras' own).

    The replacement holds for the calling thread only: MirroredStrategy runs its
    replicas in threads that share the layers and take turns at each collective
    (a synchronized BatchNorm's all-reduce), so one replica's context can open
    while another's is still open on the same layers.
    """
    layers = [
        layer for layer in all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)
    ]
    stacks = _moments_overrides.__dict__.setdefault("stacks", {})
    with _moments_lock:
        for layer in layers:
            _moments_installed[id(layer)] = _moments_installed.get(id(layer), 0) + 1
            if _moments_installed[id(layer)] == 1:  # plain attribute: no Keras tracking
                object.__setattr__(layer, "_moments", _moments_dispatcher(layer))
    for layer in layers:
        stacks.setdefault(id(layer), []).append(moments)
    try:
        yield
    finally:
        for layer in layers:
            stacks[id(layer)].pop()
        with _moments_lock:
            for layer in layers:
                _moments_installed[id(layer)] -= 1
                if _moments_installed[id(layer)] == 0:
                    del _moments_installed[id(layer)]
                    object.__delattr__(layer, "_moments")


def _moments_dispatcher(layer: keras.layers.BatchNormalization) -> Callable:
    """``layer._moments`` running the calling thread's innermost replacement, or
    Keras' own on a thread with none."""
    default = functools.partial(type(layer)._moments, layer)

    def dispatch(inputs: Any, mask: Any) -> Any:
        stack = getattr(_moments_overrides, "stacks", {}).get(id(layer))
        if not stack:
            return default(inputs, mask)
        return stack[-1](layer, inputs, mask, default)

    return dispatch


def batchnorm_reduction_axes(layer: keras.layers.BatchNormalization) -> list[int]:
    """The axes a BatchNormalization layer reduces over (``_reduction_axes``)."""
    return list(layer._reduction_axes)


# --------------------------------------------------------------------------- variables
def raw_value(variable: keras.Variable) -> Any:
    """The value a variable holds outside any `StatelessScope` (``Variable._value``)."""
    return variable._value


# --------------------------------------------------------------------------- optimizers
def iterations_variable(optimizer: keras.optimizers.Optimizer) -> keras.Variable:
    """The step counter variable, counting micro-batches under gradient accumulation
    (``optimizer._iterations``; the public ``iterations`` divides it)."""
    return optimizer._iterations


def optimizer_variables_order(optimizer: keras.optimizers.Optimizer) -> list:
    """The trainable variables the optimizer was built for, in its slot order
    (``optimizer._trainable_variables``)."""
    return list(optimizer._trainable_variables)


def variable_index(optimizer: keras.optimizers.Optimizer, variable: Any) -> int:
    """The position of ``variable`` in the optimizer's slots (``_get_variable_index``)."""
    return optimizer._get_variable_index(variable)


def variable_key(optimizer: keras.optimizers.Optimizer, variable: Any) -> Any:
    """The optimizer's identity key of ``variable`` (``_var_key``)."""
    return optimizer._var_key(variable)


def uses_weight_decay(optimizer: keras.optimizers.Optimizer, variable: Any) -> bool:
    """Whether ``exclude_from_weight_decay`` lets ``variable`` decay (``_use_weight_decay``)."""
    return optimizer._use_weight_decay(variable)


def optimizer_strategy(optimizer: keras.optimizers.Optimizer) -> Any:
    """The TensorFlow strategy the optimizer was built under
    (``optimizer._distribution_strategy``)."""
    return optimizer._distribution_strategy


def base_optimizer_keyword_args() -> str:
    """Keras' docstring text for the arguments every optimizer takes
    (``keras.src.optimizers.optimizer.base_optimizer_keyword_args``)."""
    from keras.src.optimizers import optimizer

    return optimizer.base_optimizer_keyword_args


# --------------------------------------------------------------------------- tf.distribute
def in_multi_worker_mode(strategy: Any) -> bool:
    """Whether a MultiWorkerMirroredStrategy spans several workers
    (``extended._in_multi_worker_mode``)."""
    return strategy.extended._in_multi_worker_mode()


def merge_call(fn: Callable, strategy: Any, *args: Any) -> Any:
    """``fn(distribution, *args)`` in cross-replica context, or directly where the
    strategy needs no merge call (``tf.__internal__.distribute.interim.maybe_merge_call``,
    which Keras' own TensorFlow optimizer uses)."""
    import tensorflow as tf

    return tf.__internal__.distribute.interim.maybe_merge_call(fn, strategy, *args)


def strategy_supports_no_merge_call() -> bool:
    """Whether the current strategy applies updates without a merge call
    (``tf.__internal__.distribute.strategy_supports_no_merge_call``)."""
    import tensorflow as tf

    return tf.__internal__.distribute.strategy_supports_no_merge_call()


# --------------------------------------------------------------------------- the check
def _required() -> list[tuple[str, Callable[[], bool]]]:
    """(what, does it exist) for every internal above, on the active backend."""

    def has(owner: Any, name: str) -> Callable[[], bool]:
        return lambda: hasattr(owner, name)

    def model_attribute(name: str) -> Callable[[], bool]:
        def check() -> bool:
            model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
            model.compile(optimizer="sgd", loss="mse")
            return hasattr(model, name)

        return check

    def optimizer_attribute(name: str) -> Callable[[], bool]:
        def check() -> bool:
            optimizer = keras.optimizers.SGD()
            optimizer.build([keras.Variable(1.0)])
            return hasattr(optimizer, name)

        return check

    def weights_walk() -> bool:
        from keras.src.saving import saving_lib
        from keras.src.utils import io_utils

        names = ("_save_state", "_load_state", "_raise_loading_failure", "H5IOStore")
        asks = hasattr(io_utils, "ask_to_proceed_with_overwrite")
        return asks and all(hasattr(saving_lib, name) for name in names)

    def batchnorm_axes() -> bool:
        layer = keras.layers.BatchNormalization()
        layer.build((2, 3))
        return hasattr(layer, "_reduction_axes")

    def keyword_args() -> bool:
        return isinstance(base_optimizer_keyword_args(), str)

    checks = [
        ("Layer._flatten_layers", has(keras.layers.Layer, "_flatten_layers")),
        ("Layer._tracker.unlock", lambda: hasattr(keras.layers.Dense(1)._tracker, "unlock")),
        ("saving_lib._save_state, _load_state, H5IOStore", weights_walk),
        ("BatchNormalization._moments", has(keras.layers.BatchNormalization, "_moments")),
        ("BatchNormalization._reduction_axes", batchnorm_axes),
        ("Layer._seed_generators", lambda: hasattr(keras.layers.Dropout(0.5), "_seed_generators")),
        ("Trainer._symbolic_build", has(keras.Model, "_symbolic_build")),
        ("Trainer._loss_tracker", model_attribute("_loss_tracker")),
        ("Layer._losses_override", model_attribute("_losses_override")),
        ("Trainer._compile_config", model_attribute("_compile_config")),
        ("Variable._value", lambda: hasattr(keras.Variable(1.0), "_value")),
        ("Optimizer._iterations", optimizer_attribute("_iterations")),
        ("Optimizer._trainable_variables", optimizer_attribute("_trainable_variables")),
        ("Optimizer._get_variable_index", optimizer_attribute("_get_variable_index")),
        ("Optimizer._var_key", optimizer_attribute("_var_key")),
        ("Optimizer._use_weight_decay", optimizer_attribute("_use_weight_decay")),
        ("keras.src.optimizers.optimizer.base_optimizer_keyword_args", keyword_args),
    ]
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        strategy = tf.distribute.get_strategy()
        checks += [
            ("Trainer._maybe_symbolic_build", has(keras.Model, "_maybe_symbolic_build")),
            ("Trainer._distribute_strategy", model_attribute("_distribute_strategy")),
            ("Optimizer._distribution_strategy", optimizer_attribute("_distribution_strategy")),
            (
                "StrategyExtended._in_multi_worker_mode",
                has(strategy.extended, "_in_multi_worker_mode"),
            ),
            (
                "tf.__internal__.distribute.interim.maybe_merge_call",
                has(tf.__internal__.distribute.interim, "maybe_merge_call"),
            ),
            (
                "tf.__internal__.distribute.strategy_supports_no_merge_call",
                has(tf.__internal__.distribute, "strategy_supports_no_merge_call"),
            ),
        ]
    return checks


def check() -> None:
    """Raises `RuntimeError` naming every internal the installed Keras lacks.

    Examples:
        >>> from keras_sam import internals
        >>> internals.check()  # silent on a supported Keras
    """
    missing = []
    for what, exists in _required():
        try:
            ok = exists()
        except (AttributeError, ImportError):
            ok = False
        if not ok:
            missing.append(what)
    if missing:
        raise RuntimeError(
            f"keras_sam relies on Keras internals that keras {keras.__version__} "
            f"({keras.backend.backend()} backend) does not have: {', '.join(missing)}. "
            "Install a Keras version keras_sam supports, or report this."
        )
