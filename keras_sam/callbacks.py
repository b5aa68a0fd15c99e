"""Callbacks and helpers for training with keras_sam.

* :class:`MSAMCallback`: keeps the Momentum-SAM perturbation out of validation, prediction,
  checkpoints and backups, and resumes training at the perturbed point.
* :class:`SharpnessMonitor`: logs Hessian and sharpness measures into ``History``.
* :func:`recalibrate_batchnorm` / :class:`BatchNormRecalibration`: recompute BatchNorm
  moving statistics at the clean weights after Momentum-SAM training (the statistics seen
  during training were gathered at perturbed weights).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import keras
import numpy as np
from keras import ops

from keras_sam import internals, sharpness
from keras_sam.optimizers.momentum_perturbation import MomentumPerturbationOptimizer
from keras_sam.validation import check_int

__all__ = ["BatchNormRecalibration", "MSAMCallback", "SharpnessMonitor", "recalibrate_batchnorm"]


def find_momentum_sam_optimizer(optimizer: Any) -> MomentumPerturbationOptimizer | None:
    """The Momentum-SAM optimizer inside ``optimizer`` (unwrapping ``LossScaleOptimizer``)."""
    seen = 0
    while optimizer is not None and seen < 8:
        if isinstance(optimizer, MomentumPerturbationOptimizer):
            return optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)
        seen += 1
    return None


@keras.saving.register_keras_serializable(package="keras_sam")
class MSAMCallback(keras.callbacks.Callback):
    """Shows clean (unperturbed) weights to everything but the Momentum-SAM training steps.

    ``MSAM``/``AdamWMSAM`` keep the model variables at the perturbed point ``w - s*d`` between
    steps. This callback moves them to the clean weights ``w`` whenever something else looks:

    * ``on_test_begin``: validation inside ``fit`` (and ``evaluate(callbacks=[cb])``) runs at
      the clean weights;
    * ``on_epoch_end`` (``swap_on_epoch=True``): callbacks placed **after** this one
      (``ModelCheckpoint``, ``BackupAndRestore``, ``EarlyStopping(restore_best_weights=True)``,
      ``model.save`` in user callbacks) see and save the clean weights, together with optimizer
      state that says so (``is_perturbed = 0``);
    * ``on_epoch_begin``: the stored perturbation is re-applied before the next step, so
      training continues at the right point, also after ``BackupAndRestore`` or
      ``load_model`` restored clean weights and state;
    * ``on_predict_begin``/``end``: clean weights during ``predict(callbacks=[cb])`` and the
      previous state restored afterwards (unlike ``keras.callbacks.SwapEMAWeights``, which
      does not swap back after ``predict``).

    After ``fit`` the weights are clean even without this callback (the optimizer's
    ``finalize_variable_values``), so ``evaluate``, ``predict`` and ``save`` after ``fit``
    need nothing.

    Put it **first** in the callbacks list: Keras calls ``on_epoch_end`` in list order.
    Do not combine it with ``keras.callbacks.SwapEMAWeights`` (both swap the same variables);
    with ``use_ema=True`` the EMA tracks the clean weights and ``fit`` ends on them.

    Exactness: a swap is ``w~ + s*d`` then ``w - s*d`` in floating point, so a run with swaps
    differs from one without by rounding (ulps), as for ``SwapEMAWeights``. Resuming from a
    ``BackupAndRestore`` or ``ModelCheckpoint`` written behind this callback performs exactly
    the same operations as the uninterrupted run, so it is bit-identical where TensorFlow is
    deterministic.

    Args:
        swap_on_epoch: remove the perturbation at ``on_epoch_end`` and re-apply it at
            ``on_epoch_begin``. Defaults to ``True``. With ``False`` only evaluation and
            prediction are swapped (checkpoints then hold perturbed weights, and consistent
            optimizer state).

    Raises:
        ValueError: at ``on_train_begin`` (or the first swap) if the model has no
            Momentum-SAM optimizer, compiled or held as an attribute.

    Examples:
        Validation and checkpoints see the clean weights.

        >>> import keras, numpy as np, keras_sam
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        >>> model.compile(optimizer=keras_sam.optimizers.MSAM(0.05, rho=0.3), loss="mse")
        >>> x, y = np.random.rand(32, 4), np.random.rand(32, 1)
        >>> history = model.fit(x, y, validation_split=0.25, epochs=2, verbose=0, callbacks=[
        ...     keras_sam.callbacks.MSAMCallback(),
        ...     keras.callbacks.ModelCheckpoint("best.keras", save_best_only=True),
        ... ])
        >>> model.optimizer.is_perturbed  # after fit, the model holds the clean weights
        False
    """

    def __init__(self, swap_on_epoch: bool = True) -> None:
        super().__init__()
        self.swap_on_epoch = bool(swap_on_epoch)
        self._optimizers: list[MomentumPerturbationOptimizer] = []
        self._in_fit = False
        self._in_epoch = False
        self._restore_after_test = False
        self._restore_after_predict = False

    def _get_optimizers(self) -> list[MomentumPerturbationOptimizer]:
        """The model's Momentum-SAM optimizers: the compiled one, and those the model
        holds as attributes (a GAN's ``self.d_optimizer``, used by its own
        `train_step`)."""
        candidates = [getattr(self.model, "optimizer", None), *vars(self.model).values()]
        found: list[MomentumPerturbationOptimizer] = []
        for candidate in candidates:
            if not isinstance(candidate, keras.optimizers.Optimizer):
                continue
            optimizer = find_momentum_sam_optimizer(candidate)
            if optimizer is not None and all(optimizer is not f for f in found):
                found.append(optimizer)
        if not found:
            raise ValueError(
                "MSAMCallback needs a model compiled with a keras_sam Momentum-SAM optimizer "
                "(keras_sam.optimizers.MSAM or AdamWMSAM, possibly inside a "
                "LossScaleOptimizer), or holding such optimizers as attributes; got "
                f"{getattr(self.model, 'optimizer', None)!r}."
            )
        return found

    def _remove(self) -> bool:
        removed = [o.built and o.remove_perturbation() for o in self._get_optimizers()]
        return any(removed)

    def _apply(self) -> bool:
        applied = [o.built and o.apply_perturbation() for o in self._get_optimizers()]
        return any(applied)

    # -- training
    def on_train_begin(self, logs: dict | None = None) -> None:
        self._optimizers = self._get_optimizers()
        for optimizer in self._optimizers:
            optimizer.attach_callback()
        self._in_fit = True
        if not self.swap_on_epoch:
            self._apply()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._in_epoch = True
        if self.swap_on_epoch:
            # Also restores the perturbed point after BackupAndRestore / load_model.
            self._apply()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._in_epoch = False
        if self.swap_on_epoch:
            self._remove()

    def on_train_end(self, logs: dict | None = None) -> None:
        self._in_fit = False
        self._in_epoch = False
        for optimizer in self._optimizers:
            # `fit` already finalized its compiled optimizer; this is idempotent, and
            # needed for the optimizers a custom `train_step` uses.
            optimizer.remove_perturbation()
            optimizer.detach_callback()
        self._optimizers = []

    # -- evaluation
    def on_test_begin(self, logs: dict | None = None) -> None:
        self._restore_after_test = self._remove()

    def on_test_end(self, logs: dict | None = None) -> None:
        restore = self._restore_after_test
        self._restore_after_test = False
        if restore and not (self._in_fit and self._in_epoch and self.swap_on_epoch):
            # Inside fit's validation the next on_epoch_end removes it again anyway; the
            # perturbation is re-applied at on_epoch_begin.
            self._apply()

    # -- prediction
    def on_predict_begin(self, logs: dict | None = None) -> None:
        self._restore_after_predict = self._remove()

    def on_predict_end(self, logs: dict | None = None) -> None:
        if self._restore_after_predict:
            self._apply()
        self._restore_after_predict = False

    def get_config(self) -> dict:
        return {"swap_on_epoch": self.swap_on_epoch}

    @classmethod
    def from_config(cls, config: dict) -> MSAMCallback:
        return cls(**config)


def _batchnorm_layers(model: keras.Model) -> list:
    layers = []
    for layer in internals.all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.built:
            layers.append(layer)
    return layers


def _iterate_inputs(data: Any, batch_size: int | None) -> Iterable:
    """Yields model inputs ``x`` from arrays, ``(x, y[, sw])`` tuples of arrays or batches."""
    in_memory = isinstance(data, (np.ndarray, dict)) or (
        isinstance(data, tuple) and isinstance(data[0], (np.ndarray, list, dict))
    )
    if in_memory:
        x = data[0] if isinstance(data, tuple) else data
        first = (
            next(iter(x.values())) if isinstance(x, dict) else (x[0] if isinstance(x, list) else x)
        )
        size = batch_size or 32
        for start in range(0, len(first), size):
            part = slice(start, start + size)
            if isinstance(x, dict):
                yield {k: v[part] for k, v in x.items()}
            elif isinstance(x, list):
                yield [a[part] for a in x]
            else:
                yield x[part]
        return
    for batch in data:
        if isinstance(batch, tuple):
            batch = keras.utils.unpack_x_y_sample_weight(batch)[0]
        yield batch


def recalibrate_batchnorm(
    model: keras.Model,
    data: Any,
    steps: int | None = None,
    batch_size: int | None = None,
) -> int:
    """Recomputes BatchNorm moving statistics at the model's clean weights.

    Runs training-mode forward passes without gradients over ``data`` and sets every
    ``BatchNormalization`` layer's ``moving_mean``/``moving_variance`` to the average of the
    per-batch statistics (like ``torch.optim.swa_utils.update_bn``; the Momentum-SAM authors
    run one such pass after training). Only the BatchNorm statistics change: the forward pass
    is the layers' training mode (dropout etc. have no lasting effect), and no weight,
    optimizer or metric state is touched. If the model's optimizer is a Momentum-SAM one and
    the weights are currently perturbed, the pass runs at the clean weights and the
    perturbation is restored afterwards.

    Args:
        model: a built ``keras.Model``.
        data: a ``tf.data.Dataset`` or any iterable of batches (``x`` or ``(x, y[, sw])``),
            or a NumPy array / tuple of arrays ``(x, ...)`` split into ``batch_size`` batches.
        steps: at most this many batches (``None``: all of ``data``).
        batch_size: batch size for array inputs. Defaults to 32.

    Returns:
        The number of batches used (0 if the model has no BatchNorm layer).

    Raises:
        ValueError: if ``data`` yields no batch while the model has BatchNorm layers.

    Examples:
        >>> import keras, numpy as np, keras_sam
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(),
        ...                           keras.layers.Dense(1)])
        >>> model.compile(optimizer=keras_sam.optimizers.MSAM(0.05, rho=0.3), loss="mse")
        >>> x, y = np.random.rand(32, 4), np.random.rand(32, 1)
        >>> history = model.fit(x, y, epochs=2, verbose=0,
        ...                     callbacks=[keras_sam.callbacks.MSAMCallback()])
        >>> keras_sam.callbacks.recalibrate_batchnorm(model, x)  # layers recalibrated
        1
    """
    layers = _batchnorm_layers(model)
    if not layers:
        return 0
    optimizer = find_momentum_sam_optimizer(getattr(model, "optimizer", None))
    removed = optimizer is not None and optimizer.built and optimizer.remove_perturbation()
    momenta = [layer.momentum for layer in layers]
    sums = [
        [
            np.zeros(layer.moving_mean.shape, "float64"),
            np.zeros(layer.moving_variance.shape, "float64"),
        ]
        for layer in layers
    ]
    saved = [
        (ops.convert_to_numpy(layer.moving_mean), ops.convert_to_numpy(layer.moving_variance))
        for layer in layers
    ]
    count = 0
    try:
        for layer in layers:
            layer.momentum = 0.0  # moving statistics := this batch's statistics
        for x in _iterate_inputs(data, batch_size):
            if steps is not None and count >= steps:
                break
            model(x, training=True)
            for layer, acc in zip(layers, sums):
                acc[0] += ops.convert_to_numpy(layer.moving_mean)
                acc[1] += ops.convert_to_numpy(layer.moving_variance)
            count += 1
        if count == 0:
            raise ValueError("recalibrate_batchnorm: `data` yielded no batch.")
        for layer, acc in zip(layers, sums):
            layer.moving_mean.assign((acc[0] / count).astype(layer.moving_mean.dtype))
            layer.moving_variance.assign((acc[1] / count).astype(layer.moving_variance.dtype))
    except BaseException:
        for layer, (mean, var) in zip(layers, saved):
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(var)
        raise
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        if removed and optimizer is not None:
            optimizer.apply_perturbation()
    return count


class BatchNormRecalibration(keras.callbacks.Callback):
    """Runs :func:`recalibrate_batchnorm` when ``fit`` ends, at the clean weights.

    ``fit`` removes the Momentum-SAM perturbation before ``on_train_end``, so the statistics
    are computed at the final clean weights.

    Args:
        data: the recalibration data (see :func:`recalibrate_batchnorm`), usually the
            training set.
        steps: at most this many batches. Defaults to ``None`` (all of ``data``).
        batch_size: batch size for array inputs. Defaults to 32.

    Examples:
        >>> import keras, numpy as np, keras_sam
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(),
        ...                           keras.layers.Dense(1)])
        >>> model.compile(optimizer=keras_sam.optimizers.MSAM(0.05, rho=0.3), loss="mse")
        >>> x, y = np.random.rand(32, 4), np.random.rand(32, 1)
        >>> history = model.fit(x, y, epochs=2, verbose=0, callbacks=[
        ...     keras_sam.callbacks.MSAMCallback(),
        ...     keras_sam.callbacks.BatchNormRecalibration(x, steps=2),
        ... ])
    """

    def __init__(self, data: Any, steps: int | None = None, batch_size: int | None = None) -> None:
        super().__init__()
        self.data = data
        self.steps = steps
        self.batch_size = batch_size
        self.batches_used = 0

    def on_train_end(self, logs: dict | None = None) -> None:
        optimizer = find_momentum_sam_optimizer(getattr(self.model, "optimizer", None))
        if optimizer is not None and optimizer.built:
            optimizer.remove_perturbation()
        self.batches_used = recalibrate_batchnorm(
            self.model, self.data, steps=self.steps, batch_size=self.batch_size
        )


#: The measures `SharpnessMonitor` knows, as functions of (model, data, loss).
SHARPNESS_MEASURES: dict[str, Any] = {
    "hessian_top": lambda model, data, loss: float(
        sharpness.hessian_eigenvalues(model, data, loss, k=1, max_iters=20, seed=0)[0]
    ),
    "hessian_trace": lambda model, data, loss: sharpness.hessian_trace(
        model, data, loss, samples=10, seed=0
    ),
    "worst_case_sharpness": lambda model, data, loss: sharpness.worst_case_sharpness(
        model, data, loss, rho=0.05
    ),
    "m_sharpness": lambda model, data, loss: sharpness.worst_case_sharpness(
        model, data, loss, rho=0.05, m=128
    ),
    "average_sharpness": lambda model, data, loss: sharpness.average_sharpness(
        model, data, loss, sigma=0.01, samples=5, seed=0
    ),
}


class SharpnessMonitor(keras.callbacks.Callback):
    """Logs sharpness measures of the model every ``every`` epochs, into ``logs``.

    The values land in the epoch's ``logs`` (so `History`, `CSVLogger` and
    `TensorBoard` record them) under their measure names. They are computed by
    `keras_sam.sharpness` on ``data`` in inference mode, at the clean weights
    also for the Momentum-SAM optimizers (the perturbation is removed while
    measuring). Place it before `CSVLogger`/`TensorBoard` in ``callbacks``.

    Measures (fixed settings, for comparable curves):

    * ``"hessian_top"``: the top Hessian eigenvalue (Lanczos, ≤ 20 products);
    * ``"hessian_trace"``: Hutchinson's trace estimate (10 probes);
    * ``"worst_case_sharpness"``: one-step worst case at ρ = 0.05 on all of ``data``;
    * ``"m_sharpness"``: the same averaged over chunks of 128 samples;
    * ``"average_sharpness"``: mean loss increase under N(0, 0.01²) noise (5 draws).

    Args:
        data: ``(x, y[, sample_weight])`` arrays or an iterable of batches (keep
            it small: a few hundred samples).
        loss: a Keras loss; ``None`` (default) uses the model's compiled loss.
        every: measure every this many epochs (int >= 1). Defaults to `1`.
        measures: names from the list above. Defaults to ``("hessian_top",)``.

    Raises:
        ValueError: an unknown measure or ``every`` < 1.

    Examples:
        >>> import keras, numpy as np, keras_sam
        >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        >>> trainer = keras_sam.SAM(model, rho=0.05)
        >>> trainer.compile(optimizer="sgd", loss="mse")
        >>> x, y = np.random.rand(64, 4), np.random.rand(64, 1)
        >>> monitor = keras_sam.callbacks.SharpnessMonitor(
        ...     (x[:32], y[:32]), measures=("hessian_top", "m_sharpness"))
        >>> history = trainer.fit(x, y, epochs=2, verbose=0, callbacks=[monitor])
        >>> len(history.history["hessian_top"])
        2
    """

    def __init__(
        self,
        data: Any,
        loss: Any = None,
        every: int = 1,
        measures: tuple[str, ...] = ("hessian_top",),
    ) -> None:
        super().__init__()
        unknown = [m for m in measures if m not in SHARPNESS_MEASURES]
        if isinstance(measures, str) or unknown or not measures:
            raise ValueError(
                f"`measures` must be a non-empty tuple of names from "
                f"{sorted(SHARPNESS_MEASURES)}, got {measures!r}."
            )
        self.data = data
        self.loss = loss
        self.every = check_int(every, "every", low=1)
        self.measures = tuple(measures)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None or (epoch + 1) % self.every:
            return
        loss = self.loss if self.loss is not None else getattr(self.model, "loss", None)
        optimizer = find_momentum_sam_optimizer(getattr(self.model, "optimizer", None))
        clean = optimizer.unperturbed() if optimizer is not None and optimizer.built else None
        with clean or nullcontext():
            for name in self.measures:
                logs[name] = SHARPNESS_MEASURES[name](self.model, self.data, loss)
