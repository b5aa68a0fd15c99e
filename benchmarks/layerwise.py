"""LayerwiseSAM's step time as the chosen layers reach deeper into the model.

    python -m benchmarks.layerwise [--backend jax] [--rounds 5] [--steps 5] [--out DIR]

On the speed benchmark's CNN (13 layers with weights: 6 conv, 6 BatchNorm, 1 dense;
batch 128, XLA), times `fit` steps of SGD-momentum, SAM, LayerwiseSAM with its
defaults (live ranking over the output-side quarter of the layers), LayerwiseSAM
ranking every layer (``layers=None``), and LayerwiseSAM with the K output-side-most
layers fixed (K = 1 ... 13; K = 13 is SAM). The step's cost follows the depth of the
lowest chosen layer, so the fixed rows give the cost curve and the live rows show
where the ranking puts the cut. Interleaved rounds; median step time; ratios to SGD
and to SAM from the same process (steps timed with `train_on_batch`: timing `fit`
calls of a few steps proved erratic). Writes ``layerwise.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchmarks import common

FIXED_K = (1, 2, 4, 7, 10, 13)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="tensorflow", help="'tensorflow' or 'jax'")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--warmup-epochs", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent.parent / "docs/benchmarks"))
    parser.add_argument("--quick", action="store_true", help="tiny run (tests)")
    args = parser.parse_args()
    common.setup_backend(args.backend, parser, supported=("tensorflow", "jax"))
    return args


def _configs(keras_sam: object) -> dict:
    lw = keras_sam.LayerwiseSAM
    configs = {
        "SGD-momentum (base)": lambda m: m,
        "SAM": lambda m: keras_sam.SAM(m, rho=0.05),
        "LayerwiseSAM (defaults)": lambda m: lw(m, rho=0.05),
        "LayerwiseSAM (layers=None)": lambda m: lw(m, rho=0.05, layers=None),
    }
    for k in FIXED_K:
        configs[f"LayerwiseSAM (top {k} fixed)"] = lambda m, k=k: lw(
            m, rho=0.05, layers=None, num_layers=k, reselect_every=10**9
        )
    return configs


def main() -> None:
    args = _parse()
    import keras
    import numpy as np

    import keras_sam
    from benchmarks.speed import build_cnn

    batch, steps = (16, 2) if args.quick else (128, args.steps)
    rounds = 1 if args.quick else args.rounds
    rng = np.random.default_rng(0)
    n = batch * max(steps, 4)
    x = rng.random((n, 32, 32, 3), dtype="float32")
    y = rng.integers(0, 10, n).astype("int32")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    trainers = {}
    for name, make in _configs(keras_sam).items():
        trainer = make(build_cnn(0))
        trainer.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=loss,
                        jit_compile=True)
        warmup = 1 if args.quick else args.warmup_epochs
        trainer.fit(x, y, batch_size=batch, epochs=warmup, shuffle=False, verbose=0)
        trainers[name] = trainer
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(rounds):
        for name, trainer in trainers.items():
            trainer.train_on_batch(x[:batch], y[:batch])  # not timed
            start = time.perf_counter()
            for step in range(steps):
                trainer.train_on_batch(x[step * batch : (step + 1) * batch],
                                       y[step * batch : (step + 1) * batch])
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    median = {name: float(np.median(t)) for name, t in times.items()}
    sgd, sam = median["SGD-momentum (base)"], median["SAM"]
    rows = []
    for name, trainer in trainers.items():
        lowest, chosen = "", ""
        if isinstance(trainer, keras_sam.LayerwiseSAM):
            everything = [layer.name for layer in trainer.model.layers if layer.weights]
            selected = trainer.selected_layers
            lowest = f"{everything.index(selected[0])} of {len(everything)}"
            chosen = f"{len(selected)}, lowest {selected[0]}"
        rows.append(
            f"| {name} | {chosen} | {lowest} | {median[name]:.1f} | "
            f"**{median[name] / sgd:.2f}×** | {median[name] / sam:.2f}× |"
        )
    header = [
        "# LayerwiseSAM: step time against the depth of the chosen layers",
        "",
        f"`python -m benchmarks.layerwise --backend {args.backend} --rounds {rounds} "
        f"--steps {steps}` — Keras {keras.__version__}, backend {args.backend}, "
        f"{os.cpu_count()} CPU cores, load average at the end "
        f"{tuple(round(v, 2) for v in os.getloadavg())}.",
        "",
        "CNN + BatchNorm of the speed benchmark, batch "
        f"{batch}, XLA; median `train_on_batch` step of {rounds} interleaved rounds × "
        f"{steps} steps "
        "after warm-up. *Lowest chosen*: the position of the lowest chosen layer among "
        "the model's layers with weights (0 = the first conv), at the end of the run.",
        "",
        "| configuration | chosen (end) | lowest chosen | step (ms) | vs SGD | vs SAM |",
        "|---|---|---|---|---|---|",
    ]
    text = "\n".join(header + rows) + "\n"
    print(text)
    if not args.quick:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "layerwise.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
