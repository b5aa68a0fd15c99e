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
from typing import Any

import keras
from keras import ops

from keras_sam import backend, internals


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
        if model.built:
            self.built = True

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
            for _, _, batches in iterator:
                data_batch = next(batches)
                break
        if multi_worker:
            data_batch = keras.tree.map_structure(
                lambda value: strategy.experimental_local_results(value)[0], data_batch
            )
        with strategy.scope() if multi_worker else contextlib.nullcontext():
            internals.symbolic_build(self, data_batch)

    # ------------------------------------------------------------ config
    def get_config(self) -> dict:
        config = super().get_config()
        config["model"] = keras.saving.serialize_keras_object(self.model)
        return config

    @classmethod
    def from_config(cls, config: dict, custom_objects: Any = None) -> ModelWrapper:
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(
            config["model"], custom_objects=custom_objects
        )
        return cls(**config)
