"""LayerwiseSAM's step time as the chosen layers reach deeper into the model.

    python -m benchmarks.layerwise [--backend jax] [--rounds 5] [--steps 5] [--out DIR]

On the speed benchmark's CNN (13 layers with weights: 6 conv, 6 BatchNorm, 1 dense;
batch 128; XLA on TensorFlow and JAX), times the steps of SGD-momentum, SAM, LayerwiseSAM with its
defaults (live ranking over the output-side quarter of the layers), LayerwiseSAM
ranking every layer (``layers=None``), and LayerwiseSAM with the K output-side-most
layers fixed (K = 1 ... 13; K = 13 is SAM). The step's cost follows the depth of the
lowest chosen layer, so the fixed rows give the cost curve and the live rows show
where the ranking puts the cut. Timed with `benchmarks.harness` (interleaved rounds,
ratios to SGD and to SAM beside them) on `train_on_batch` steps (timing `fit` calls of
a few steps proved erratic). Writes ``layerwise.md`` and ``layerwise.json`` into
``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import common, harness

FIXED_K = (1, 2, 4, 7, 10, 13)


def _parse() -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="tensorflow", help="'tensorflow', 'jax' or 'torch'")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--warmup-epochs", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent.parent / "docs/benchmarks"))
    parser.add_argument("--quick", action="store_true", help="tiny run (tests)")
    harness.add_load_flag(parser)
    args = parser.parse_args()
    common.setup_backend(args.backend, parser, supported=("tensorflow", "jax", "torch"))
    return args, parser


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


def _train_on_batches(trainer: Any, x: Any, y: Any, batch: int) -> Callable[[], Any]:
    """One `train_on_batch` per call, cycling over the batches of ``x``, ``y``."""
    starts = itertools.cycle(range(0, len(x) - batch + 1, batch))

    def run() -> Any:
        i = next(starts)
        return trainer.train_on_batch(x[i:i + batch], y[i:i + batch])

    return run


def main() -> None:
    args, parser = _parse()
    import keras
    import numpy as np

    import keras_sam
    from benchmarks.workloads import build_cnn

    harness.check_load(args.max_load, parser)
    machine = common.machine_info("cpu")
    batch, steps = (16, 2) if args.quick else (128, args.steps)
    rounds = 1 if args.quick else args.rounds
    rng = np.random.default_rng(0)
    n = batch * max(steps, 4)
    x = rng.random((n, 32, 32, 3), dtype="float32")
    y = rng.integers(0, 10, n).astype("int32")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    trainers, timed = {}, {}
    for name, make in _configs(keras_sam).items():
        trainer = make(build_cnn(0))
        trainer.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=loss,
                        jit_compile=common.jit_compile())
        warmup = 1 if args.quick else args.warmup_epochs
        trainer.fit(x, y, batch_size=batch, epochs=warmup, shuffle=False, verbose=0)
        trainers[name] = trainer
        timed[name] = harness.timed(_train_on_batches(trainer, x, y, batch))
    harness.warm_up(timed, 2)  # train_on_batch's own first calls
    measured = harness.interleave(timed, rounds, steps)
    rows = []
    for name, trainer in trainers.items():
        lowest, chosen = "", ""
        if isinstance(trainer, keras_sam.LayerwiseSAM):
            everything = [layer.name for layer in trainer.model.layers if layer.weights]
            selected = trainer.selected_layers
            lowest = f"{everything.index(selected[0])} of {len(everything)}"
            chosen = f"{len(selected)}, lowest {selected[0]}"
        vs_sgd = harness.ratio_to(measured, name, "SGD-momentum (base)")["ratio"]
        vs_sam = harness.ratio_to(measured, name, "SAM")["ratio"]
        step_ms = 1000 * measured.summary(name)["median_step_s"]
        rows.append(f"| {name} | {chosen} | {lowest} | {step_ms:.1f} | **{vs_sgd:.2f}×** "
                    f"| {vs_sam:.2f}× |")
    load = harness.machine_load(machine["load_average_1_5_15"], measured.loads)
    header = [
        "# LayerwiseSAM: step time against the depth of the chosen layers",
        "",
        f"`{machine['command']}` — Keras {keras.__version__}, backend {args.backend}, "
        f"{machine['device']}.",
        "",
        harness.load_note(load),
        "",
        f"CNN + BatchNorm of the speed benchmark, batch {batch}; `train_on_batch` steps "
        f"in {rounds} interleaved rounds × {steps} steps after warm-up (benchmarks.harness: "
        "ratios are medians over rounds of each round's mean over SGD's or SAM's beside "
        "it). *Lowest chosen*: the position of the lowest chosen layer among the model's "
        "layers with weights (0 = the first conv), at the end of the run.",
        "",
        "| configuration | chosen (end) | lowest chosen | step (ms) | vs SGD | vs SAM |",
        "|---|---|---|---|---|---|",
    ]
    text = "\n".join(header + rows)
    print(text)
    if not args.quick:
        report = {"machine": machine, "load": load, "rounds": measured.round_means,
                  "rows": rows}
        harness.write_results(args.out, "layerwise", report, text)


if __name__ == "__main__":
    sys.exit(main())
