"""Step time and memory of every keras_sam method, relative to its base optimizer.

    python -m benchmarks.speed                 # full run (~10 min on 2 CPU cores)
    python -m benchmarks.speed --quick         # seconds (CI)
    python -m benchmarks.speed --backend torch # or jax; --device gpu on TF and JAX

Every method trains its own copy of each model (`benchmarks.workloads`: a CNN with
BatchNorm, a Transformer encoder, an MLP; same initial weights), compiled with XLA
on TensorFlow and JAX and eager on PyTorch, and is timed by `benchmarks.harness`:
untimed warm-up, interleaved rounds, each round's mean step time over the base
optimizer's beside it (SGD-momentum, or AdamW for AdamW-MSAM), the median over
rounds, the machine's load recorded and flagged when high.

Memory: the bytes of variables a method adds (its optimizer's and the wrapper's
variables minus the base optimizer's); on a GPU, the allocator's peak (TensorFlow) or
bytes in use after warm-up (JAX) per method. What a process holds while it trains
(temporaries included) is `benchmarks.memory`'s measure.

``--pieces`` (TensorFlow, JAX) times the parts a step is made of
(`benchmarks.pieces`). On JAX the step is ``jax.jit``-compiled by ``fit`` and called
with the state tuple Keras' JAX ``fit`` passes, without importing TensorFlow;
``--data-parallel`` trains under ``keras.distribution.DataParallel`` over every local
device with ``perturbation_scope="global"``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

from benchmarks import common, harness, pieces, workloads
from benchmarks.speed_report import TARGETS, markdown, plot


def time_model(
    spec: workloads.ModelSpec, names: Sequence[str], methods: dict, args: argparse.Namespace
) -> dict:
    batch = spec.batch_size
    data = spec.make_data(batch * 4, 0)
    runners: dict[str, workloads.Runner] = {}
    memory: dict[str, dict] = {}
    compile_s: dict[str, float] = {}
    for name in names:
        probe = _GpuMemory()
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MSAM without MSAMCallback: intended here
            runners[name] = workloads.Runner(spec, methods[name], data, batch)
        compile_s[name] = time.perf_counter() - start
        compile_s[name] += harness.warm_up({name: runners[name].step}, args.warmup)[name]
        memory[name] = probe.added()
        print(f"  {spec.name}/{name}: compiled + warmed up in {compile_s[name]:.1f} s",
              flush=True)
    base_bytes = {
        name: common.variable_bytes(r.trainer.optimizer.variables)
        for name, r in runners.items()
        if methods[name].base == name
    }
    for name, r in runners.items():
        memory[name].update(
            common.added_variable_bytes(r.trainer, r.model, base_bytes.get(methods[name].base, 0))
        )
        memory[name]["model_bytes"] = common.variable_bytes(r.model.variables)
    steps = {name: r.step for name, r in runners.items()}
    rounds = harness.interleave(
        steps, args.rounds, harness.steps_within(steps, args.steps, args.round_budget)
    )
    results = {
        name: {
            "label": methods[name].label,
            "base": methods[name].base,
            "rho": methods[name].default_rho,
            "extra": methods[name].extra,
            **rounds.summary(name),
            **harness.ratio_to(rounds, name, methods[name].base),
            "compile_and_warmup_s": compile_s[name],
            "memory": memory[name],
        }
        for name in names
    }
    return {
        "description": spec.description,
        "batch_size": batch,
        "parameters": int(sum(math.prod(v.shape) for v in runners[names[0]].model.weights)),
        "load_during_rounds": rounds.loads,
        "methods": results,
    }


class _GpuMemory:
    """The GPU memory a method's construction and warm-up add (nothing on a CPU):
    TensorFlow's allocator peak, or JAX's bytes in use (JAX keeps a process-wide peak)."""

    def __init__(self) -> None:
        self.gpu = common.uses_gpu()
        self.jax = common.backend_name() == "jax"
        if self.gpu and self.jax:
            self.before = (common.jax_memory_stats() or {}).get("bytes_in_use", 0)
        elif self.gpu:
            import tensorflow as tf

            tf.config.experimental.reset_memory_stats("GPU:0")
            self.before = tf.config.experimental.get_memory_info("GPU:0")["current"]

    def added(self) -> dict:
        if not self.gpu:
            return {}
        if self.jax:
            after = common.jax_memory_stats() or {}
            if "bytes_in_use" not in after:
                return {}
            return {
                "gpu_bytes_in_use_added_by_warmup": int(after["bytes_in_use"] - self.before),
                "gpu_process_peak_bytes_after_warmup": int(after.get("peak_bytes_in_use", 0)),
            }
        import tensorflow as tf

        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
        return {"gpu_peak_bytes_during_warmup": int(peak - self.before)}


# ---------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.speed", description=__doc__.split("\n")[0]
    )
    common.add_common_flags(parser)
    parser.add_argument(
        "--models", nargs="+", default=None, choices=list(workloads.MODELS),
        help=f"default: all ({workloads.QUICK_DEFAULT_MODELS} with --quick)",
    )
    parser.add_argument("--methods", nargs="+", default=None, help="default: all")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=None, help="steps per method per round")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (not timed)")
    parser.add_argument(
        "--round-budget", type=float, default=20.0,
        help="at most this many seconds per method per round (fewer steps for a slow method)",
    )
    parser.add_argument(
        "--pieces", nargs="*", default=None, choices=list(workloads.MODELS),
        help="models whose step is timed piece by piece (default: cnn; none with --quick)",
    )
    parser.add_argument(
        "--data-parallel", action="store_true",
        help="JAX only: keras.distribution.DataParallel over every local device "
        "(perturbation_scope='global'); the batch is the global batch",
    )
    harness.add_load_flag(parser)
    args = parser.parse_args(argv)
    quick = args.quick
    default_models = workloads.QUICK_DEFAULT_MODELS if quick else list(workloads.MODELS)
    args.models = args.models or default_models
    args.rounds = args.rounds or (2 if quick else 7)
    args.steps = args.steps or (3 if quick else 10)
    args.warmup = args.warmup or (2 if quick else 3)
    if args.pieces is None:  # the pieces are written for TensorFlow and JAX
        torch = (args.backend or os.environ.get("KERAS_BACKEND")) == "torch"
        args.pieces = [] if quick or torch else ["cnn"]
    return args, parser


SUPPORTED_BACKENDS = ("tensorflow", "jax", "torch")


def setup_data_parallel(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``--data-parallel``: sets a DataParallel distribution; returns the device count."""
    if not args.data_parallel:
        return 1
    if common.backend_name() != "jax":
        parser.error("--data-parallel needs --backend jax (TensorFlow: see "
                     "benchmarks.mirrored_xla for MirroredStrategy).")
    import keras

    devices = keras.distribution.list_devices()
    used = {*args.models, *args.pieces}
    bad = sorted(m for m in used if workloads.spec(m, args.quick).batch_size % len(devices))
    if bad:
        parser.error(f"--data-parallel: the batch size of {bad} is not divisible by the "
                     f"{len(devices)} devices.")
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    return len(devices)


