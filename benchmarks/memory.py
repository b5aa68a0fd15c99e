"""Peak memory of every keras_sam method, in copies of the model's parameters.

Each (model, method, XLA on/off) runs in a fresh process, so no method inherits
another's allocations. The process builds the model, compiles and trains one epoch
(compilation, tracing, optimizer slots), resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``) and trains ``--epochs`` more. Reported per method:

* ``steady``: peak resident memory during those epochs minus the resident memory of
  the built model before compilation: what training holds (optimizer slots, the
  step's buffers), compilation excluded;
* ``buffers``: ``steady`` less what glibc's heap (every block below the mmap
  threshold) grew by from the resting model to the end of training: compiled
  programs, traced functions and Python objects, a fixed amount that does not grow
  with the parameters (an eager JAX step compiles a program per operation: up to
  200 MiB more for one method than another, on any model size). With every block
  from the threshold up in its own mapping, ``buffers`` are the tensors;
* ``with_compile``: the same from the first `fit` on (compilation included);
* on a GPU, the device's own peak (``jax.Device.memory_stats()``,
  ``tf.config.experimental.get_memory_info``) over the same span as ``steady``.

Every probe runs with glibc's mmap threshold fixed (`_MMAP_THRESHOLD`), so that
the figures are the buffers' and not the heap's fragmentation.

The tables give each method's figure above its base optimizer's, in parameter
copies (bytes / parameter bytes) and MiB. What the algorithms need: 0 copies for
Momentum-SAM (its perturbation lives along the momentum the base optimizer keeps),
1 for the two-pass wrappers (ε, or the perturbed weights). Resident-set figures
carry the allocator's noise (a few MiB): use a model whose parameters dominate
(``wide``, 144 MiB of float32 weights) to read copies.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common, harness, workloads

SUPPORTED_BACKENDS = ("tensorflow", "jax", "torch")
WIDE_WIDTH = 3072  # 4 hidden layers of 3072: 37.8 M float32 weights, 144 MiB
WIDE_BATCH = 64
STEPS_PER_EPOCH = 8


def build_wide(seed: int, width: int = WIDE_WIDTH) -> Any:
    """An MLP ``width``-``width``×4-10 whose parameters dominate its memory."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((width,))
    h = inputs
    for _ in range(4):
        h = keras.layers.Dense(width, activation="relu")(h)
    return keras.Model(inputs, keras.layers.Dense(10)(h), name="wide")


def _wide_data(n: int, seed: int, width: int = WIDE_WIDTH) -> tuple:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, width), dtype="float32"), rng.integers(0, 10, n).astype("int32")


MODELS = {
    "wide": workloads.ModelSpec(
        "wide", f"MLP {WIDE_WIDTH}-{WIDE_WIDTH}×4-10 (144 MiB of weights), batch {WIDE_BATCH}",
        build_wide, WIDE_BATCH, _wide_data, {"sgd": 0.01, "adamw": 1e-4},
    ),
    "cnn": workloads.MODELS["cnn"],
}


# ---------------------------------------------------------------------- one probe
def _rss_bytes(field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (the peak since the last reset) of this process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost",
    )]


def _heap_bytes() -> int | None:
    """Bytes glibc's malloc has handed out from its heap, blocks served by their own
    mappings excluded (``mallinfo2().uordblks``); None without glibc 2.33."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    return int(mallinfo2().uordblks)


def _reset_peak() -> None:
    """Sets this process's peak RSS to its current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _device_peak_reset() -> Any:
    """A function that returns the device's peak bytes since now (GPU only)."""
    backend = common.backend_name()
    if not common.uses_gpu():
        return lambda: None
    if backend == "jax":
        import jax

        device = jax.local_devices()[0]
        start = device.memory_stats().get("peak_bytes_in_use", 0)
        # JAX keeps one process-wide peak: report it only when training raised it.
        return lambda: max(device.memory_stats().get("peak_bytes_in_use", 0) - start, 0) or None
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.reset_memory_stats("GPU:0")
        return lambda: tf.config.experimental.get_memory_info("GPU:0")["peak"]
    import torch

    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.max_memory_allocated


