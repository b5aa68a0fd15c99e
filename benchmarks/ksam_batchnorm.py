"""K-SAM on BatchNorm CNNs (digits, batch 64, the demo's learning-rate schedule): test
accuracy against SGD and SAM for k = 0.1 and 0.25 over several seeds, with and without
the warm-up epoch, on the demo's CNN (BatchNorm after every hidden layer) and on the
CNN the demo used before (global average pooling, then a dense hidden layer without
BatchNorm), with the share of the last hidden layer's ReLU units that no training
sample switches on. The experiment behind the K-SAM notes in docs/concepts/methods.md.

    [KERAS_BACKEND=jax] python -m benchmarks.ksam_batchnorm [--epochs 15] [--seeds 0 1 2 3 4]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from keras_sam import demo, registry

BATCH_SIZE = 64


def pooled_cnn(input_shape: tuple, num_classes: int, seed: int) -> keras.Model:
    """The demo's former CNN: its convolutions, global average pooling and a dense
    ReLU layer without BatchNorm."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(input_shape)
    h = keras.layers.GlobalAveragePooling2D()(demo.convolutions(inputs))
    h = keras.layers.Dense(64, activation="relu")(h)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(h))


def dead_units(model: keras.Model, x: np.ndarray) -> float:
    """The share of the last hidden layer's units that are 0 on every sample of ``x``."""
    hidden = keras.Model(model.input, model.layers[-2].output)
    return float(np.mean(np.all(np.asarray(hidden(x, training=False)) <= 0, axis=0)))


def run(name: str, overrides: dict | None, build: object, seed: int, epochs: int,
        warmup_epochs: int = demo.WARMUP_EPOCHS) -> tuple:
    """``(test accuracy, dead units)`` of one training run with the demo's schedule."""
    (x_train, y_train), (x_test, y_test), num_classes = demo.load_digits(0.0, seed)
    model = build(x_train.shape[1:], num_classes, seed)
    steps_per_epoch = int(np.ceil(len(x_train) / BATCH_SIZE))
    lr = demo.learning_rate(demo.SGD_LR, epochs, steps_per_epoch, warmup_epochs)
    if overrides is None:
        trainer, optimizer = model, registry.BASES["sgd"].make(lr)
    else:
        trainer, optimizer = registry.METHODS[name].build(model, lr, **overrides)
    trainer.compile(optimizer=optimizer, jit_compile=True,
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    trainer.fit(x_train, y_train, batch_size=BATCH_SIZE, epochs=epochs, verbose=0)
    return demo.accuracy(model, x_test, y_test), dead_units(model, x_train)


RUNS = {  # label: (method, its arguments, warm-up epochs)
    "SGD": ("sgd", None, demo.WARMUP_EPOCHS),
    "SAM": ("sam", {}, demo.WARMUP_EPOCHS),
    "K-SAM k=0.1": ("ksam", {"k": 0.1}, demo.WARMUP_EPOCHS),
    "K-SAM k=0.25": ("ksam", {"k": 0.25}, demo.WARMUP_EPOCHS),
    "K-SAM k=0.1, rho=0 (top-k SGD)": ("ksam", {"k": 0.1, "rho": 0.0}, demo.WARMUP_EPOCHS),
    "K-SAM k=0.1, no warm-up": ("ksam", {"k": 0.1}, 0),
}
MODELS = {
    "demo CNN (BatchNorm in every hidden layer)": (demo.build_model, RUNS),
    "former demo CNN (pooled, dense layer without BatchNorm)": (
        pooled_cnn, {key: RUNS[key] for key in ("SGD", "K-SAM k=0.1", "K-SAM k=0.25")}
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    for title, (build, runs) in MODELS.items():
        print(f"\n{title}\n\n| run | test accuracy (mean ± sd) | per seed | dead hidden units |"
              "\n|---|---|---|---|")
        for label, (name, overrides, warmup) in runs.items():
            results = np.array([run(name, overrides, build, seed, args.epochs, warmup)
                                for seed in args.seeds])
            accuracy = 100 * results[:, 0]
            spread = f" ± {accuracy.std(ddof=1):.2f}" if len(accuracy) > 1 else ""
            print(f"| {label} | {accuracy.mean():.2f}{spread} % | "
                  f"{', '.join(f'{a:.2f}' for a in accuracy)} | "
                  f"{100 * results[:, 1].mean():.0f} % |", flush=True)


if __name__ == "__main__":
    main()
