"""The main job runs end to end and reports sensible numbers."""

import logging

import numpy as np

from keras_sam import demo


def test_label_noise_flips_the_requested_fraction():
    (_, clean), _, _ = demo.load_digits(noise=0.0, seed=0)
    (_, noisy), _, _ = demo.load_digits(noise=0.4, seed=0)
    flipped = np.mean(clean != noisy)
    assert 0.35 < flipped < 0.45
    assert noisy.min() >= 0 and noisy.max() <= 9


def test_demo_trains_and_prints_the_table(tmp_path, capsys, caplog):
    """The default methods (7 runs with their bases), with no retracing warning:
    TensorFlow warns once a function has been traced more than 5 times."""
    plot_path = tmp_path / "demo.png"
    with caplog.at_level(logging.WARNING):
        results = demo.main(["--epochs", "2", "--quiet", "--plot", str(plot_path)])
    assert [r["name"] for r in results] == [
        "sgd", "adamw", "sam", "asam", "ksam", "layerwise", "msam", "adamw-msam"
    ]
    assert "retracing" not in caplog.text
    for r in results:
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["step_time"] > 0
        assert r["peak_bytes"] > 0  # TensorFlow's allocator reports a step's memory
    # K-SAM (k = 0.25 in the demo) runs its backward passes on a quarter of the batch, and a
    # step of this CNN is mostly activations: it allocates less than its base.
    by_name = {r["name"]: r for r in results}
    assert by_name["ksam"]["peak_bytes"] < by_name["sgd"]["peak_bytes"]
    assert results[1]["accuracy"] > 0.3  # far above chance (0.1) after 2 epochs
    out = capsys.readouterr().out
    assert "| SAM rho=0.05 |" in out and "ratio to base" in out and "MiB (" in out
    assert plot_path.stat().st_size > 1000