def probe(model_name: str, method_name: str, jit: bool, epochs: int, quick: bool) -> dict:
    """Inside a fresh process: the figures of the module docstring, in bytes."""
    import keras

    method = common.all_methods([method_name])[method_name]
    spec = _spec(model_name, quick)
    x, y = spec.make_data(spec.batch_size * STEPS_PER_EPOCH, 0)
    model = spec.build(0)
    parameter_bytes = common.variable_bytes(model.trainable_variables)
    resting = _rss_bytes("VmRSS")
    resting_heap = _heap_bytes()
    _reset_peak()
    trainer = method.wrap(model, method.default_rho)
    trainer.compile(
        optimizer=method.optimizer(spec.learning_rate[method.base], method.default_rho),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
    fit = dict(batch_size=spec.batch_size, shuffle=False, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(x, y, epochs=1, **fit)
        with_compile = _rss_bytes("VmHWM")
        _reset_peak()
        device_peak = _device_peak_reset()
        trainer.fit(x, y, epochs=epochs, **fit)
    steady = _rss_bytes("VmHWM") - resting
    heap = _heap_bytes()
    heap = None if heap is None or resting_heap is None else heap - resting_heap
    return {
        "parameter_bytes": parameter_bytes,
        "resting_bytes": resting,
        "steady_bytes": steady,
        "heap_bytes": heap,
        "buffer_bytes": None if heap is None else steady - heap,
        "with_compile_bytes": with_compile - resting,
        "device_peak_bytes": device_peak(),
    }


def _spec(model_name: str, quick: bool) -> workloads.ModelSpec:
    spec = MODELS[model_name]
    if not quick:
        return spec
    build = (lambda seed: build_wide(seed, 64)) if model_name == "wide" else spec.build
    data = (lambda n, seed: _wide_data(n, seed, 64)) if model_name == "wide" else spec.make_data
    return workloads.ModelSpec(spec.name, spec.description, build, workloads.QUICK_BATCH, data,
                               spec.learning_rate)


#: glibc's malloc serves blocks from this size up with their own mappings, which it
#: returns to the system when they are freed. Left to itself it raises the bound
#: past the blocks a step frees and keeps them in its heap, whose size then depends
#: on fragmentation: three identical JAX runs of Momentum-SAM without XLA peaked
#: 796, 674 and 793 MiB above the model; with the bound fixed, 766 to 770 (SGD's
#: 670 to 675).
_MMAP_THRESHOLD = 64 * 1024


def run_probe(model_name: str, method_name: str, jit: bool, args: argparse.Namespace) -> dict:
    """`probe` in a subprocess; its JSON line, or ``{"error": ...}``."""
    command = [
        sys.executable, "-m", "benchmarks.memory", "--probe", model_name, method_name,
        "on" if jit else "off", "--backend", common.backend_name(), "--device", args.device,
        "--epochs", str(args.epochs),
    ] + (["--quick"] if args.quick else [])
    done = subprocess.run(
        command, capture_output=True, text=True, check=False,
        env=dict(os.environ, PYTHONWARNINGS="ignore", MALLOC_MMAP_THRESHOLD_=str(_MMAP_THRESHOLD)),
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("MEMORY_PROBE ")]
    if done.returncode != 0 or not lines:
        return {"error": done.stderr[-2000:]}
    return json.loads(lines[-1][len("MEMORY_PROBE "):])


# ---------------------------------------------------------------------- report
def above_base(results: dict, methods: dict, key: str) -> dict:
    """Per method, ``key`` above its base optimizer's: bytes and parameter copies."""
    table = {}
    for name, r in results.items():
        base = results.get(methods[name]["base"])
        if "error" in r or base is None or "error" in base:
            continue
        if r.get(key) is None or base.get(key) is None:
            continue
        extra = r[key] - base[key]
        table[name] = {"bytes": extra, "copies": extra / r["parameter_bytes"]}
    return table


def markdown(report: dict) -> str:
    lines = [
        "# Peak memory above the base optimizer",
        "",
        f"{harness.provenance(report['machine'])}, Keras backend "
        f"{report['machine']['keras_backend']}.",
        "",
        "Each cell: peak memory during training above the base optimizer's, in copies of",
        "the model's parameters (MiB in brackets); compilation excluded (`steady`), then",
        "included. `buffers`: `steady` less what malloc's heap grew by (compiled programs,",
        "traced functions, Python objects: a fixed amount, not a multiple of the",
        "parameters), so the tensors alone. One fresh process per cell. What the",
        "algorithm needs: 0 copies for Momentum-SAM, 1 for the two-pass wrappers.",
    ]
    methods = report["methods"]
    for model_name, by_jit in report["models"].items():
        jits = list(by_jit)
        lines += ["", f"## {MODELS[model_name].description}", ""]
        header = [f"XLA {jit}: {k}" for jit in jits for k in ("steady", "buffers", "with compile")]
        lines += ["| method | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
        cells: dict[str, list[str]] = {}
        for jit in jits:
            for key in ("steady_bytes", "buffer_bytes", "with_compile_bytes"):
                table = above_base(by_jit[jit], methods, key)
                for name in by_jit[jit]:
                    entry = table.get(name)
                    cells.setdefault(name, []).append(
                        "n/a" if entry is None
                        else f"{entry['copies']:+.2f} ({entry['bytes'] / 2**20:+.0f} MiB)"
                    )
        for name, row in cells.items():
            label = methods[name]["label"]
            lines.append(f"| {label} | " + " | ".join(row) + " |")
        first = next(iter(by_jit.values()))
        parameter = next((r["parameter_bytes"] for r in first.values() if "error" not in r), None)
        lines += ["", f"Parameters: {harness.human_bytes(parameter)}."]
    lines += ["", harness.load_note(report["load"])]
    return "\n".join(lines)


# ---------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.memory", description=__doc__.split("\n")[0]
    )
    common.add_common_flags(parser)
    parser.add_argument("--models", nargs="+", default=None, choices=list(MODELS),
                        help="default: wide cnn (wide with --quick)")
    parser.add_argument("--methods", nargs="+", default=None, help="default: all")
    parser.add_argument("--xla", nargs="+", default=["on", "off"], choices=("on", "off"))
    parser.add_argument("--epochs", type=int, default=2, help="measured epochs (8 steps each)")
    harness.add_load_flag(parser)
    parser.add_argument("--probe", nargs=3, metavar=("MODEL", "METHOD", "XLA"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = args.models or (["wide"] if args.quick else list(MODELS))
    return args, parser


def main(argv: Sequence[str] | None = None) -> dict:
    args, parser = parse_args(argv)
    common.setup_backend(args.backend, parser, SUPPORTED_BACKENDS)
    if not Path("/proc/self/clear_refs").exists():
        parser.error("the memory benchmark reads /proc (Linux).")
    device = common.setup_device(args.device, parser)
    if args.probe:
        model_name, method_name, xla = args.probe
        result = probe(model_name, method_name, xla == "on", args.epochs, args.quick)
        print("MEMORY_PROBE " + json.dumps(result), flush=True)
        return result
    harness.check_load(args.max_load, parser)
    if common.backend_name() == "torch" and "on" in args.xla:
        args.xla = [x for x in args.xla if x == "off"]  # the wrappers refuse torch.compile
    methods = common.all_methods(args.methods or ())
    names = common.select_methods(args.methods, methods)
    machine = common.machine_info(device)
    print(f"memory benchmark on {device}; load {machine['load_average_1_5_15']}", flush=True)
    report: dict[str, Any] = {
        "machine": machine,
        "settings": {"epochs": args.epochs, "steps_per_epoch": STEPS_PER_EPOCH,
                     "quick": args.quick},
        "methods": {n: {"label": methods[n].label, "base": methods[n].base} for n in names},
        "models": {},
    }
    loads = []
    for model_name in args.models:
        report["models"][model_name] = {}
        for xla in args.xla:
            results = {}
            for name in names:
                results[name] = run_probe(model_name, name, xla == "on", args)
                loads.append(harness.load_now())
                shown = ("failed: " + results[name]["error"][-300:] if "error" in results[name]
                         else harness.human_bytes(results[name]["steady_bytes"]))
                print(f"  {model_name} XLA {xla} {name:12s} {shown}", flush=True)
            report["models"][model_name][xla] = results
            harness.write_partial(args.out, "memory", report)
    report["load"] = harness.machine_load(machine["load_average_1_5_15"], loads)
    harness.write_results(args.out, "memory", report, markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
