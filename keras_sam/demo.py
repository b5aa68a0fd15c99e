"""The main job: train one small network with its base optimizer and keras_sam's methods.

    python -m keras_sam.demo                  # scikit-learn digits, offline
    keras-sam-demo --noise 0.2 --epochs 30    # 20 % label noise
    keras-sam-demo --methods sgd sam msam --plot results.png

By default SAM, ASAM and the three papers' cheap methods; any method of
`keras_sam.registry` with `--methods`. Every run uses the same CNN (with
BatchNorm), seed and learning rate (one epoch of warm-up, then a cosine decay).
Prints Keras progress bars, then a table: test accuracy, median step time as a
ratio to the base optimizer (measured in this process), and the most memory a
training step allocated, beside its base optimizer's (see `StepMemory`).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

import keras_sam
from keras_sam import backend, registry

SGD_LR = 0.05
ADAM_LR = 3e-3
#: Peak learning rate per base optimizer (a cosine decay follows).
PEAK_LR = {"sgd": SGD_LR, "adamw": ADAM_LR}
#: Epochs of linear learning-rate warm-up before the cosine decay. K-SAM's first
#: steps, on the few hardest samples of each batch, otherwise switch off some of the
#: hidden ReLU units for good on some seeds (``python -m benchmarks.ksam_batchnorm``).
WARMUP_EPOCHS = 1
#: The methods the demo runs unless told otherwise: SAM, ASAM and the three papers'
#: cheap methods (the zoo's are one ``--methods`` away).
DEFAULT_METHODS = ("sam", "asam", "ksam", "layerwise", "msam", "adamw-msam")
#: Every method by name: the base optimizers and `keras_sam.registry.METHODS`.
METHODS = [*registry.BASES, *registry.METHODS]


def _label(name: str) -> str:
    if name in registry.BASES:
        return f"{registry.BASES[name].title} (base)"
    entry = registry.METHODS[name]
    text = entry.describe()
    return f"{entry.title} rho={entry.rho:g}" + (f", {text}" if text else "")


def _base(name: str) -> str:
    return name if name in registry.BASES else registry.METHODS[name].base


def _build(name: str, model: keras.Model, learning_rate: Any) -> tuple:
    if name in registry.BASES:
        return model, registry.BASES[name].make(learning_rate)
    entry = registry.METHODS[name]
    return entry.build(model, learning_rate)


def _callbacks(name: str, data: Any) -> list:
    if name in registry.BASES or not registry.METHODS[name].is_optimizer:
        return []
    return [keras_sam.callbacks.MSAMCallback(), keras_sam.callbacks.BatchNormRecalibration(data)]


def load_digits(noise: float, seed: int) -> tuple:
    """scikit-learn's 8×8 digits (shipped with the package), a fixed split, noisy labels."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    x = (data.images / 16.0).astype("float32")[..., None]
    y = data.target.astype("int32")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.7 * len(x))
    x_train, y_train, x_test, y_test = x[:split], y[:split].copy(), x[split:], y[split:]
    rng = np.random.default_rng(seed)
    flip = rng.random(len(y_train)) < noise
    y_train[flip] = (y_train[flip] + rng.integers(1, 10, flip.sum())) % 10
    return (x_train, y_train), (x_test, y_test), 10


def load_tfds(name: str) -> tuple:
    """A TFDS image classification dataset (needs the network on first use)."""
    import tensorflow_datasets as tfds

    (train, test), info = tfds.load(
        name, split=["train", "test"], as_supervised=True, batch_size=-1, with_info=True
    )
    x_train, y_train = (np.asarray(t) for t in tfds.as_numpy(train))
    x_test, y_test = (np.asarray(t) for t in tfds.as_numpy(test))
    return (
        (x_train.astype("float32") / 255.0, y_train.astype("int32")),
        (x_test.astype("float32") / 255.0, y_test.astype("int32")),
        info.features["label"].num_classes,
    )


def convolutions(inputs: Any) -> Any:
    """The demo CNN's convolution blocks on ``inputs``: a 3×3 convolution (16, then
    32 filters), BatchNormalization and ReLU, twice."""
    h = inputs
    for filters in (16, 32):
        h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(h)
        h = keras.layers.BatchNormalization(momentum=0.9)(h)
        h = keras.layers.ReLU()(h)
    return h


