"""The generalization benchmark's report: the aggregated accuracies, ``generalization.md``
and the plots, from the runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks import harness

CHEAP = ("ksam", "layerwise", "msam", "adamw-msam")
TARGET_FRACTION_OF_SAM_GAIN = 0.8
#: Two-sided 97.5 % quantiles of Student's t, by degrees of freedom (a 95 % interval).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228}


def paired_gain(runs: list[dict], row: dict, base_row: dict) -> tuple[float, float]:
    """Mean and 95 % confidence half-width of the test-accuracy gain of ``row`` over
    ``base_row``, paired by seed (same data, same initial weights); NaN below 2 seeds."""
    def by_seed(r: dict) -> dict:
        return {g["seed"]: g["test_accuracy"] for g in runs
                if (g["noise"], g["method"], g["rho"]) == (r["noise"], r["method"], r["rho"])}

    mine, base = by_seed(row), by_seed(base_row)
    diffs = np.array([mine[seed] - base[seed] for seed in mine if seed in base])
    if len(diffs) < 2:
        return float(np.mean(diffs)) if len(diffs) else float("nan"), float("nan")
    t = T_975.get(len(diffs) - 1, 1.96)
    return float(diffs.mean()), float(t * diffs.std(ddof=1) / np.sqrt(len(diffs)))


def aggregate(runs: list[dict], methods: dict, names: Sequence[str], noises: Sequence[float]
              ) -> dict:
    """Grid statistics, the ρ chosen on validation accuracy, and the summary per noise."""
    by_key: dict[tuple, list[dict]] = {}
    for r in runs:
        by_key.setdefault((r["noise"], r["method"], r["rho"]), []).append(r)
    base_time = {
        (r["noise"], r["seed"], r["method"]): r["train_time_s"]
        for r in runs
        if methods[r["method"]].base == r["method"]
    }
    grid = []
    for (noise, name, rho), group in by_key.items():
        test = [g["test_accuracy"] for g in group]
        ratios = [
            g["train_time_s"] / base_time[(noise, g["seed"], methods[name].base)]
            for g in group
            if (noise, g["seed"], methods[name].base) in base_time
        ]
        grid.append({
            "noise": noise, "method": name, "rho": rho, "seeds": [g["seed"] for g in group],
            "test_mean": float(np.mean(test)), "test_std": float(np.std(test)),
            "val_mean": float(np.mean([g["val_accuracy"] for g in group])),
            "train_noisy_mean": float(np.mean([g["train_accuracy_noisy"] for g in group])),
            "train_time_mean_s": float(np.mean([g["train_time_s"] for g in group])),
            "cost_ratio": float(np.median(ratios)) if ratios else float("nan"),
            "ascent_sharpness": float(np.mean([g["sharpness"]["ascent"] for g in group])),
            "random_sharpness": float(np.mean([g["sharpness"]["random"] for g in group])),
            "hessian_top": float(np.mean([g["sharpness"]["hessian_top"] for g in group])),
            "m_sharpness": float(np.mean([g["sharpness"]["m_sharpness"] for g in group])),
            "final_loss": float(np.mean([g["sharpness"]["loss"] for g in group])),
            "test_curve": np.mean([g["test_curve"] for g in group], axis=0).tolist(),
            "time_curve": np.mean([g["time_curve"] for g in group], axis=0).tolist(),
        })
    summary: dict[str, dict] = {}
    for noise in noises:
        chosen = {}
        for name in names:
            rows = [g for g in grid if g["noise"] == noise and g["method"] == name]
            if rows:
                chosen[name] = max(rows, key=lambda g: (g["val_mean"], -(g["rho"] or 0)))
        sam_gain = (
            chosen["sam"]["test_mean"] - chosen["sgd"]["test_mean"]
            if "sam" in chosen and "sgd" in chosen else float("nan")
        )
        sam_gain_ci95 = (
            paired_gain(runs, chosen["sam"], chosen["sgd"])[1]
            if "sam" in chosen and "sgd" in chosen else float("nan")
        )
        rows = {}
        for name, g in chosen.items():
            base = chosen.get(methods[name].base)
            gain = g["test_mean"] - base["test_mean"] if base else float("nan")
            target = base["test_mean"] if base else float("nan")
            gain_ci95 = paired_gain(runs, g, base)[1] if base else float("nan")
            fraction = gain / sam_gain if sam_gain and np.isfinite(sam_gain) and sam_gain > 0 \
                else float("nan")
            rows[name] = {
                **{k: v for k, v in g.items() if k not in ("test_curve", "time_curve")},
                "gain_over_base": gain,
                "gain_ci95": gain_ci95,
                "time_to_base_accuracy_s": time_to_accuracy(g, target),
                "fraction_of_sam_gain": fraction if name != methods[name].base else None,
                "meets_target": (
                    bool(fraction >= TARGET_FRACTION_OF_SAM_GAIN)
                    if name in CHEAP and np.isfinite(fraction) else None
                ),
                "test_curve": g["test_curve"],
                "time_curve": g["time_curve"],
            }
        summary[f"{noise:g}"] = {"sam_gain": sam_gain, "sam_gain_ci95": sam_gain_ci95,
                                 "methods": rows}
    return {"grid": grid, "summary": summary}


def time_to_accuracy(row: dict, target: float) -> float | None:
    """Training seconds until the mean test curve first reaches ``target`` (None: never).

    The curve is Keras' float32 metric, the target a float64 mean: 1e-4 of slack.
    """
    for accuracy, seconds in zip(row["test_curve"], row["time_curve"]):
        if accuracy >= target - 1e-4:
            return float(seconds)
    return None


def markdown(report: dict) -> str:
    m = report["machine"]
    s = report["settings"]
    methods = report["methods"]
    lines = [
        "# Generalization benchmark: digits with label noise",
        "",
        f"{harness.provenance(m)}, total {report['wall_clock_s'] / 60:.1f} min.",
        "",
        *([harness.load_note(report["load"]), ""] if "load" in report else []),
        f"Model `{s['model']}`"
        f"{' (2 hidden layers of ' + str(s['width']) + ' units)' if s['model'] == 'mlp' else ''}"
        f", {s['epochs']} epochs, batch {s['batch_size']}, cosine LR "
        f"(SGD-momentum {s['learning_rate']['sgd']}, AdamW {s['learning_rate']['adamw']}), "
        f"seeds {s['seeds']}, XLA. ρ chosen per method and noise by mean validation "
        "accuracy (noisy labels). Cost = training-step wall time / base optimizer's, same "
        "noise and seed (median). Sharpness on "
        f"{s['sharpness_samples']} training samples (their noisy labels), inference mode: "
        f"ascent = L(w + ρ g/‖g‖) − L(w) at ρ = {s['sharpness_rho']}; random = mean "
        f"L(w + α d) − L(w) over {s['sharpness_directions']} filter-normalized Gaussian "
        f"directions, α = {s['sharpness_alpha']}.",
        "",
    ]
    for noise, block in report["summary"].items():
        lines += [
            f"## Label noise {float(noise):.0%} (SAM's gain over SGD: "
            f"{100 * block['sam_gain']:+.2f} points, 95 % CI ± "
            f"{100 * block['sam_gain_ci95']:.2f}, paired by seed)",
            "",
            "| method | ρ | test accuracy (%) | gain over base (95 % CI) | of SAM's gain | cost | "
            "training time (s) | time to the base's final accuracy (s) | "
            "ascent sharpness | m-sharpness | Hessian λ_max | random sharpness |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in block["methods"].items():
            fraction = r["fraction_of_sam_gain"]
            if fraction is None:
                frac_text = ""
            elif not np.isfinite(fraction):
                frac_text = "n/a"
            else:
                mark = {True: " ✅", False: " ❌", None: ""}[r["meets_target"]]
                frac_text = f"{100 * fraction:.0f} %{mark}"
            rho = "" if r["rho"] is None else f"{r['rho']:g}"
            gain = "" if methods[name]["base"] == name else (
                f"{100 * r['gain_over_base']:+.2f} ± {100 * r['gain_ci95']:.2f}"
            )
            reach = r["time_to_base_accuracy_s"]
            reach_text = "never" if reach is None else f"{reach:.1f}"
            lines.append(
                f"| {methods[name]['label']} | {rho} | {100 * r['test_mean']:.2f} ± "
                f"{100 * r['test_std']:.2f} | {gain} | {frac_text} | {r['cost_ratio']:.2f}× "
                f"| {r['train_time_mean_s']:.1f} | {reach_text} "
                f"| {r['ascent_sharpness']:.4f} | {r['m_sharpness']:.4f} "
                f"| {r['hessian_top']:.3g} | {r['random_sharpness']:.4f} |"
            )
        lines.append("")
    lines += [
        "## Full grid",
        "",
        "| noise | method | ρ | test accuracy (%) | validation (%) | train, noisy labels (%) "
        "| cost | ascent sharpness | m-sharpness | Hessian λ_max | random sharpness |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in report["grid"]:
        rho = "" if g["rho"] is None else f"{g['rho']:g}"
        lines.append(
            f"| {g['noise']:.0%} | {methods[g['method']]['label']} | {rho} "
            f"| {100 * g['test_mean']:.2f} ± {100 * g['test_std']:.2f} | {100 * g['val_mean']:.2f} "
            f"| {100 * g['train_noisy_mean']:.2f} | {g['cost_ratio']:.2f}× "
            f"| {g['ascent_sharpness']:.4f} | {g['m_sharpness']:.4f} | {g['hessian_top']:.3g} "
            f"| {g['random_sharpness']:.4f} |"
        )
    return "\n".join(lines)


def plot(report: dict, out: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noises = list(report["summary"])
    labels = {n: m["label"] for n, m in report["methods"].items()}
    fig, axes = plt.subplots(1, len(noises), figsize=(5.2 * len(noises), 4.2), squeeze=False)
    for ax, noise in zip(axes[0], noises):
        for i, (name, r) in enumerate(report["summary"][noise]["methods"].items()):
            marker = "s" if report["methods"][name]["base"] == name else "o"
            ax.errorbar(r["cost_ratio"], 100 * r["test_mean"], yerr=100 * r["test_std"],
                        fmt=marker, color=f"C{i}", capsize=3, label=labels[name])
        ax.set_xlabel("training cost / base optimizer")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"label noise {float(noise):.0%}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Accuracy vs cost (ρ chosen on validation; mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(out / "generalization_tradeoff.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(noises), figsize=(5.2 * len(noises), 4.2), squeeze=False)
    for ax, noise in zip(axes[0], noises):
        for i, (name, r) in enumerate(report["summary"][noise]["methods"].items()):
            style = "--" if report["methods"][name]["base"] == name else "-"
            ax.plot(r["time_curve"], 100 * np.asarray(r["test_curve"]), style, color=f"C{i}",
                    label=labels[name])
        ax.set_xlabel("training time (s, same machine and process)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"label noise {float(noise):.0%}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Time to accuracy: test accuracy against training time "
                 "(mean over seeds, chosen ρ)")
    fig.tight_layout()
    fig.savefig(out / "generalization_time_to_accuracy.png", dpi=110)
    plt.close(fig)
