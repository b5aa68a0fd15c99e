"""K-SAM on the demo's BatchNorm CNN (digits, batch 64): test accuracy against SGD
and SAM for several k and seeds, with SGD's learning rate and with it scaled by
k/|B| (the chosen samples' gradient averaged over the whole batch), and the same
top-k rule on an MLP without BatchNorm. The experiment behind the K-SAM warning
in docs/concepts/methods.md.

    python -m benchmarks.ksam_batchnorm [--epochs 15] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from keras_sam import demo, registry

BATCH_SIZE = 64


def _mlp(input_shape: tuple, num_classes: int, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input(input_shape), keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"), keras.layers.Dense(num_classes),
    ])


def run(name: str, overrides: dict | None, build: object, data: tuple, seed: int,
        epochs: int, lr_factor: float = 1.0) -> float:
    (x_train, y_train), (x_test, y_test), num_classes = data
    model = build(x_train.shape[1:], num_classes, seed)
    steps = epochs * int(np.ceil(len(x_train) / BATCH_SIZE))
    lr = keras.optimizers.schedules.CosineDecay(demo.SGD_LR * lr_factor, decay_steps=steps)
    if overrides is None:
        trainer, optimizer = model, registry.BASES["sgd"].make(lr)
    else:
        trainer, optimizer = registry.METHODS[name].build(model, lr, **overrides)
    trainer.compile(optimizer=optimizer, jit_compile=True,
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    trainer.fit(x_train, y_train, batch_size=BATCH_SIZE, epochs=epochs, verbose=0)
    return demo.accuracy(model, x_test, y_test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    def share(k: float) -> float:  # k/|B|: the chosen samples' share of a batch
        return round(k * BATCH_SIZE) / BATCH_SIZE

    runs = {
        "SGD": ("sgd", None, demo.build_model, 1.0),
        "SAM": ("sam", {}, demo.build_model, 1.0),
        "K-SAM k=0.1": ("ksam", {"k": 0.1}, demo.build_model, 1.0),
        "K-SAM k=0.25": ("ksam", {"k": 0.25}, demo.build_model, 1.0),
        "K-SAM k=0.1, rho=0 (top-k SGD)": ("ksam", {"k": 0.1, "rho": 0.0}, demo.build_model, 1.0),
        "K-SAM k=0.1, lr x k/|B|": ("ksam", {"k": 0.1}, demo.build_model, share(0.1)),
        "K-SAM k=0.25, lr x k/|B|": ("ksam", {"k": 0.25}, demo.build_model, share(0.25)),
        "MLP, no BatchNorm: K-SAM k=0.1, rho=0": ("ksam", {"k": 0.1, "rho": 0.0}, _mlp, 1.0),
        "MLP, no BatchNorm: K-SAM k=0.25": ("ksam", {"k": 0.25}, _mlp, 1.0),
    }
    print("| run | test accuracy (mean over seeds) | per seed |\n|---|---|---|")
    for label, (name, overrides, build, lr_factor) in runs.items():
        accuracies = [
            run(name, overrides, build, demo.load_digits(0.0, seed), seed, args.epochs, lr_factor)
            for seed in args.seeds
        ]
        print(f"| {label} | {100 * np.mean(accuracies):.2f} % | "
              f"{', '.join(f'{100 * a:.2f}' for a in accuracies)} |", flush=True)


if __name__ == "__main__":
    main()