def build_model(input_shape: Sequence[int], num_classes: int, seed: int) -> keras.Model:
    """A small CNN with BatchNormalization after every hidden layer (so BN handling
    matters): two 3×3 convolutions, a dense hidden layer, a linear classifier.

    The hidden dense layer is normalized too: without it, the few hardest samples'
    gradients that K-SAM steps on switch off most of that layer's ReLU units in the
    first epoch (``python -m benchmarks.ksam_batchnorm`` compares both)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(tuple(input_shape))
    h = keras.layers.Flatten()(convolutions(inputs))
    h = keras.layers.Dense(64, use_bias=False)(h)
    h = keras.layers.BatchNormalization(momentum=0.9)(h)
    h = keras.layers.ReLU()(h)
    outputs = keras.layers.Dense(num_classes)(h)
    return keras.Model(inputs, outputs, name="digits_cnn")


def learning_rate(
    peak: float, epochs: int, steps_per_epoch: int, warmup_epochs: int = WARMUP_EPOCHS
) -> keras.optimizers.schedules.LearningRateSchedule:
    """The demo's schedule: a linear warm-up from 0 to ``peak`` over ``warmup_epochs``
    (none when training is not longer than that), then a cosine decay to 0."""
    warmup = steps_per_epoch * warmup_epochs if epochs > warmup_epochs else 0
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else peak,
        decay_steps=epochs * steps_per_epoch - warmup,
        warmup_target=peak if warmup else None,
        warmup_steps=warmup,
    )


class StepTimer(keras.callbacks.Callback):
    """Wall time of each training batch (the first epoch, which compiles, is dropped)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self._epoch = 0
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self._epoch > 0:
            self.times.append(time.perf_counter() - self._start)


class StepMemory(keras.callbacks.Callback):
    """The most memory one training step allocated, in ``peak_bytes``: per batch, the
    peak bytes the backend's allocator held above what it held when the batch began
    (`keras_sam.backend.allocator_probe`; ``None`` where the backend does not say).

    TensorFlow reports its allocator on a CPU or GPU, PyTorch on a GPU; JAX and
    PyTorch on a CPU do not (``python -m benchmarks.memory`` measures the process
    there). What a step allocates and frees counts (gradients, ε, activations, the
    compiled step's temporaries); what persists between steps (weights, optimizer
    slots) does not. The first epoch, which builds the slots and compiles, is left out.
    """

    def __init__(self) -> None:
        super().__init__()
        self.peak_bytes: int | None = None
        self._reset, self._read = backend.allocator_probe()
        self._start = 0
        self._measuring = False

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        # The first epoch builds the optimizer's slots and compiles: not a step's memory.
        self._measuring = epoch > 0 and self._reset is not None

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        if self._measuring:
            self._start = self._reset()

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self._measuring:
            self.peak_bytes = max(self.peak_bytes or 0, int(self._read() - self._start))


def run_method(name: str, data: tuple, args: argparse.Namespace, verbose: int) -> dict:
    (x_train, y_train), (x_test, y_test), num_classes = data
    model = build_model(x_train.shape[1:], num_classes, args.seed)
    steps_per_epoch = int(np.ceil(len(x_train) / args.batch_size))
    schedule = learning_rate(PEAK_LR[_base(name)], args.epochs, steps_per_epoch)
    trainer, optimizer = _build(name, model, schedule)
    trainer.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=not args.no_jit,
    )
    timer, memory = StepTimer(), StepMemory()
    print(f"\n== {_label(name)} ==")
    history = trainer.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        verbose=verbose,
        callbacks=[*_callbacks(name, x_train), timer, memory],
    )
    test_accuracy = accuracy(model, x_test, y_test)
    return {
        "name": name,
        "label": _label(name),
        "base": _base(name),
        "accuracy": test_accuracy,
        "step_time": float(np.median(timer.times)) if timer.times else float("nan"),
        "steps_per_epoch": steps_per_epoch,
        "peak_bytes": memory.peak_bytes,
        "history": history.history,
    }


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    """Test accuracy of a classifier with logits outputs (inference mode)."""
    # An eager call, not `predict`: a new predict function per method makes TensorFlow
    # warn about retracing.
    logits = np.concatenate(
        [
            keras.ops.convert_to_numpy(model(x[i : i + 256], training=False))
            for i in range(0, len(x), 256)
        ]
    )
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def _ratio_to_base(result: dict, by_name: dict, key: str) -> float:
    """``result[key]`` over its base optimizer's (NaN without the base or a value)."""
    base = by_name.get(result["base"])
    if not base or not base[key] or result[key] is None:
        return float("nan")
    return result[key] / base[key]


