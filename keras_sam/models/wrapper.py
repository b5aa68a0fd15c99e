"""`ModelWrapper`: a `keras.Model` that holds another one and trains it everywhere.

The base of every train-step wrapper. It delegates `call` to the wrapped model,
serializes it, and makes `fit`/`evaluate` work under
`tf.distribute.MultiWorkerMirroredStrategy`, where Keras 3's own `fit` fails even
for a plain model (keras-team/keras#20585) at two places:

1. the symbolic build reduces a *distributed* data batch with
   ``strategy.reduce("MEAN", batch, axis=None)``; here one local replica's batch is
   used instead (it only provides shapes);
2. the step logs are reduced with ``strategy.reduce("MEAN", v, axis=0)``, which needs
   rank-1 values; here each log is returned with shape ``[1]`` under that strategy.

Used on its own it runs Keras' standard one-pass train step, which is how an
optimizer-only method (Momentum-SAM) trains under MultiWorkerMirroredStrategy.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from typing import Any

import keras
from keras import ops

from keras_sam import backend, internals
from keras_sam.optimizers.momentum_perturbation import MomentumPerturbationOptimizer


@keras.saving.register_keras_serializable(package="keras_sam")
class ModelWrapper(keras.Model):
    """Holds a `keras.Model` as `.model`; `fit`, `evaluate`, `predict`, save as usual.

    Args:
        model: the `keras.Model` to train.
        **kwargs: passed to `keras.Model` (e.g. ``name``).

    Raises:
        TypeError: if ``model`` is not a `keras.Model`.

    Examples:
        Momentum-SAM under MultiWorkerMirroredStrategy (whose plain `fit`

        fails in Keras 3.15) builds the model inside the strategy's scope and trains
        ``ModelWrapper(model)``; without a strategy it trains exactly as the model:

        >>> import keras, numpy as np, keras_sam
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        >>> trainer = keras_sam.models.ModelWrapper(model)
        >>> trainer.compile(optimizer=keras_sam.optimizers.MSAM(0.05, rho=0.3), loss="mse")
        >>> history = trainer.fit(np.ones((8, 4)), np.ones((8, 1)), verbose=0,
        ...                       callbacks=[keras_sam.callbacks.MSAMCallback()])
        >>> trainer.model is model
        True
    """

    def __init__(self, model: keras.Model, **kwargs: Any) -> None:
        if not isinstance(model, keras.Model):
            raise TypeError(
                f"`model` must be a keras.Model, got {type(model).__name__}. Wrap layers "
                "in keras.Sequential or a functional model first."
            )
        super().__init__(**kwargs)
        self.model = model
        self._compiles_model = False  # whether `compile` compiled `model` for evaluation
        if model.built:
            self.built = True

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """`keras.Model.compile`; the wrapped model is compiled too, with the same loss
        and metrics (fresh copies) and no optimizer, so that ``model.evaluate`` works
        after the wrapper trained it. A model the user compiled is left as it is."""
        super().compile(*args, **kwargs)
        if self.model.compiled and not self._compiles_model:
            return
        arguments = inspect.signature(keras.Model.compile).bind(self, *args, **kwargs).arguments
        evaluation = {
            name: _fresh_metrics(value) if name.endswith("metrics") else value
            for name, value in arguments.items()
            if name not in ("self", "optimizer")
        }
        # Not kept in the model's own `.keras` file: it loads uncompiled, anywhere.
        internals.compiled_without_config(
            self.model, lambda: self.model.compile(optimizer=None, **evaluation)
        )
        self._compiles_model = True

    def compile_from_config(self, config: dict) -> None:
        """Compiles a loaded wrapper as Keras does (Keras skips a `compile` it did not
        write), with the optimizer's variables ready for the saved state."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        return self.model(inputs, training=training)

    def build(self, input_shape: Any = None) -> None:
        # A subclassed model without its own `build` is built by its first call.
        own_build = type(self.model).build is not keras.Model.build
        if not self.model.built and input_shape is not None and own_build:
            self.model.build(input_shape)
        self.built = True

    # ------------------------------------------------------------ MultiWorker fit
    def train_step(self, *args: Any) -> Any:
        return self._distributable_logs(super().train_step(*args))

    def test_step(self, *args: Any) -> Any:
        return self._distributable_logs(super().test_step(*args))

    def _distributable_logs(self, logs: Any) -> Any:
        """Rank-1 logs under MultiWorkerMirroredStrategy (see the module docstring)."""
        if not backend.is_multi_worker(internals.distribute_strategy(self)):
            return logs
        return {key: ops.reshape(value, [-1]) for key, value in logs.items()}

    def _maybe_symbolic_build(self, iterator: Any = None, data_batch: Any = None) -> None:
        """Builds the model from one batch before the first step is traced.

        Keras' TensorFlow trainer without a strategy defers building to the trace
        of the first step, where a wrapper's step would read the variables before
        the model's first call creates them (an unbuilt subclassed model); and under
        MultiWorkerMirroredStrategy it reduces a distributed batch it cannot reduce.
        Both cases build here from one local batch, as Keras does under a strategy.
        """
        strategy = internals.distribute_strategy(self)
        multi_worker = backend.is_multi_worker(strategy)
        unbuilt = backend.builds_model_in_first_step(strategy) and not all(
            layer.built for layer in internals.all_layers(self, include_self=True)
        )
        if not (multi_worker or unbuilt) or (iterator is None and data_batch is None):
            internals.default_symbolic_build(self, iterator, data_batch)
            return
        if iterator is not None:
            for *_, batches in iterator:  # (step, data) or (begin, end, data), by version
                data_batch = next(batches)
                break
        if multi_worker:
            data_batch = keras.tree.map_structure(
                lambda value: strategy.experimental_local_results(value)[0], data_batch
            )
        with strategy.scope() if multi_worker else contextlib.nullcontext():
            internals.symbolic_build(self, data_batch)

    # ------------------------------------------------------------ weights files
    def variables_of_its_own(self) -> list:
        """The wrapper's own variables (per-variable state of a variant), not the
        model's, the optimizer's or the metrics'."""
        model = {id(v) for v in self.model.weights}
        return [v for v in self.weights if id(v) not in model]

    def save_weights(self, filepath: Any, overwrite: bool = True, **kwargs: Any) -> None:
        """Writes a ``.weights.h5`` file in the **wrapped model's** layout.

        ``model.load_weights(filepath)`` reads it into the model, or into a fresh copy
        of it built for deployment; `ModelCheckpoint(save_weights_only=True)` and
        `BackupAndRestore`, which call this method, write such files too. The
        optimizer's state and the wrapper's own variables (LookSAM's directions,
        Layer-wise SAM's selection) are in the same file, where the model ignores
        them and `load_weights` on the wrapper restores them. A Momentum-SAM
        optimizer's perturbation is removed while the file is written (the file
        holds the clean weights). Sharded files (``max_shard_size``) keep Keras'
        layout of the wrapper.

        Examples:
            >>> import keras, numpy as np, keras_sam, tempfile, os
            >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
            >>> trainer = keras_sam.SAM(model)
            >>> trainer.compile(optimizer="sgd", loss="mse")
            >>> history = trainer.fit(np.ones((8, 4)), np.ones((8, 1)), verbose=0)
            >>> path = os.path.join(tempfile.mkdtemp(), "sam.weights.h5")
            >>> trainer.save_weights(path)
            >>> deployed = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
            >>> deployed.load_weights(path)
            >>> bool(np.allclose(deployed.get_weights()[0], model.get_weights()[0]))
            True
        """
        path = str(filepath)
        if kwargs.get("max_shard_size") is not None or not path.endswith(".weights.h5"):
            super().save_weights(filepath, overwrite=overwrite, **kwargs)
            return
        if not self.built:
            raise ValueError(
                "The model has no weights to save yet: train it or call it on a batch first."
            )
        if not overwrite and os.path.exists(path) and not internals.confirm_overwrite(path):
            return
        optimizer = getattr(self, "optimizer", None)
        with _clean_weights(optimizer):
            internals.write_model_weights(path, self.model, optimizer, self)

    def load_weights(self, filepath: Any, skip_mismatch: bool = False, **kwargs: Any) -> None:
        """Reads weights written by `save_weights` (the model's layout, with the
        optimizer's and the wrapper's state) or by ``model.save_weights`` (the model
        alone: a wrapper warm-started from a model's checkpoint); older files in the
        wrapper's own Keras layout are read too."""
        path = str(filepath)
        if not path.endswith(".weights.h5"):
            super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)
            return
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None and not optimizer.built and self.trainable_variables:
            optimizer.build(self.trainable_variables)  # its state is read with the weights
        try:
            internals.read_model_weights(path, self.model, optimizer, self, skip_mismatch)
        except ValueError as model_layout_error:
            try:  # a file of the wrapper's own Keras layout
                super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)
            except ValueError:
                raise model_layout_error from None

    # ------------------------------------------------------------ config
    def get_config(self) -> dict:
        config = super().get_config()
        config["model"] = keras.saving.serialize_keras_object(self.model)
        if self._compiles_model:  # the wrapper's `compile` compiles it again
            config["model"].pop("compile_config", None)
        return config

    @classmethod
    def from_config(cls, config: dict, custom_objects: Any = None) -> ModelWrapper:
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(
            config["model"], custom_objects=custom_objects
        )
        return cls(**config)


@contextlib.contextmanager
def _clean_weights(optimizer: Any) -> Iterator[None]:
    """The Momentum-SAM perturbation removed inside (nothing for other optimizers)."""
    while optimizer is not None and not isinstance(optimizer, MomentumPerturbationOptimizer):
        optimizer = getattr(optimizer, "inner_optimizer", None)
    if optimizer is None:
        yield
        return
    with optimizer.unperturbed():
        yield


def _fresh_metrics(metrics: Any) -> Any:
    """``metrics`` with every `keras.metrics.Metric` object replaced by a new one of
    the same config (a metric counts for one model); names and functions as given."""
    return keras.tree.map_structure(
        lambda m: type(m).from_config(m.get_config()) if isinstance(m, keras.metrics.Metric) else m,
        metrics,
    )