def main(argv: Sequence[str] | None = None) -> dict:
    args, parser = parse_args(argv)
    common.setup_backend(args.backend, parser, SUPPORTED_BACKENDS)
    harness.check_load(args.max_load, parser)
    if args.pieces and common.backend_name() == "torch":
        parser.error("--pieces: written for TensorFlow and JAX only.")
    device = common.setup_device(args.device, parser)
    devices = setup_data_parallel(args, parser)
    methods = common.all_methods(args.methods or ())
    names = common.select_methods(args.methods, methods)
    machine = common.machine_info(device)
    jax_backend = machine["keras_backend"] == "jax"
    print(f"speed benchmark on {device}"
          + (f" (JAX, {devices} device(s){', data parallel' if args.data_parallel else ''})"
             if jax_backend else "")
          + f"; load {machine['load_average_1_5_15']}; methods {names}", flush=True)
    start = time.perf_counter()
    report: dict[str, Any] = {
        "machine": machine,
        "settings": {
            "quick": args.quick, "rounds": args.rounds, "steps": args.steps,
            "warmup": args.warmup, "jit_compile": common.jit_compile(),
            "learning_rates": {m: workloads.MODELS[m].learning_rate for m in args.models},
        },
        "methods": {
            n: {"label": methods[n].label, "base": methods[n].base,
                "rho": methods[n].default_rho, "extra": methods[n].extra}
            for n in names
        },
        "targets": {f"{m}/{n}": t for (m, n), t in TARGETS.items()},
        "models": {},
    }
    if jax_backend:
        report["settings"]["data_parallel"] = args.data_parallel
        report["settings"]["devices"] = devices
    for model_name in args.models:
        print(f"model {model_name}", flush=True)
        spec = workloads.spec(model_name, args.quick)
        report["models"][model_name] = time_model(spec, names, methods, args)
        for name, r in report["models"][model_name]["methods"].items():
            print(f"  {name:12s} {1000 * r['median_step_s']:8.2f} ms  ratio {r['ratio']:.3f}",
                  flush=True)
        harness.write_partial(args.out, "speed", report)
    report["pieces"] = {m: pieces.time_pieces(workloads.spec(m, args.quick), args)
                        for m in args.pieces}
    report["load"] = harness.machine_load(
        machine["load_average_1_5_15"],
        [load for m in report["models"].values() for load in m["load_during_rounds"]],
    )
    if jax_backend:
        report["machine"]["tensorflow_imported"] = common.tensorflow_imported()
    report["wall_clock_s"] = time.perf_counter() - start
    out = harness.write_results(args.out, "speed", report, markdown(report), plot)
    print(markdown(report))
    print(f"\nwrote {out / 'speed.json'}, speed.md, speed.png in {report['wall_clock_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
