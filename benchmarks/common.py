"""What the benchmarks share besides timing (`benchmarks.harness`): backend and device
flags, the methods of the registry, memory accounting and the machine's description.

Nothing here imports Keras at module level: ``--backend`` must be able to set
``KERAS_BACKEND`` before Keras is first imported. Nothing on the JAX path imports
TensorFlow (the GPU machines the JAX runs target may not have it installed).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import math
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import harness

SUPPORTED_BACKENDS = ("tensorflow",)  # a script passes its own tuple to `setup_backend`
KNOWN_BACKENDS = ("tensorflow", "jax", "torch", "numpy", "openvino")
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"


# ---------------------------------------------------------------------- flags
def add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        default=None,
        help="Keras backend: 'tensorflow' (default), 'jax' or 'torch' (sets KERAS_BACKEND "
        "before Keras is imported; the JAX and PyTorch paths never import TensorFlow).",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "gpu"),
        help="'cpu' hides every GPU; 'gpu' requires one; 'auto' uses a GPU when present.",
    )
    parser.add_argument(
        "--out", default=str(DEFAULT_OUT), help="output folder (JSON, markdown, PNG)"
    )
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (CI)")


def setup_backend(
    backend: str | None,
    parser: argparse.ArgumentParser,
    supported: Sequence[str] = SUPPORTED_BACKENDS,
) -> str:
    """Validates ``--backend`` and sets ``KERAS_BACKEND`` if Keras is not imported yet.

    ``supported`` are the backends the calling script runs on. On JAX and PyTorch,
    TensorFlow is made unimportable for the rest of the process (when it is not imported yet):
    Keras' ``set_random_seed`` imports TensorFlow whenever it is installed, only to seed
    it, which would put TensorFlow's memory and threads into the JAX measurements and
    hide a dependency that the TensorFlow-less GPU machines do not satisfy.
    """
    if backend is None:
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        backend = os.environ["KERAS_BACKEND"]
    if backend not in KNOWN_BACKENDS:
        parser.error(f"--backend must be one of {KNOWN_BACKENDS}, got {backend!r}.")
    if backend not in supported:
        parser.error(
            f"--backend {backend}: this benchmark supports {', '.join(supported)} only "
            f"(keras_sam's wrappers do not run on {backend}). "
            f"Use --backend {' or --backend '.join(supported)}."
        )
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != backend:
            parser.error(
                f"--backend {backend}: Keras is already imported with the "
                f"{keras.backend.backend()!r} backend in this process."
            )
    else:
        os.environ["KERAS_BACKEND"] = backend
    if backend in ("jax", "torch") and "tensorflow" not in sys.modules:
        sys.modules["tensorflow"] = None  # type: ignore[assignment]  # `import` raises
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return backend


def backend_name() -> str:
    """The backend `setup_backend` chose (without importing Keras)."""
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def jit_compile() -> bool:
    """``jit_compile`` for the trainers: XLA on TensorFlow and JAX; PyTorch's wrappers
    run eagerly (they refuse `torch.compile`)."""
    return backend_name() != "torch"


def tensorflow_imported() -> bool:
    return sys.modules.get("tensorflow") is not None


def setup_device(device: str, parser: argparse.ArgumentParser) -> str:
    """Applies ``--device`` and returns a description of the device used."""
    if backend_name() == "jax":
        return _setup_jax_device(device, parser)
    if backend_name() == "torch":
        return _setup_torch_device(device, parser)
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if device == "cpu" and gpus:
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # TF already initialized its devices in this process
            parser.error("--device cpu: TensorFlow already initialized the GPU here.")
        gpus = []
    if device == "gpu" and not gpus:
        parser.error("--device gpu: TensorFlow sees no GPU on this machine.")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"GPU: {details.get('device_name', gpus[0].name)}"
    return f"CPU: {cpu_model()} ({os.cpu_count()} logical cores)"


JAX_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def _setup_jax_device(device: str, parser: argparse.ArgumentParser) -> str:
    if device == "cpu":
        if "jax" in sys.modules:
            import jax

            jax.config.update("jax_platforms", "cpu")
        else:
            os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    devices = jax.devices()
    platform_name = devices[0].platform
    if device == "cpu" and platform_name != "cpu":
        parser.error("--device cpu: JAX already initialized its accelerators here.")
    if device == "gpu" and platform_name not in JAX_GPU_PLATFORMS:
        parser.error(f"--device gpu: JAX sees no GPU here (devices: {devices}).")
    count = f" ×{len(devices)}" if len(devices) > 1 else ""
    if platform_name in JAX_GPU_PLATFORMS:
        return f"GPU: {devices[0].device_kind}{count} (JAX)"
    if platform_name != "cpu":
        return f"{platform_name.upper()}: {devices[0].device_kind}{count} (JAX)"
    jax_devices = f", {len(devices)} JAX devices" if len(devices) > 1 else ""
    return f"CPU: {cpu_model()} ({os.cpu_count()} logical cores{jax_devices})"


def _setup_torch_device(device: str, parser: argparse.ArgumentParser) -> str:
    import torch

    if device == "gpu":
        parser.error("--device gpu: the PyTorch path times the CPU only (Keras places "
                     "tensors on CUDA when torch sees one; hide it for a CPU run).")
    if torch.cuda.is_available():
        parser.error("--backend torch: torch sees a GPU; set CUDA_VISIBLE_DEVICES= for a "
                     "CPU run.")
    return f"CPU: {cpu_model()} ({os.cpu_count()} logical cores, PyTorch)"


def uses_gpu() -> bool:
    if backend_name() == "jax":
        import jax

        return jax.devices()[0].platform in JAX_GPU_PLATFORMS
    if backend_name() == "torch":
        return False
    import tensorflow as tf

    return bool(tf.config.get_visible_devices("GPU"))


def jax_memory_stats() -> dict | None:
    """The first JAX device's allocator statistics (None where it keeps none, e.g. CPU)."""
    import jax

    try:
        return jax.devices()[0].memory_stats()
    except Exception:  # optional diagnostics; backend-dependent
        return None


