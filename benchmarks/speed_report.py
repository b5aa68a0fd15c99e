"""The speed benchmark's report: ``speed.md`` and ``speed.png`` from ``speed.json``."""

from __future__ import annotations

from pathlib import Path

from benchmarks import harness

TARGETS = {  # (model, method) -> the largest ratio to the base optimizer we aim for
    ("cnn", "sam"): 2.05,
    ("cnn", "msam"): 1.05,
    ("cnn", "adamw-msam"): 1.05,
    ("cnn", "ksam"): 0.9,
    ("cnn", "layerwise"): 1.3,
}


def markdown(report: dict) -> str:
    compiled = report["settings"].get("jit_compile", True)
    function = "compiled `train_function` (XLA)" if compiled else "eager `train_function`"
    lines = [
        "# Speed benchmark",
        "",
        f"{harness.provenance(report['machine'])}.",
        "",
        *([harness.load_note(report["load"]), ""] if "load" in report else []),
        f"Per-step time of the {function}, {report['settings']['rounds']} "
        f"interleaved rounds × {report['settings']['steps']} steps per method, after "
        f"{report['settings']['warmup']} warm-up steps. Ratio = median over rounds of the "
        "round's mean step time / the base optimizer's mean step time in the same round "
        "(in brackets: IQR of the per-round ratios; a mean, so LookSAM's periodic SAM "
        "steps count). Added memory = bytes of variables the method holds beyond the "
        "model and its base optimizer.",
        "",
    ]
    machine = report["machine"]
    if machine.get("keras_backend") == "torch":
        lines += [
            f"Backend: PyTorch {machine['torch']} ({machine['torch_threads']} threads), Keras "
            f"{machine['keras']}, eager (the wrappers refuse `torch.compile`). Each trainer is "
            "built by `fit` on one batch (not timed), then its `train_function` is called "
            "directly on batches already converted to tensors.",
            "",
        ]
    if machine.get("keras_backend") == "jax":
        parallel = report["settings"].get("data_parallel")
        lines += [
            f"Backend: JAX {machine['jax']} (jaxlib {machine['jaxlib']}), Keras "
            f"{machine['keras']}, devices {', '.join(machine['jax_devices'])}"
            + (", `keras.distribution.DataParallel` over all of them "
               "(perturbation_scope=\"global\")" if parallel else "")
            + f"; TensorFlow imported: {'yes' if machine.get('tensorflow_imported') else 'no'}. "
            "The step is `jax.jit`-compiled by `fit` on one batch (not timed), then the "
            "compiled `train_function` is called directly with the donated state on batches "
            "already on the device.",
            "",
        ]
    for model_name, result in report["models"].items():
        lines += [
            f"## {model_name}: {result['description']} ({result['parameters']:,} weights)",
            "",
            "| method | ρ | median step (ms) | IQR (ms) | ratio to base | target | "
            "added variables |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in result["methods"].items():
            target = TARGETS.get((model_name, name))
            target_text = "" if target is None else (
                f"≤ {target:g} {'✅' if r['ratio'] <= target else '❌'}"
            )
            rho = "" if r["rho"] is None else f"{r['rho']:g}"
            label = r["label"] + (f" ({r['extra']})" if r["extra"] else "")
            lines.append(
                f"| {label} | {rho} | {1000 * r['median_step_s']:.2f} "
                f"| {1000 * r['iqr_step_s'][0]:.2f}–{1000 * r['iqr_step_s'][1]:.2f} "
                f"| **{r['ratio']:.3f}×** [{r['round_ratio_iqr'][0]:.3f}–"
                f"{r['round_ratio_iqr'][1]:.3f}] | {target_text} "
                f"| {harness.human_bytes(r['memory']['added_bytes'])} |"
            )
        lines.append("")
    for model_name, timed in report.get("pieces", {}).items():
        lines += [
            f"## Pieces of a step: {model_name} (batch {timed['batch_size']}, "
            "each piece jit-compiled on its own)",
            "",
            "| piece | median (ms) | IQR (ms) |",
            "|---|---|---|",
        ]
        for n, p in timed["pieces"].items():
            lines.append(
                f"| {n} | {1000 * p['median_s']:.2f} | {1000 * p['iqr_s'][0]:.2f}–"
                f"{1000 * p['iqr_s'][1]:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.2), squeeze=False)
    for ax, model_name in zip(axes[0], models):
        result = report["models"][model_name]["methods"]
        names = list(result)
        ratios = [result[n]["ratio"] for n in names]
        low = [max(0.0, r - result[n]["round_ratio_iqr"][0]) for n, r in zip(names, ratios)]
        high = [max(0.0, result[n]["round_ratio_iqr"][1] - r) for n, r in zip(names, ratios)]
        colors = ["tab:gray" if result[n]["base"] == n else "tab:blue" for n in names]
        ax.barh(names, ratios, xerr=[low, high], color=colors, capsize=3)
        for i, n in enumerate(names):
            target = TARGETS.get((model_name, n))
            if target is not None:
                ax.plot([target, target], [i - 0.4, i + 0.4], color="tab:red", lw=2)
        ax.axvline(1.0, color="black", lw=0.8, ls="--")
        ax.invert_yaxis()
        ax.set_xlabel("step time / base optimizer (median, IQR of rounds)")
        ax.set_title(model_name)
    fig.suptitle(f"keras_sam step-time ratios ({report['machine']['device']}); red = target")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
