"""The benchmarks run end to end in --quick mode (so they never rot) and report every method."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks import common, generalization, generalization_report, memory, speed


def _finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


#: The benchmarks run every registered method (checked below without running them);
#: the quick runs time a sample: each kind of step (two passes, a subset of the batch,
#: per-variant compiled steps, the optimizers) and both base optimizers.
QUICK_METHODS = ["sam", "ksam", "layerwise", "looksam", "msam", "adamw-msam"]


#: The generalization benchmark trains and measures sharpness: fewer methods.
QUICK_GENERALIZATION_METHODS = ["sam", "ksam", "msam"]


def _expected_methods(methods=QUICK_METHODS):
    return {*methods, "sgd", "adamw"} if "adamw-msam" in methods else {*methods, "sgd"}


def test_the_benchmarks_cover_every_registered_method():
    from keras_sam import registry

    assert set(common.all_methods()) == {*registry.METHODS, *registry.BASES}
    assert common.select_methods(["looksam"], common.all_methods()) == ["sgd", "looksam"]


def test_a_method_variant_runs_with_its_own_arguments_after_its_method():
    from tests.helpers import plain_model

    methods = common.all_methods(["ksam:k=0.1", "msam:weight_decay=0.001"])
    names = list(methods)
    assert names.index("ksam:k=0.1") == names.index("ksam") + 1
    assert names.index("msam:weight_decay=0.001") == names.index("msam") + 1
    assert methods["msam:weight_decay=0.001"].optimizer(0.1, 0.3).weight_decay == 0.001
    variant = methods["ksam:k=0.1"]
    assert variant.wrap(plain_model(), 0.05).k == 0.1
    assert "k=0.1" in variant.extra and variant.base == "sgd"
    assert common.select_methods(["ksam:k=0.1"], methods) == ["sgd", "ksam:k=0.1"]
    with pytest.raises(SystemExit, match="unknown method 'ksm'"):
        common.all_methods(["ksm:k=0.1"])
    with pytest.raises(SystemExit, match="argument=value"):
        common.all_methods(["ksam:k"])


def test_speed_quick_reports_every_method(tmp_path):
    speed.main(["--quick", "--methods", *QUICK_METHODS, "--out", str(tmp_path)])
    report = json.loads((tmp_path / "speed.json").read_text())
    assert set(report["methods"]) == _expected_methods()
    for model in report["models"].values():
        assert set(model["methods"]) == _expected_methods()
        for name, r in model["methods"].items():
            assert _finite(r["median_step_s"]) and r["median_step_s"] > 0, name
            assert _finite(r["ratio"]) and r["ratio"] > 0, name
            assert all(_finite(v) for v in r["round_ratio_iqr"]), name
            assert _finite(r["memory"]["added_bytes"]), name
        base = model["methods"]["sgd"]
        assert base["ratio"] == 1.0 and base["memory"]["added_bytes"] == 0
    assert (tmp_path / "speed.md").read_text().count("| SAM |") >= 1
    assert (tmp_path / "speed.png").stat().st_size > 1000


def test_memory_quick_measures_each_method_in_its_own_process(tmp_path):
    memory.main(["--quick", "--methods", "sam", "msam", "--xla", "on", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "memory.json").read_text())
    results = report["models"]["wide"]["on"]
    assert set(results) == {"sgd", "sam", "msam"}
    for name, r in results.items():
        assert "error" not in r, (name, r.get("error"))
        assert r["parameter_bytes"] == 4 * (4 * (64 * 64 + 64) + 64 * 10 + 10), name
        # Training holds more than the resting model: optimizer slots, the step's buffers.
        assert r["resting_bytes"] > 0 and r["steady_bytes"] > 0, name
        assert r["with_compile_bytes"] > 0, name
        # Compiled programs and Python objects live in malloc's heap; the rest are buffers.
        assert r["heap_bytes"] > 0, name
        assert r["buffer_bytes"] == r["steady_bytes"] - r["heap_bytes"], name
    rows = (tmp_path / "memory.md").read_text()
    assert "| SAM |" in rows and "| MSAM |" in rows


def test_heap_bytes_count_small_blocks_and_not_those_with_their_own_mapping():
    before = memory._heap_bytes()
    small = [bytearray(1000) for _ in range(10_000)]
    grown = memory._heap_bytes() - before
    large = np.ones(10_000_000)  # 80 MB: served by its own mapping
    assert 9_000_000 <= grown <= 12_000_000, grown
    assert abs(memory._heap_bytes() - before - grown) < 1_000_000
    del small, large


def test_memory_is_reported_in_parameter_copies_above_the_base():
    mib = 2**20
    results = {
        "sgd": {"parameter_bytes": 100 * mib, "steady_bytes": 300 * mib},
        "sam": {"parameter_bytes": 100 * mib, "steady_bytes": 425 * mib},
        "ksam": {"error": "crashed"},
    }
    methods = {"sgd": {"base": "sgd"}, "sam": {"base": "sgd"}, "ksam": {"base": "sgd"}}
    table = memory.above_base(results, methods, "steady_bytes")
    assert table["sam"] == {"bytes": 125 * mib, "copies": 1.25}
    assert table["sgd"]["copies"] == 0.0
    assert "ksam" not in table
    # A figure a probe could not take (no glibc heap statistics) is left out.
    results["sam"]["buffer_bytes"] = None
    assert "sam" not in memory.above_base(results, methods, "buffer_bytes")


def test_generalization_quick_reports_every_method(tmp_path):
    methods = QUICK_GENERALIZATION_METHODS
    generalization.main(["--quick", "--methods", *methods, "--out", str(tmp_path)])
    report = json.loads((tmp_path / "generalization.json").read_text())
    assert set(report["methods"]) == _expected_methods(methods)
    for block in report["summary"].values():
        assert set(block["methods"]) == _expected_methods(methods)
        for name, r in block["methods"].items():
            for key in ("test_mean", "test_std", "val_mean", "cost_ratio",
                        "ascent_sharpness", "random_sharpness", "hessian_top",
                        "m_sharpness"):
                assert _finite(r[key]), (name, key)
            assert 0.0 <= r["test_mean"] <= 1.0
            # The time-to-accuracy curve: one cumulative training time per epoch.
            assert len(r["time_curve"]) == len(r["test_curve"]) == 2
            assert 0.0 < r["time_curve"][0] < r["time_curve"][1]
            assert r["time_curve"][1] == pytest.approx(r["train_time_mean_s"])
    names = ("generalization.md", "generalization_tradeoff.png",
             "generalization_time_to_accuracy.png")
    for name in names:
        assert (tmp_path / name).stat().st_size > 500


def test_paired_gain_is_a_t_interval_over_seeds():
    def run(method, seed, accuracy):
        return {"noise": 0.4, "method": method, "rho": None, "seed": seed,
                "test_accuracy": accuracy}

    runs = [run("sgd", 0, 0.70), run("sgd", 1, 0.80), run("sgd", 2, 0.75),
            run("sam", 0, 0.80), run("sam", 1, 0.88), run("sam", 2, 0.87)]
    row, base = ({"noise": 0.4, "method": m, "rho": None} for m in ("sam", "sgd"))
    mean, half_width = generalization_report.paired_gain(runs, row, base)
    # Differences 0.10, 0.08, 0.12: mean 0.10, sd 0.02, t(2) = 4.303.
    assert mean == pytest.approx(0.10)
    assert half_width == pytest.approx(4.303 * 0.02 / math.sqrt(3))


def test_time_to_accuracy_is_the_first_epoch_at_the_target():
    row = {"test_curve": [0.5, 0.8, 0.7, 0.9], "time_curve": [1.0, 2.0, 3.0, 4.0]}
    assert generalization_report.time_to_accuracy(row, 0.7) == 2.0
    assert generalization_report.time_to_accuracy(row, 0.9) == 4.0
    assert generalization_report.time_to_accuracy(row, 0.95) is None


def test_unsupported_backend_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        speed.main(["--backend", "numpy", "--quick"])
    assert "supports tensorflow, jax, torch only" in capsys.readouterr().err


def test_data_parallel_needs_jax(capsys):
    with pytest.raises(SystemExit):
        speed.main(["--data-parallel", "--quick"])
    assert "--data-parallel needs --backend jax" in capsys.readouterr().err


# Runs `python -m benchmarks.speed` on an interpreter where TensorFlow cannot be imported
# (as on the GPU machines that only have JAX) and records every attempt to import it.
_WITHOUT_TENSORFLOW = """
import importlib.abc, runpy, sys
attempts = []
class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None
sys.meta_path.insert(0, NoTensorFlow())
sys.argv = ["benchmarks.speed", *sys.argv[1:]]
try:
    runpy.run_module("benchmarks.speed", run_name="__main__", alter_sys=True)