def results_table(results: list[dict]) -> str:
    """A markdown table; ratios are relative to each method's base optimizer."""
    by_name = {r["name"]: r for r in results}
    rows = [
        "| method | test accuracy | step time (ms) | ratio to base | step memory (ratio to base) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['label']} | {100 * r['accuracy']:.2f} % | {1000 * r['step_time']:.2f} "
            f"| {_ratio_to_base(r, by_name, 'step_time'):.2f}x | {_memory(r, by_name)} |"
        )
    return "\n".join(rows)


def _memory(result: dict, by_name: dict) -> str:
    if result["peak_bytes"] is None:
        return "n/a (backend does not report)"
    ratio = _ratio_to_base(result, by_name, "peak_bytes")
    return f"{_human_bytes(result['peak_bytes'])} ({ratio:.2f}x)"


def _human_bytes(count: float) -> str:
    if count < 1024:
        return f"{count:.0f} B"
    if count < 1024**2:
        return f"{count / 1024:.1f} KiB"
    return f"{count / 1024**2:.1f} MiB"


def plot(results: list[dict], path: str) -> None:
    """Accuracy against cost: test accuracy over the step-time ratio to the base
    optimizer, and validation accuracy over training time (compilation excluded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {r["name"]: r for r in results}
    fig, (ax_cost, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    for i, r in enumerate(results):
        ratio = _ratio_to_base(r, by_name, "step_time")
        marker = "s" if r["name"] == r["base"] else "o"
        ax_cost.plot(ratio, 100 * r["accuracy"], marker, color=f"C{i}", label=r["label"])
        epoch_time = r["steps_per_epoch"] * r["step_time"]
        curve = 100 * np.asarray(r["history"]["val_accuracy"])
        ax_time.plot(
            epoch_time * np.arange(1, len(curve) + 1), curve, color=f"C{i}", label=r["label"]
        )
    ax_cost.set_xlabel("step time / base optimizer's")
    ax_cost.set_ylabel("test accuracy (%)")
    ax_cost.set_title("accuracy against cost")
    ax_cost.grid(alpha=0.3)
    ax_cost.legend(fontsize=8)
    ax_time.set_xlabel("training time (s; median step time × steps)")
    ax_time.set_ylabel("validation accuracy (%)")
    ax_time.set_title("time to accuracy")
    ax_time.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="keras-sam-demo", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        choices=METHODS,
        help="methods to run (their base optimizers run too)",
    )
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--noise", type=float, default=0.0, help="label-noise fraction (digits)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", default="digits", help="'digits' or a TFDS name (cifar10)")
    parser.add_argument("--plot", metavar="FILE", help="write a matplotlib figure (PNG)")
    parser.add_argument("--no-jit", action="store_true", help="turn XLA compilation off")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch compiles and is not timed)")
    if not 0.0 <= args.noise < 1.0:
        parser.error("--noise must be in [0, 1)")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.dataset == "digits":
        data = load_digits(args.noise, args.seed)
    else:
        data = load_tfds(args.dataset)
    methods = list(
        dict.fromkeys(
            [_base(name) for name in args.methods if _base(name) not in args.methods] + args.methods
        )
    )
    results = [run_method(name, data, args, verbose=0 if args.quiet else 1) for name in methods]
    print(
        f"\nkeras_sam {keras_sam.__version__} demo: {args.dataset}, label noise "
        f"{args.noise:.0%}, {args.epochs} epochs, seed {args.seed}\n"
    )
    print(results_table(results))
    if args.plot:
        plot(results, args.plot)
    return results


if __name__ == "__main__":
    main()
