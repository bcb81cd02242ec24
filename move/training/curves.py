"""Loss-curve plots (matplotlib, headless)."""

import math
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

# One look per variant, the same in every plot: the family picks the hue (standard black,
# LaVE oranges, MoVE blues), the density the shade (darker = more memory) and the
# marker, an ablation a dashed line. Nine variants stay apart, and the colour says what
# a line is before the legend does.
FAMILY_COLORMAPS = {"lave": "Oranges", "move": "Blues"}
DENSITY_MARKERS = {1: "o", 2: "^", 4: "s", 8: "D", 16: "P", 32: "X"}


def variant_style(name: str) -> dict:
    """matplotlib keywords (color, marker, linestyle) for a run or variant name such as
    "move_x4", "lave-full_x1", "standard" or "small-deeper/standard (n=3)"."""
    match = re.search(r"\b(standard|lave|move)(-[a-z0-9]+)?(?:_x(\d+))?", name)
    if not match:
        return dict(color="gray", marker="x", linestyle=":")
    family, ablation, density = match.group(1), match.group(2), int(match.group(3) or 1)
    deeper = "deeper" in name or "wider" in name  # a compute-matched dense baseline
    if family == "standard":
        return dict(
            color="dimgray" if deeper else "black", marker="v" if deeper else "o", linestyle="-." if deeper else "-"
        )
    shade = 0.45 + 0.55 * min(1.0, math.log2(density) / 3)  # x1 light .. x8 and more darkest
    return dict(
        color=plt.get_cmap(FAMILY_COLORMAPS[family])(shade),
        marker=DENSITY_MARKERS.get(density, "*"),
        linestyle="--" if ablation else "-",
    )


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average, as TensorBoard draws it."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** (i + 1)))
    return out


def plot_loss_curve(train_losses: list[float], metrics: list[dict], path, title: str = "") -> None:
    """Training loss per step (smoothed) and every validation metric at its steps."""
    val_keys = [k for k in metrics[0] if k.startswith("val_")] if metrics else []
    fig, axes = plt.subplots(1, 1 + len(val_keys), figsize=(5 * (1 + len(val_keys)), 3.5), squeeze=False)
    ax = axes[0][0]
    ax.plot(range(1, len(train_losses) + 1), smooth(train_losses))
    ax.set(xlabel="step", ylabel="train loss (nats, smoothed)", title=title)
    for ax, key in zip(axes[0][1:], val_keys):
        ax.plot([m["step"] for m in metrics], [m[key] for m in metrics], marker="o")
        ax.set(xlabel="step", ylabel=key)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_runs(curves: dict[str, list[dict]], key: str, path, title: str = "") -> None:
    """One validation curve per run: curves maps a run name to its metrics records."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, metrics in curves.items():
        ax.plot([m["step"] for m in metrics], [m[key] for m in metrics], label=name, **variant_style(name))
    ax.set(xlabel="step", ylabel=key, title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curve_bands(curves: dict[str, list[list[dict]]], key: str, path, title: str = "") -> None:
    """Mean validation curve per variant with a band from the lowest to the highest
    seed: curves maps a variant to one metrics list per seed."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, runs in curves.items():
        steps = sorted(set.intersection(*[{m["step"] for m in run} for run in runs]))
        if not steps:
            continue
        values = [[next(m[key] for m in run if m["step"] == s) for run in runs] for s in steps]
        mean = [sum(v) / len(v) for v in values]
        style = variant_style(name)
        ax.plot(steps, mean, markersize=4, label=f"{name} (n={len(runs)})", **style)
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=style["color"], alpha=0.15)
    ax.set(xlabel="step", ylabel=key, title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_scaling(points: list[dict], key: str, path, title: str = "") -> None:
    """Final metric against value-memory parameters and against training FLOPs per
    token; points: {label, family, memory_params, flops, mean, std}."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for p in points:
        style = variant_style(p["label"])
        for ax, x in zip(axes, (p["memory_params"], p["flops"])):
            ax.errorbar(
                [x],
                [p["mean"]],
                yerr=[p["std"]],
                fmt=style["marker"],
                color=style["color"],
                capsize=3,
                label=p["label"],
            )
    axes[0].set_xscale("symlog", linthresh=1e4)
    axes[0].set(xlabel="value-memory parameters", ylabel=key, title=f"{title}: memory axis")
    axes[1].set(xlabel="training FLOPs per token", ylabel=key, title=f"{title}: compute axis")
    handles, labels = axes[0].get_legend_handles_labels()
    axes[1].legend(handles, labels, fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_knowledge(lines: dict[str, list[tuple]], path) -> None:
    """Stored bits against the number of people: lines maps a label to (N, mean, std) points."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, points in lines.items():
        points = sorted(points)
        style = {**variant_style(label), "linestyle": "--" if "2 token" in label else "-"}
        ax.errorbar(
            [p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], capsize=3, label=label, **style
        )
    ax.set(xlabel="people in the corpus (N)", ylabel="stored knowledge (bits)", xscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_budget_bands(
    lines: dict[str, dict[int, list[tuple[float, float]]]], path, ylabel: str, title: str = ""
) -> None:
    """Final metric against training tokens: lines maps a variant to {budget: [(tokens,
    value) per seed]}; the line is the mean, the band the lowest to the highest seed."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, budgets in lines.items():
        points = sorted((runs[0][0], [v for _, v in runs]) for runs in budgets.values())
        x = [t for t, _ in points]
        style = variant_style(name)
        ax.plot(x, [sum(v) / len(v) for _, v in points], label=name, **style)
        ax.fill_between(x, [min(v) for _, v in points], [max(v) for _, v in points], color=style["color"], alpha=0.15)
    ax.set(xlabel="training tokens", ylabel=ylabel, title=title, xscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_diagnostics(curves: dict[str, list[list[dict]]], keys: dict[str, str], value, path, title: str = "") -> None:
    """One panel per diagnostic over training steps: curves maps a variant to its
    seeds' metrics lists, value(record, key) reads a diagnostic (None: absent)."""
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys.items()):
        for name, runs in curves.items():
            steps = sorted({m["step"] for m in runs[0]})
            means = []
            for step in steps:
                values = [value(m, key) for run in runs for m in run if m["step"] == step]
                values = [v for v in values if v is not None]
                means.append(sum(values) / len(values) if values else float("nan"))
            ax.plot(steps, means, markersize=4, label=name, **variant_style(name))
        ax.set(xlabel="step", ylabel=label, title=f"{title}: {label}")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