finally:
    print("TENSORFLOW_IMPORT_ATTEMPTS", attempts, "LOADED", sys.modules.get("tensorflow"))
"""


def test_speed_quick_on_jax_without_tensorflow(tmp_path):
    pytest.importorskip("jax")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TENSORFLOW, "--backend", "jax", "--device", "cpu",
         "--quick", "--methods", *QUICK_METHODS, "--pieces", "mlp", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "TENSORFLOW_IMPORT_ATTEMPTS [] LOADED None" in done.stdout, done.stdout[-2000:]
    report = json.loads((tmp_path / "speed.json").read_text())
    machine = report["machine"]
    assert machine["keras_backend"] == "jax" and machine["jax_devices"]
    assert "tensorflow" not in machine and machine["tensorflow_imported"] is False
    for model in report["models"].values():
        assert set(model["methods"]) == _expected_methods()
        for name, r in model["methods"].items():
            assert _finite(r["ratio"]) and r["ratio"] > 0, name
            assert _finite(r["median_step_s"]) and r["median_step_s"] > 0, name
        assert model["methods"]["sgd"]["ratio"] == 1.0
    pieces = report["pieces"]["mlp"]["pieces"]
    assert len(pieces) == 9 and all(p["median_s"] > 0 for p in pieces.values())
    assert "Backend: JAX" in (tmp_path / "speed.md").read_text()
    print(f"JAX speed benchmark subprocess: {elapsed:.1f} s")


def test_sharpness_measures_are_finite_and_positive():
    import keras
    import numpy as np

    from benchmarks.sharpness import sharpness

    rng = np.random.default_rng(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    x = rng.standard_normal((32, 4)).astype("float32")
    y = rng.integers(0, 3, 32)
    measures = sharpness(model, x, y, rho=0.1, alpha=0.1, num_random=2, m=8)
    assert measures["ascent"] > 0  # the normalized gradient direction increases the loss
    assert measures["m_sharpness"] > measures["ascent"]  # each chunk ascends on its own
    assert measures["hessian_top"] > 0
    assert all(math.isfinite(v) for v in measures.values())


def test_sharpness_cost_benchmark_quick(tmp_path):
    from benchmarks import sharpness

    report = sharpness.main(["--quick", "--out", str(tmp_path)])
    cost = report["cost"]
    assert cost["hvp_s"] > 0 and cost["gradient_s"] > 0 and cost["top_eigenvalue"] > 0
    assert (tmp_path / "sharpness_cost.md").is_file()
