"""A SmolLM2-135M bank's training cost under this project's bank options: the exact
optimiser (AdamW over the whole 49,152-row bank) against the row-sparse lazy one, and
an fp32 bank against a bf16 one (fp32 optimiser state either way), at M = 1 and 15.

    bash scripts/smollm2_data.sh && python benchmarks/retrofit_bank.py
        -> benchmarks/retrofit_bank.md

Each setting is one `move retrofit` process (peak memory is per process) on the news
corpus of the study (the bank's cost does not depend on the text), 12 steps of 8 x 64
tokens, one after the other on an otherwise idle machine; the step time is the
Trainer's, over the steps after its 5 warm-up steps; peak memory is the process's
resident peak, before training (the model loaded and measured) and at the end. The
study itself used the exact optimiser and an fp32 bank."""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = [  # (bank optimiser, bank dtype)
    ("exact", "float32"),
    ("lazy", "float32"),
    ("lazy", "bfloat16"),
]
SLOTS = (1, 15)
STEPS, BATCH, SEQ = 12, 8, 64


def run_one(model: str, data: str, out: Path, slots: int, optimizer: str, dtype: str) -> dict:
    command = [sys.executable, "-m", "move", "retrofit", model, "--data", data, "--out", str(out), "--no-save"]
    command += ["--steps", str(STEPS), "--batch-size", str(BATCH), "--seq-len", str(SEQ), "--eval-tokens", "512"]
    command += ["--kl-tokens", "0", "--slots", str(slots), "--lr-memory", "1e-2", "--lr-router", "1e-3"]
    command += ["--bank-optimizer", optimizer, "--bank-dtype", dtype, "--checkpoint-every", str(STEPS)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "retrofit.json").read_text())
    trainer = json.loads((out / "summary.json").read_text())
    return {
        "step_s": BATCH * SEQ / trainer["tok_per_s"],
        "rss_before": summary["cost"]["peak_rss_mb_before_training"],
        "rss": summary["cost"]["peak_rss_mb"],
        "bank_mb": summary["accounting"]["params"]["value_memory"] * (2 if dtype == "bfloat16" else 4) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/news_smol", help="prepared text (default data/news_smol)")
    table_file = Path(__file__).with_suffix(".md")
    parser.add_argument("--out", default=str(table_file), help="the table (default benchmarks/retrofit_bank.md)")
    args = parser.parse_args()
    import torch

    from move.export.hf_models import packaged_model

    model = str(packaged_model("smollm2-135m"))
    lines = [
        "| M | bank optimiser | bank dtype | bank MB | step s | peak MB before training | peak MB |",
        "|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        for slots in SLOTS:
            for optimizer, dtype in SETTINGS:
                r = run_one(model, args.data, Path(scratch) / f"{slots}-{optimizer}-{dtype}", slots, optimizer, dtype)
                lines.append(
                    f"| {slots} | {optimizer} | {dtype} | {r['bank_mb']:,.0f} | {r['step_s']:.2f} | "
                    f"{r['rss_before']:,.0f} | {r['rss']:,.0f} |"
                )
                print(lines[-1], flush=True)
    note = (
        f"Measured with OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, torch {torch.__version__}, "
        f"{sys.platform}; {STEPS} steps of {BATCH} x {SEQ} tokens, one process per row."
    )
    table = "\n".join(lines)
    Path(args.out).write_text(
        "# A SmolLM2-135M bank's training cost\n\n" + __doc__.split("\n\n")[0] + "\n\n" + table + "\n\n" + note + "\n"
    )
    print(note)


if __name__ == "__main__":
    main()
