"""The table of scripts/smollm2_facts.sh: per arm, mean ± std over seeds of what was
learnt (recall, stored bits on the held-out phrasing) and what it cost (news bpb),
and the paired difference bank − LoRA with its 95% interval."""

import json
import sys
from pathlib import Path

from move.experiments.stats import paired_difference, summarize_values

METRICS = [("recall_accuracy", 3), ("knowledge_bits", 0), ("general_bpb", 4), ("val_bpb", 4)]


def main(results: Path) -> None:
    runs = {
        arm.name: {int(s.name[4:]): json.loads((s / "retrofit.json").read_text()) for s in sorted(arm.glob("seed*"))}
        for arm in sorted(results.iterdir())
        if arm.is_dir()
    }
    arms = list(runs)
    print(
        "| | "
        + " | ".join(f"{a} ({next(iter(runs[a].values()))['trainable_params']:,} trained)" for a in arms)
        + " | "
        + " − ".join(arms)
        + " [95% CI] |"
    )
    print("|---|" + "---|" * (len(arms) + 1))
    before = next(iter(runs[arms[0]].values()))["before"]
    for key, digits in METRICS:
        after = {a: {s: r["after"][key] for s, r in runs[a].items()} for a in arms}
        cells = [summarize_values(after[a].values()).format(digits) for a in arms]
        diff = paired_difference(after[arms[0]], after[arms[1]]).format(digits) if len(arms) == 2 else ""
        print(f"| {key} (untouched: {before[key]:.{digits}f}) | " + " | ".join(cells) + f" | {diff} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
