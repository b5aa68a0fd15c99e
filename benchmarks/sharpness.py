"""Sharpness of trained weights (with `keras_sam.sharpness`) and what measuring it costs.

`sharpness(model, x, y)` is what the generalization benchmark reports per method:
the loss, the top Hessian eigenvalue, the one-step worst-case sharpness at radius
ρ on all the samples and on chunks of ``m`` (m-sharpness), and the average loss
increase along filter-normalized random directions of relative size α (Li et al.
2018), all in inference mode.

``python -m benchmarks.sharpness`` times a Hessian-vector product against a
gradient on the speed benchmark's CNN (same batch, both compiled) and the top
Hessian eigenvalue on 512 samples, and writes ``sharpness_cost.json/md``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks import common, harness


def sharpness(
    model: Any,
    x: Any,
    y: Any,
    rho: float = 0.05,
    alpha: float = 0.1,
    num_random: int = 5,
    seed: int = 0,
    loss: Any = None,
    m: int = 128,
) -> dict:
    """Sharpness measures of ``model`` on ``(x, y)`` (its weights are not changed).

    Returns:
        ``{"loss", "hessian_top", "ascent", "m_sharpness", "random", "random_std"}``.
    """
    import keras

    from keras_sam import sharpness as measure

    loss = loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    data = (x, y)
    landscape = measure.loss_landscape(model, data, loss, points=2 * num_random + 1,
                                       span=alpha * num_random, seed=seed)
    center = float(landscape["losses"][num_random])
    random_increase = landscape["losses"][[num_random - 1, num_random + 1]] - center
    return {
        "loss": center,
        "hessian_top": float(
            measure.hessian_eigenvalues(model, data, loss, k=1, max_iters=30, seed=seed)[0]
        ),
        "ascent": measure.worst_case_sharpness(model, data, loss, rho=rho),
        "m_sharpness": measure.worst_case_sharpness(model, data, loss, rho=rho, m=m),
        "random": float(np.mean(random_increase)),
        "random_std": float(np.std(random_increase)),
    }


def measure_cost(samples: int, repeats: int) -> dict:
    """Median seconds of a gradient and of an HVP on one batch, and of the top eigenvalue."""
    import keras

    from benchmarks import workloads
    from keras_sam import backend
    from keras_sam import sharpness as measure

    model = workloads.build_cnn(0)
    rng = np.random.default_rng(0)
    x = rng.random((samples, 32, 32, 3), dtype="float32")
    y = rng.integers(0, 10, size=(samples,))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    values = [v.value for v in model.trainable_variables]
    vectors = [keras.ops.ones_like(v) for v in values]
    non_trainable = [v.value for v in model.non_trainable_variables]
    xb, yb = keras.ops.convert_to_tensor(x[:128]), keras.ops.convert_to_tensor(y[:128])

    def loss_of(v: list) -> Any:
        y_pred, _ = model.stateless_call(v, non_trainable, xb, training=False)
        return loss(yb, y_pred)

    gradient = backend.function(lambda v: backend.gradient(loss_of, v))
    hvp = backend.function(lambda v, d: backend.hessian_vector_product(loss_of, v, d))

    def block(out: Any) -> None:
        keras.ops.convert_to_numpy(out[0])

    steps = {
        "gradient": harness.timed(lambda: gradient(values), block),
        "hvp": harness.timed(lambda: hvp(values, vectors), block),
    }
    harness.warm_up(steps, 1)  # compiles
    rounds = harness.interleave(steps, repeats, 1)
    gradient_s, hvp_s = (rounds.summary(n)["median_step_s"] for n in steps)
    start = time.perf_counter()
    top = measure.hessian_eigenvalues(model, (x, y), loss, k=1, seed=0, batch_size=128)
    eigen_s = time.perf_counter() - start
    return {
        "gradient_s": gradient_s,
        "hvp_s": hvp_s,
        "hvp_over_gradient": hvp_s / gradient_s,
        "top_eigenvalue": float(top[0]),
        "top_eigenvalue_s": eigen_s,
        "samples": samples,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_flags(parser)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    common.setup_backend(args.backend, parser)
    samples, repeats = (128, 3) if args.quick else (args.samples, args.repeats)
    report = {"machine": common.machine_info(args.device), "cost": measure_cost(samples, repeats)}
    report["load"] = harness.machine_load(report["machine"]["load_average_1_5_15"])
    cost = report["cost"]
    text = (
        "# What measuring sharpness costs\n\n"
        f"{harness.provenance(report['machine'])}. {harness.load_note(report['load'])}\n\n"
        "Speed benchmark CNN (BatchNorm, 32×32×3), inference mode, batch 128, compiled.\n\n"
        "| gradient (ms) | Hessian-vector product (ms) | HVP / gradient | "
        f"top eigenvalue on {cost['samples']} samples (s) |\n|---|---|---|---|\n"
        f"| {1000 * cost['gradient_s']:.1f} | {1000 * cost['hvp_s']:.1f} | "
        f"{cost['hvp_over_gradient']:.2f}× | {cost['top_eigenvalue_s']:.1f} |"
    )
    harness.write_results(args.out, "sharpness_cost", report, text)
    print(text)
    return report


if __name__ == "__main__":
    main()
