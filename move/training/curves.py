"""Loss-curve plots (matplotlib, headless)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first


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
        ax.plot([m["step"] for m in metrics], [m[key] for m in metrics], marker="o", label=name)
    ax.set(xlabel="step", ylabel=key, title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
