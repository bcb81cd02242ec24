"""The tables and the plots of scripts/smollm2_study.sh: per mix setting and arm, mean ±
std over seeds of what was learnt (recall, stored bits on the held-out phrasing), what
it cost the model (bpb and KL on news and Shakespeare against the untouched model) and
what it cost to run (trainable parameters, step time, peak memory, decoding speed and
its ratio to the untouched model's, both timed in the same run);
then each arm against the one-slot bank, paired by seed, with 95% intervals; the
parameters, memory and FLOPs per token of each arm next to the untouched model's; what
the memory arms' gates do per layer (mean slot gate, memory share on the facts and on
news); one plot of facts against forgetting (KL on Shakespeare), a point per arm and
seed, and one of the memory share per layer.

    python scripts/smollm2_study_table.py results/smollm2-study
        -> summary.md, facts_vs_forgetting.png, memory_use.png"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from move.experiments.stats import paired_difference, summarize_values

LEARNT = [("recall_accuracy", "recall (held-out phrasing)", 3), ("knowledge_bits", "stored bits", 0)]
FORGOT = [
    ("general_bpb", "news bpb", 4),
    ("general_kl", "news KL (nats/token)", 4),
    ("shakespeare_smol_bpb", "Shakespeare bpb", 4),
    ("shakespeare_smol_kl", "Shakespeare KL", 4),
]
REFERENCE_ARM = "bank1"
# arms added after seeds 0-1 of the stated ones (reported apart): {arm: the stated arm it changes}
POST_HOC = {"bank15-layer": "bank15"}


def label(arm: str) -> str:
    return f"{arm} (post hoc)" if arm in POST_HOC else arm


def paired_row(name: str, seeds: dict, reference: dict, keys) -> str:
    """One row of paired differences (seeds in both), a 95% interval per key."""
    diffs = [
        paired_difference(
            {s: r["after"][k] for s, r in seeds.items()}, {s: r["after"][k] for s, r in reference.items()}
        ).format(d)
        for k, _, d in keys
    ]
    return f"| {name} | " + " | ".join(diffs) + " |"


def load(results: Path) -> dict:
    """{mix: {arm: {seed: retrofit.json}}}"""
    runs = {}
    for summary in sorted(results.glob("*/*/seed*/retrofit.json")):
        seed_dir = summary.parent
        mix, arm, seed = seed_dir.parent.parent.name, seed_dir.parent.name, int(seed_dir.name[4:])
        runs.setdefault(mix, {}).setdefault(arm, {})[seed] = json.loads(summary.read_text())
    return runs


def cell(values, digits: int) -> str:
    return summarize_values(list(values)).format(digits)


def tables(runs: dict) -> str:
    lines = []
    for mix, arms in runs.items():
        some = next(iter(next(iter(arms.values())).values()))
        before = some["before"]
        lines += [f"## General text mixed in: {mix}", ""]
        header = ["arm", "trained", "seeds"] + [label for _, label, _ in LEARNT + FORGOT]
        header += ["step s", "peak MB", "decode tok/s (untouched)", "decode / untouched"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        untouched = [f"{before[k]:.{d}f}" if k in before else "0" for k, _, d in LEARNT + FORGOT]  # KL: 0
        lines.append("| " + " | ".join(["untouched", "0", "", *untouched, "", "", "", ""]) + " |")
        for arm, seeds in arms.items():
            row = [label(arm), f"{next(iter(seeds.values()))['trainable_params']:,}", str(len(seeds))]
            row += [cell((s["after"][k] for s in seeds.values()), d) for k, _, d in LEARNT + FORGOT]
            cost = [s["cost"] for s in seeds.values()]
            row += [cell((c["step_seconds"] for c in cost), 2), cell((c["peak_rss_mb"] for c in cost), 0)]
            row.append(
                cell((c["decode_tok_s"] for c in cost), 1)
                + " ("
                + cell((c["decode_tok_s_untouched"] for c in cost), 1)
                + ")"
            )
            # each run times both models in one process, one after the other: the ratio is paired
            row.append(cell((c["decode_tok_s"] / c["decode_tok_s_untouched"] for c in cost), 3))
            lines.append("| " + " | ".join(row) + " |")
        if REFERENCE_ARM in arms:
            lines += ["", f"Each arm minus {REFERENCE_ARM}, paired by seed (95% interval; * excludes zero):", ""]
            keys = LEARNT + FORGOT
            lines += ["| arm | " + " | ".join(label for _, label, _ in keys) + " |", "|---|" + "---|" * len(keys)]
            reference = arms[REFERENCE_ARM]
            for arm, seeds in arms.items():
                if arm != REFERENCE_ARM:
                    lines.append(paired_row(label(arm), seeds, reference, keys))
            changed = [(arm, stated) for arm, stated in POST_HOC.items() if arm in arms and stated in arms]
            if changed:
                lines += ["", "Post hoc arms minus the stated arm they change, paired by seed:", ""]
                lines += ["| arm | " + " | ".join(lbl for _, lbl, _ in keys) + " |", "|---|" + "---|" * len(keys)]
                for arm, stated in changed:
                    lines.append(paired_row(f"{arm} − {stated}", arms[arm], arms[stated], keys))
        lines.append("")
    return "\n".join(lines)


def cost_table(runs: dict) -> str:
    """Parameters, the memory's size and rows, and FLOPs per token: fixed by the arm (the
    first run of each), against the untouched model's (the dense part of any memory arm).
    A LoRA adapter is counted unmerged (its FLOPs vanish once merged into the weights)."""
    arms = {arm: next(iter(seeds.values())) for mix in runs.values() for arm, seeds in mix.items()}
    accounted = next((r["accounting"] for r in arms.values() if "accounting" in r), None)
    if accounted is None:
        return ""
    dense_params, dense_flops = accounted["params"]["dense"], accounted["flops_per_token"]["dense"]
    header = ["arm", "trainable", "total params", "memory MB (fp32)", "rows moved / rows", "FLOPs/token", "x untouched"]
    lines = ["## What each arm adds", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append(f"| untouched | 0 | {dense_params:,} | 0 | | {dense_flops:,} | 1.000 |")
    for arm, r in arms.items():
        flops = r["accounting"]["flops_per_token"]["total"] if "accounting" in r else dense_flops
        flops += r["cost"]["lora_flops_per_token"]
        memory = r["accounting"]["params"]["value_memory"] * 4 / 2**20 if "accounting" in r else 0
        rows = f"{r['cost']['rows_moved']:,} / {r['cost']['rows']:,}" if "rows" in r["cost"] else ""
        row = [arm, f"{r['trainable_params']:,}", f"{r['total_params']:,}", f"{memory:,.0f}", rows]
        lines.append("| " + " | ".join([*row, f"{flops:,}", f"{flops / dense_flops:.3f}"]) + " |")
    return "\n".join([*lines, ""])


def memory_use_table(runs: dict) -> str:
    """Per memory arm (no news mixed in), the mean over layers and seeds of the slot gate
    and of the memory share on the facts and on news, and the layer that moves most."""
    lines = ["## What the memory does (no news mixed in; mean over layers and seeds)", ""]
    header = ["arm", "slot gate, facts", "slot gate, news", "memory share, facts", "memory share, news", "top layer"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm, uses in memory_uses(runs):
        share = layer_means(uses, "val", "memory_share")
        top = max(share, key=share.get)
        row = []
        for key in ("slot_gate_mean", "memory_share"):
            for corpus in ("val", "general"):
                per_layer = layer_means(uses, corpus, key)
                row.append(sum(per_layer.values()) / len(per_layer))
        lines.append(f"| {arm} | " + " | ".join(f"{v:.3f}" for v in row) + f" | {top} ({share[top]:.3f}) |")
    return "\n".join([*lines, ""])


def memory_uses(runs: dict):
    """(arm, [each seed's memory_use]) for the memory arms without news mixed in."""
    for arm, seeds in runs.get("none", {}).items():
        uses = [r["memory_use"] for r in seeds.values() if "memory_use" in r]
        if uses:
            yield arm, uses


def layer_means(uses: list[dict], corpus: str, key: str) -> dict[int, float]:
    """{layer: the mean of key over runs} for one corpus."""
    layers = sorted(uses[0][corpus], key=int)
    return {int(layer): sum(u[corpus][layer][key] for u in uses) / len(uses) for layer in layers}


def plot_memory_use(runs: dict, out: Path) -> None:
    """The memory share per layer, on the facts and on news, per memory arm (no news
    mixed in; mean over seeds)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, uses in memory_uses(runs):
        for corpus, style in (("val", "-"), ("general", ":")):
            share = layer_means(uses, corpus, "memory_share")
            label = f"{arm}, {'facts' if corpus == 'val' else 'news'}"
            ax.plot(list(share), list(share.values()), style, marker="o", markersize=3, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("memory share ||v' - v|| / ||v||")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot(runs: dict, out: Path) -> None:
    """Stored bits against the KL from the untouched model on Shakespeare (text no arm
    trains on, news being mixed into some), a point per arm and seed."""
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.5), squeeze=False)
    for ax, (mix, arms) in zip(axes[0], runs.items()):
        for arm, seeds in arms.items():
            xs = [s["after"]["shakespeare_smol_kl"] for s in seeds.values()]
            ys = [s["after"]["knowledge_bits"] for s in seeds.values()]
            ax.scatter(xs, ys, label=arm, s=30)
        ax.set_xscale("log")
        ax.set_xlabel("Shakespeare KL from the untouched model (nats/token, log scale)")
        ax.set_ylabel("stored bits, held-out phrasing")
        ax.set_title(f"general text mixed in: {mix}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    results = Path(sys.argv[1])
    runs = load(results)
    (results / "summary.md").write_text("\n".join([tables(runs), cost_table(runs), memory_use_table(runs)]))
    plot(runs, results / "facts_vs_forgetting.png")
    plot_memory_use(runs, results / "memory_use.png")
    print((results / "summary.md").read_text())
