"""Recall of every run of a knowledge experiment under each opener, the training ones
included: does a model recall under the phrasings it was trained on what it cannot
recall under the held-out one? Writes <results>/recall_by_opener.json and a markdown
table (mean over seeds, stored bits) to stdout.

    python scripts/recall_by_opener.py results/knowledge-slots
"""

import json
import statistics
import sys
from pathlib import Path

from move.knowledge.corpus import OPENERS
from move.knowledge.recall import load_knowledge, recall
from move.recipes import resolve_checkpoint
from move.text.prepare import load_prepared
from move.training.checkpoint import data_dir_for, load_model


def main(results: Path) -> None:
    rows = {}
    for run in sorted(results.glob("runs/*/*/seed*")):
        checkpoint = resolve_checkpoint(run)
        model, header = load_model(checkpoint)
        data_dir = data_dir_for(checkpoint, header, None, "--data")
        tokenizer, knowledge = load_prepared(data_dir).tokenizer, load_knowledge(data_dir)
        size, variant, seed = run.parts[-3:]
        rows[f"{size}/{variant}/{seed}"] = {
            opener or "(none)": recall(model, tokenizer, {**knowledge, "held_out_opener": opener})["knowledge_bits"]
            for opener in OPENERS
        }
    (results / "recall_by_opener.json").write_text(json.dumps(rows, indent=1))
    cells = {}
    for key, bits in rows.items():
        cells.setdefault(key.rsplit("/", 1)[0], []).append(bits)
    names = [o or "(none)" for o in OPENERS]
    print("| cell | " + " | ".join(names[:-1]) + f" | {names[-1]} (held out) |")
    print("|---|" + "---|" * len(names))
    for cell, runs in cells.items():
        means = [statistics.mean(r[n] for r in runs) for n in names]
        print(f"| {cell} | " + " | ".join(f"{m:,.0f}" for m in means) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