# ---------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict:
    import keras

    import keras_sam

    load = harness.load_now()
    memory = None
    try:
        with open("/proc/meminfo") as f:
            memory = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "memory_bytes": memory,
        "load_average_1_5_15": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "keras": keras.__version__,
    }
    if keras.backend.backend() == "jax":
        import jax
        import jaxlib

        info.update({
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "jax_default_backend": jax.default_backend(),
            "jax_devices": [f"{d} ({d.device_kind})" for d in jax.devices()],
        })
    elif keras.backend.backend() == "torch":
        import torch

        info.update({"torch": torch.__version__, "torch_threads": torch.get_num_threads()})
    else:
        import tensorflow as tf

        info["tensorflow"] = tf.__version__
    info.update({
        "keras_sam": keras_sam.__version__,
        "keras_backend": keras.backend.backend(),
        "command": "python -m " + " ".join([_module_name(), *sys.argv[1:]]),
    })
    return info


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).name


# ---------------------------------------------------------------------- methods
@dataclasses.dataclass(frozen=True)
class Method:
    """One training method: how to wrap a model and which optimizer it compiles with.

    ``wrap(model, rho)`` returns the object to compile and train (the model itself
    for the optimizer-only methods); ``optimizer(learning_rate, rho)`` the optimizer.
    ``rho`` may be a float or a callable of the step (a schedule).
    """

    name: str
    label: str
    base: str
    wrap: Callable[[Any, Any], Any]
    optimizer: Callable[[Any, Any], Any]
    default_rho: float | None
    #: the generalization benchmark's ρ grid (empty for the base optimizers)
    rho_grid: tuple[float, ...] = ()
    #: Momentum-SAM optimizers keep the weights perturbed between steps
    momentum_sam: bool = False
    #: a one-line description of the hyperparameters other than ρ
    extra: str = ""


