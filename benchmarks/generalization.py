"""Test accuracy, cost and sharpness of every keras_sam method on digits with label noise.

    python -m benchmarks.generalization              # full run (~25 min on 2 busy CPU cores)
    python -m benchmarks.generalization --quick      # seconds (CI)
    python -m benchmarks.generalization --backend jax   # the same on Keras' JAX backend

Data: scikit-learn's 8×8 digits (shipped, no download), the split of
``keras_sam.demo.load_digits``: 70 % train / 30 % test; the last 20 % of the training
part is held out as a validation set. Training and validation labels are corrupted
with symmetric label noise (0 %, 20 %, 40 %: a flipped label is uniform over the other
classes); test labels are clean. With symmetric noise, expected noisy-label accuracy is
an increasing affine function of clean accuracy, so ρ is chosen per method and noise
level by the mean *validation* accuracy over seeds, never by the test set.

Model: ``keras_sam.demo.build_model`` (a small CNN with BatchNorm; ``--model mlp`` for an
MLP), batch 64, cosine learning-rate decay, ``jit_compile=True``. Every method is
compiled once; ρ lives in a variable read through a ρ schedule, so one compiled step
serves every ρ, noise level and seed: weights, optimizer slots, wrapper state and ρ
are reset between runs. Momentum-SAM runs use ``MSAMCallback`` and recalibrate
BatchNorm at the clean weights after training, as ``keras_sam.demo`` does.

Reported per (noise, method, ρ): test accuracy mean ± std over seeds, validation
accuracy, wall-clock cost of the training steps relative to the base optimizer on the
same noise and seed (median over seeds), and the sharpness of the final weights
(``benchmarks.sharpness``: loss increase along the normalized ascent direction at a
fixed radius, and along random filter-normalized directions) on a fixed batch of
training samples with their (noisy) training labels.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks import common, harness
from benchmarks.generalization_report import aggregate, markdown, plot

SUPPORTED_BACKENDS = ("tensorflow", "jax", "torch")
#: The methods of the default run: SAM and the cheap methods that promise its gain.
DEFAULT_METHODS = ("sam", "ksam", "layerwise", "msam", "adamw-msam")


def load_data(noise: float, seed: int) -> dict:
    from keras_sam import demo

    (x_train, y_train), (x_test, y_test), num_classes = demo.load_digits(noise, seed)
    split = int(0.8 * len(x_train))
    return {
        "train": (x_train[:split], y_train[:split]),
        "val": (x_train[split:], y_train[split:]),
        "test": (x_test, y_test),
        "num_classes": num_classes,
    }


def build_mlp(input_shape: Sequence[int], num_classes: int, seed: int, width: int) -> Any:
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(tuple(input_shape))
    h = keras.layers.Flatten()(inputs)
    for _ in range(2):
        h = keras.layers.Dense(width, activation="relu")(h)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(h), name="digits_mlp")


def build(args: argparse.Namespace, input_shape: Sequence[int], num_classes: int, seed: int
          ) -> Any:
    from keras_sam import demo

    if args.model == "mlp":
        return build_mlp(input_shape, num_classes, seed, args.width)
    return demo.build_model(input_shape, num_classes, seed)


def make_train_timer() -> Any:
    """A callback summing the wall time of training batches (validation not counted),
    with the running total at the end of each epoch (the time-to-accuracy curve)."""
    import keras

    # JAX dispatches steps asynchronously: wait for each step's loss before stopping
    # the clock (TensorFlow's step has run when the callback is called).
    block = keras.backend.backend() == "jax"

    class TrainTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.total = 0.0
            self.steps = 0
            self.epoch_ends: list[float] = []
            self._start = 0.0

        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            self._start = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if block and logs and "loss" in logs:
                np.asarray(logs["loss"])
            self.total += time.perf_counter() - self._start
            self.steps += 1

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.epoch_ends.append(self.total)

    return TrainTimer()


class MethodRun:
    """One method compiled once; `run` trains from scratch for a given ρ, data and seed."""

    def __init__(self, method: common.Method, args: argparse.Namespace, data: dict) -> None:
        import keras

        import keras_sam

        self.method = method
        self.args = args
        x_train = data["train"][0]
        self.model = build(args, x_train.shape[1:], data["num_classes"], 0)
        self.rho = keras.Variable(
            method.default_rho or 0.0, dtype="float32", trainable=False, name="bench_rho"
        )
        rho_variable = self.rho

        def rho_schedule(step: Any) -> Any:
            return rho_variable.value

        steps = args.epochs * int(np.ceil(len(x_train) / args.batch_size))
        lr = keras.optimizers.schedules.CosineDecay(
            args.learning_rate[method.base], decay_steps=steps
        )
        self.trainer = method.wrap(self.model, rho_schedule)
        self.trainer.compile(
            optimizer=method.optimizer(lr, rho_schedule),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=common.jit_compile(),
        )
        self.trainer.optimizer.build(self.trainer.trainable_variables)
        own = {id(v) for v in self.model.variables}
        self.wrapper_state = [
            (v, np.array(v.numpy())) for v in self.trainer.variables if id(v) not in own
        ]
        self.optimizer_state = [
            (v, np.array(v.numpy())) for v in self.trainer.optimizer.variables
        ]
        self.keras_sam = keras_sam
        # Warm-up: trace and XLA-compile the full and the smaller last batch and the test
        # step, so that no timed run pays for compilation. `run` resets all state.
        self.trainer.fit(*data["train"], batch_size=args.batch_size, epochs=1, verbose=0,
                         validation_data=data["test"], validation_batch_size=len(data["test"][0]))

    def reset(self, init_weights: list, rho: float | None) -> None:
        self.model.set_weights(init_weights)
        for v, value in self.optimizer_state + self.wrapper_state:
            v.assign(value)
        self.rho.assign(rho or 0.0)

    def run(self, data: dict, seed: int, rho: float | None, init_weights: list) -> dict:
        import keras

        self.reset(init_weights, rho)
        keras.utils.set_random_seed(seed)
        timer = make_train_timer()
        callbacks = [timer]
        if self.method.momentum_sam:
            callbacks = [
                self.keras_sam.callbacks.MSAMCallback(),
                timer,
                self.keras_sam.callbacks.BatchNormRecalibration(data["train"][0], batch_size=64),
            ]
        start = time.perf_counter()
        history = self.trainer.fit(
            *data["train"],
            batch_size=self.args.batch_size,
            epochs=self.args.epochs,
            validation_data=data["test"],
            validation_batch_size=len(data["test"][0]),  # one batch: one compiled shape
            shuffle=True,
            verbose=0,
            callbacks=callbacks,
        )
        fit_s = time.perf_counter() - start
        from benchmarks.sharpness import sharpness

        x_sharp, y_sharp = (t[: self.args.sharpness_samples] for t in data["train"])
        measures = sharpness(
            self.model, x_sharp, y_sharp, rho=self.args.sharpness_rho,
            alpha=self.args.sharpness_alpha, num_random=self.args.sharpness_directions,
            seed=seed,
        )
        return {
            "test_accuracy": _accuracy(self.model, *data["test"]),
            "val_accuracy": _accuracy(self.model, *data["val"]),
            "train_accuracy_noisy": _accuracy(self.model, *data["train"]),
            "train_time_s": timer.total,
            "train_steps": timer.steps,
            "fit_wall_s": fit_s,
            "test_curve": [float(a) for a in history.history["val_accuracy"]],
            "time_curve": timer.epoch_ends,
            "sharpness": measures,
        }


def _accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    import keras

    # One eager inference call on the whole (small) set: no per-shape XLA compiles.
    logits = keras.ops.convert_to_numpy(model(x, training=False))
    return float(np.mean(np.argmax(logits, axis=-1) == y))


# ---------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.generalization", description=__doc__.split("\n")[0]
    )
    common.add_common_flags(parser)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        help=f"registry names (default {' '.join(DEFAULT_METHODS)}; the base "
                        "optimizers they compare against are added)")
    parser.add_argument("--model", default="mlp", choices=("cnn", "mlp"),
                        help="mlp (default): two hidden ReLU layers of --width units; cnn: "
                        "the demo's CNN with BatchNorm")
    parser.add_argument("--width", type=int, default=None,
                        help="hidden units of the MLP (default 512; 64 with --quick)")
    parser.add_argument("--noise", nargs="+", type=float, default=None,
                        help="label-noise fractions (default 0.4; 0.2 with --quick)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="default 0 1 2 (0 with --quick)")
    parser.add_argument("--epochs", type=int, default=None, help="default 60 (2 with --quick)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sgd-lr", type=float, default=0.05)
    parser.add_argument("--adamw-lr", type=float, default=3e-3)
    parser.add_argument("--default-rho-only", action="store_true",
                        help="one ρ per method (its default) instead of the grid")
    parser.add_argument("--sharpness-rho", type=float, default=0.05)
    parser.add_argument("--sharpness-alpha", type=float, default=0.1)
    parser.add_argument("--sharpness-directions", type=int, default=None,
                        help="default 5 (1 with --quick)")
    parser.add_argument("--sharpness-samples", type=int, default=512)
    args = parser.parse_args(argv)
    quick = args.quick
    args.noise = args.noise if args.noise is not None else ([0.2] if quick else [0.4])
    args.seeds = args.seeds if args.seeds is not None else ([0] if quick else [0, 1, 2])
    args.epochs = args.epochs or (2 if quick else 60)
    args.width = args.width or (64 if quick else 512)
    args.sharpness_directions = args.sharpness_directions or (1 if quick else 5)
    args.default_rho_only = args.default_rho_only or quick
    args.learning_rate = {"sgd": args.sgd_lr, "adamw": args.adamw_lr}
    if any(not 0.0 <= n < 1.0 for n in args.noise):
        parser.error("--noise values must be in [0, 1)")
    return args, parser


def main(argv: Sequence[str] | None = None) -> dict:
    args, parser = parse_args(argv)
    common.setup_backend(args.backend, parser, SUPPORTED_BACKENDS)
    device = common.setup_device(args.device, parser)
    import keras

    methods = common.all_methods(args.methods or ())
    names = common.select_methods(args.methods, methods)
    machine = common.machine_info(device)
    print(f"generalization benchmark on {device}; load {machine['load_average_1_5_15']}; "
          f"methods {names}", flush=True)
    start = time.perf_counter()
    datasets = {(n, s): load_data(n, s) for n in args.noise for s in args.seeds}
    first = datasets[(args.noise[0], args.seeds[0])]
    shape, classes = first["train"][0].shape[1:], first["num_classes"]
    init = {s: build(args, shape, classes, s).get_weights() for s in args.seeds}
    runs: list[dict] = []
    compile_s = {}
    for name in names:
        method = methods[name]
        rhos = [None] if method.default_rho is None else (
            [method.default_rho] if args.default_rho_only else list(method.rho_grid)
        )
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runner = MethodRun(method, args, first)
        compile_s[name] = time.perf_counter() - t0
        for rho in rhos:
            for noise in args.noise:
                for seed in args.seeds:
                    data = datasets[(noise, seed)]
                    result = runner.run(data, seed, rho, init[seed])
                    result.update({"method": name, "rho": rho, "noise": noise, "seed": seed})
                    runs.append(result)
                    print(f"  {name:11s} rho={rho!s:5s} noise={noise:.0%} seed={seed}: "
                          f"test {100 * result['test_accuracy']:.2f} %, "
                          f"train {result['train_time_s']:.2f} s", flush=True)
        del runner
        keras.backend.clear_session()
    report = {
        "machine": machine,
        "settings": {
            "quick": args.quick, "model": args.model, "width": args.width,
            "epochs": args.epochs,
            "batch_size": args.batch_size, "learning_rate": args.learning_rate,
            "noise": args.noise, "seeds": args.seeds,
            "sharpness_rho": args.sharpness_rho, "sharpness_alpha": args.sharpness_alpha,
            "sharpness_directions": args.sharpness_directions,
            "sharpness_samples": args.sharpness_samples,
            "split": "digits 70/30 train/test (keras_sam.demo), last 20 % of train = validation",
        },
        "methods": {
            n: {"label": methods[n].label, "base": methods[n].base,
                "rho_grid": list(methods[n].rho_grid), "extra": methods[n].extra}
            for n in names
        },
        "compile_s": compile_s,
        "runs": runs,
    }
    report.update(aggregate(runs, methods, names, args.noise))
    report["load"] = harness.machine_load(machine["load_average_1_5_15"])
    if machine["keras_backend"] == "jax":
        report["machine"]["tensorflow_imported"] = common.tensorflow_imported()
    report["wall_clock_s"] = time.perf_counter() - start
    out = harness.write_results(args.out, "generalization", report, markdown(report))
    plot(report, out)
    print(markdown(report).split("## Full grid")[0])
    print(f"wrote {out / 'generalization.json'}, generalization.md and PNGs in "
          f"{report['wall_clock_s'] / 60:.1f} min")
    return report


if __name__ == "__main__":
    main()
