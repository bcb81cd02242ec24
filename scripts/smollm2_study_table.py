"""The tables and the plot of scripts/smollm2_study.sh: per mix setting and arm, mean ±
std over seeds of what was learnt (recall, stored bits on the held-out phrasing), what
it cost the model (bpb and KL on news and Shakespeare against the untouched model) and
what it cost to run (trainable parameters, step time, peak memory, decoding speed);
then each arm against the one-slot bank, paired by seed, with 95% intervals; and one
plot of facts against forgetting (KL on Shakespeare), a point per arm and seed.

    python scripts/smollm2_study_table.py results/smollm2-study   -> summary.md, facts_vs_forgetting.png"""

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
        header += ["step s", "peak MB", "decode tok/s (untouched)"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        untouched = [f"{before[k]:.{d}f}" if k in before else "0" for k, _, d in LEARNT + FORGOT]  # KL: 0
        lines.append("| " + " | ".join(["untouched", "0", "", *untouched, "", "", ""]) + " |")
        for arm, seeds in arms.items():
            row = [arm, f"{next(iter(seeds.values()))['trainable_params']:,}", str(len(seeds))]
            row += [cell((s["after"][k] for s in seeds.values()), d) for k, _, d in LEARNT + FORGOT]
            cost = [s["cost"] for s in seeds.values()]
            row += [cell((c["step_seconds"] for c in cost), 2), cell((c["peak_rss_mb"] for c in cost), 0)]
            row.append(
                cell((c["decode_tok_s"] for c in cost), 1)
                + " ("
                + cell((c["decode_tok_s_untouched"] for c in cost), 1)
                + ")"
            )
            lines.append("| " + " | ".join(row) + " |")
        if REFERENCE_ARM in arms:
            lines += ["", f"Each arm minus {REFERENCE_ARM}, paired by seed (95% interval; * excludes zero):", ""]
            keys = LEARNT + FORGOT
            lines += ["| arm | " + " | ".join(label for _, label, _ in keys) + " |", "|---|" + "---|" * len(keys)]
            reference = arms[REFERENCE_ARM]
            for arm, seeds in arms.items():
                if arm == REFERENCE_ARM:
                    continue
                diffs = [
                    paired_difference(
                        {s: r["after"][k] for s, r in seeds.items()}, {s: r["after"][k] for s, r in reference.items()}
                    ).format(d)
                    for k, _, d in keys
                ]
                lines.append(f"| {arm} | " + " | ".join(diffs) + " |")
        lines.append("")
    return "\n".join(lines)


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
    (results / "summary.md").write_text(tables(runs))
    plot(runs, results / "facts_vs_forgetting.png")
    print((results / "summary.md").read_text())
