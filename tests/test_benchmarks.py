"""The benchmarks run end to end in --quick mode (so they never rot) and report every method."""

import json
import math

import pytest

from benchmarks import common, generalization, speed


def _finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


def _expected_methods():
    return set(common.all_methods())


def test_speed_quick_reports_every_method(tmp_path):
    speed.main(["--quick", "--out", str(tmp_path)])
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


def test_generalization_quick_reports_every_method(tmp_path):
    generalization.main(["--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "generalization.json").read_text())
    assert set(report["methods"]) == _expected_methods()
    for block in report["summary"].values():
        assert set(block["methods"]) == _expected_methods()
        for name, r in block["methods"].items():
            for key in ("test_mean", "test_std", "val_mean", "cost_ratio",
                        "ascent_sharpness", "random_sharpness"):
                assert _finite(r[key]), (name, key)
            assert 0.0 <= r["test_mean"] <= 1.0
    for name in ("generalization.md", "generalization_tradeoff.png", "generalization_curves.png"):
        assert (tmp_path / name).stat().st_size > 500


def test_unsupported_backend_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        speed.main(["--backend", "jax", "--quick"])
    assert "only supports the TensorFlow backend" in capsys.readouterr().err


def test_sharpness_is_zero_free_and_positive_on_a_trained_quadratic():
    import keras
    import numpy as np

    from benchmarks.sharpness import filter_normalized_direction, sharpness

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((3, 4)).astype("float32"), np.ones(4, "float32")]
    direction = filter_normalized_direction(weights, rng)
    np.testing.assert_allclose(
        np.linalg.norm(direction[0], axis=0), np.linalg.norm(weights[0], axis=0), rtol=1e-5
    )
    assert not direction[1].any()  # 1-D variables are not moved
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    x = rng.standard_normal((32, 4)).astype("float32")
    y = rng.integers(0, 3, 32)
    measures = sharpness(model, x, y, rho=0.1, alpha=0.1, num_random=2)
    assert measures["ascent"] > 0  # the normalized gradient direction increases the loss
    assert all(math.isfinite(v) for v in measures.values())
