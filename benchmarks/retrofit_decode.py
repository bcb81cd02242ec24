"""Decoding speed of SmolLM2-135M with what the facts study adds, against the untouched
model, side by side in one process: greedy `generate` with the KV cache, 32 prompt
tokens and 64 new ones, at batch 1 and 8. Target (the pretrained-facts study): a bank
decodes within 5% of the untouched model's tokens/s.

    OMP_NUM_THREADS=1 python benchmarks/retrofit_decode.py   # writes benchmarks/retrofit_decode.md

Arms: the untouched model; a MoVE bank of M = 1 and of M = 15 slots (30 hooked layers,
one bank lookup per forward); LaVE-style tables (15 hooked layers); LoRA r = 32 on every
linear layer, unmerged (peft) and merged into the weights. Random prompts, zero banks
and LoRA B (speed does not depend on the values). Each round times every arm once, in
a shuffled order; a ratio is the median over rounds of the per-round ratio to the
untouched model. The study's own decode figures time each model once, in different
phases of a run, while the other core trains: this is the measurement to quote."""

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from move.export.hf_models import load_causal_lm, packaged_model
from move.export.retrofit import retrofit
from move.export.retrofit_training import add_lora

PROMPT, NEW = 32, 64
BATCHES = (1, 8)


def arms(path: str) -> dict:
    def bank(slots):
        return lambda model: retrofit(model, slots=slots)

    def lora(merged):
        def build(model):
            adapted = add_lora(model, 32)
            return adapted.merge_and_unload() if merged else adapted

        return build

    build = {
        "untouched": lambda model: model,
        "bank M=1": bank(1),
        "bank M=15": bank(15),
        "LaVE tables": lambda model: retrofit(model, layout="lave"),
        "LoRA r=32": lora(False),
        "LoRA r=32, merged": lora(True),
    }
    return {name: make(load_causal_lm(path)).eval() for name, make in build.items()}


@torch.no_grad()
def seconds(model, batch: int, seed: int) -> float:
    ids = torch.randint(0, 49152, (batch, PROMPT), generator=torch.Generator().manual_seed(seed))
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, min_new_tokens=NEW, max_new_tokens=NEW)
    start = time.perf_counter()
    model.generate(input_ids=ids, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per batch size (default 7)")
    table_file = Path(__file__).with_suffix(".md")
    parser.add_argument("--out", default=str(table_file), help="the table (default benchmarks/retrofit_decode.md)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    import transformers

    models = arms(packaged_model("smollm2-135m"))
    lines = ["| arm | " + " | ".join(f"batch {b}: tok/s, ratio" for b in BATCHES) + " |", "|---|---|---|"]
    cells = {name: [] for name in models}
    order = random.Random(0)
    for batch in BATCHES:
        for model in models.values():
            seconds(model, batch, seed=99)  # warm-up: allocator, caches
        times = {name: [] for name in models}
        for round_ in range(args.rounds):
            names = list(models)
            order.shuffle(names)
            for name in names:
                times[name].append(seconds(models[name], batch, seed=round_))
        for name in models:
            ratio = statistics.median(u / t for u, t in zip(times["untouched"], times[name]))
            tok_s = batch * NEW / statistics.median(times[name])
            cells[name].append(f"{tok_s:.1f}, {ratio:.3f}")
    lines += [f"| {name} | " + " | ".join(row) + " |" for name, row in cells.items()]
    table = "\n".join(lines)
    note = (
        f"Measured with {torch.get_num_threads()} thread(s), torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {sys.platform}; {args.rounds} shuffled rounds; ratio = untouched time / arm "
        "time (1.000: as fast as the untouched model; the target is >= 0.95 for a bank)."
    )
    Path(args.out).write_text(
        "# Decoding a retrofitted SmolLM2-135M\n\n" + __doc__.split("\n\n")[0] + "\n\n" + table + "\n\n" + note + "\n"
    )
    print(table)
    print(note)


if __name__ == "__main__":
    main()