def all_methods(requested: Sequence[str] = ()) -> dict[str, Method]:
    """Every method of `keras_sam.registry`, plus the base optimizers, by name; and
    after its method, each ``name:argument=value,...`` of ``requested``: the method
    with those arguments instead of the registry's (``ksam:k=0.1``)."""
    from keras_sam import registry

    def same(model: Any, rho: Any) -> Any:
        return model

    def base(entry: Any) -> Method:
        return Method(
            entry.name, f"{entry.title} (base)", entry.name, same,
            lambda lr, rho: entry.make(lr), None,
        )

    def method(entry: Any) -> Method:
        return Method(
            entry.name, entry.title, entry.base, entry.make_trainer, entry.make_optimizer,
            entry.rho, entry.rho_grid, momentum_sam=entry.is_optimizer, extra=entry.options,
        )

    def variant(name: str) -> Method:
        entry_name, _, text = name.partition(":")
        if entry_name not in registry.METHODS:
            raise SystemExit(f"unknown method {entry_name!r} in {name!r}")
        entry = registry.METHODS[entry_name]
        arguments = dict(_argument(pair) for pair in text.split(","))
        return dataclasses.replace(
            method(entry), name=name,
            wrap=lambda model, rho: entry.make_trainer(model, rho, **arguments),
            optimizer=lambda lr, rho: entry.make_optimizer(lr, rho, **arguments),
            extra=entry.describe(**arguments),
        )

    variants = [variant(name) for name in requested if ":" in name]
    methods = []
    for key in ("sgd", "adamw"):
        methods.append(base(registry.BASES[key]))
        for entry in registry.METHODS.values():
            if entry.base == key:
                methods.append(method(entry))
                methods += [v for v in variants if v.name.partition(":")[0] == entry.name]
    return {m.name: m for m in methods}


def _argument(pair: str) -> tuple[str, Any]:
    """``"k=0.1"`` -> ``("k", 0.1)``; a value that is not a Python literal stays text."""
    name, equals, value = pair.partition("=")
    if not equals or not name:
        raise SystemExit(f"expected argument=value, got {pair!r}")
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def sgd_momentum() -> float:
    """The momentum of the SGD base optimizer (the registry's)."""
    from keras_sam import registry

    return registry.SGD_MOMENTUM


def ksam_k() -> float:
    """K-SAM's k in the benchmarks (the registry's)."""
    from keras_sam import registry

    return registry.METHODS["ksam"].hyperparameters["k"]


def select_methods(requested: Sequence[str] | None, available: dict[str, Method]) -> list[str]:
    """The requested methods plus the base optimizers they are compared against."""
    names = list(available) if not requested else list(requested)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; available: {list(available)}")
    bases = [available[n].base for n in names]
    return [n for n in available if n in names or n in bases]


# ---------------------------------------------------------------------- memory
def variable_bytes(variables: Sequence[Any]) -> int:
    return int(sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables))


def added_variable_bytes(trainer: Any, model: Any, base_optimizer_bytes: int) -> dict:
    """Bytes of variables a method holds beyond the model and its base optimizer.

    = the method's optimizer variables + the wrapper's own variables − the base
    optimizer's variables (on the same model).
    """
    own = {id(v) for v in model.variables} | {id(v) for v in trainer.optimizer.variables}
    wrapper_only = [v for v in trainer.variables if id(v) not in own]
    optimizer_bytes = variable_bytes(trainer.optimizer.variables)
    wrapper_bytes = variable_bytes(wrapper_only)
    return {
        "optimizer_bytes": optimizer_bytes,
        "wrapper_bytes": wrapper_bytes,
        "added_bytes": optimizer_bytes + wrapper_bytes - base_optimizer_bytes,
    }
