"""`move gates <checkpoint> --text file`: what the value memory is used for.

On a text, per layer and head: how much the mixed value keeps of the standard
value (g0, 1 at initialisation) and how much it takes from the memory slots
(the sum of the slot gates), each averaged over positions; which slots carry the
weight; and, for the first tokens of the text, g0 and the memory weight token by
token (averaged over heads). Writes a PNG and the numbers as JSON."""

import numpy as np
import torch

from move.model.diagnostics import collect_gates
from move.training.curves import plt


def gate_summary(model, idx: torch.Tensor) -> dict:
    gates = collect_gates(model, idx)
    g0_used = model.config.gate_g0
    summary = {"layers": sorted(gates), "g0": [], "memory": [], "slots": [], "per_token_g0": [], "per_token_memory": []}
    for layer in summary["layers"]:
        g = gates[layer][0]  # (T, H, S + g0), first sequence
        g0 = g[..., 0] if g0_used else torch.ones(g.shape[:2])
        slots = g[..., 1:] if g0_used else g
        summary["g0"].append(g0.mean(0).tolist())  # per head
        summary["memory"].append(slots.sum(-1).mean(0).tolist())  # per head: total slot weight
        summary["slots"].append(slots.mean((0, 1)).tolist())  # per slot
        summary["per_token_g0"].append(g0.mean(1).tolist())
        summary["per_token_memory"].append(slots.sum(-1).mean(1).tolist())
    return summary


def plot_gate_summary(summary: dict, tokens: list[str], path) -> None:
    n_tok = min(len(tokens), 40)
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    for ax, key, title in (
        (axes[0][0], "g0", "g0 (standard value kept), mean over positions"),
        (axes[0][1], "memory", "memory weight (sum of slot gates), mean over positions"),
    ):
        im = ax.imshow(np.array(summary[key]), aspect="auto", cmap="viridis")
        ax.set(
            xlabel="head",
            ylabel="layer",
            title=title,
            yticks=range(len(summary["layers"])),
            yticklabels=summary["layers"],
        )
        fig.colorbar(im, ax=ax)
    ax = axes[1][0]
    for layer, slots in zip(summary["layers"], summary["slots"]):
        ax.plot(range(len(slots)), slots, marker="o", label=f"layer {layer}")
    ax.set(xlabel="slot", ylabel="mean gate", title="which slots are used")
    ax.legend(fontsize=7)
    ax = axes[1][1]
    im = ax.imshow(np.array(summary["per_token_memory"])[:, :n_tok], aspect="auto", cmap="magma")
    ax.set(
        title="memory weight per token (mean over heads)",
        ylabel="layer",
        yticks=range(len(summary["layers"])),
        yticklabels=summary["layers"],
        xticks=range(n_tok),
    )
    ax.set_xticklabels([t.replace("\n", "\\n")[:8] for t in tokens[:n_tok]], rotation=90, fontsize=7)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
