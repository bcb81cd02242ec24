"""Hugging Face `generate` on an exported model against the project's own sampler
(`move sample`'s `generate`), greedy, batch 1, side by side in one process: the
ratio of their times at 200 and 1,000 new tokens (target: <= 1.5x at 1,000).

    python benchmarks/hf_generate.py      # writes benchmarks/hf_generate.md

The model is the `small` preset's shape (4 layers, width 128) with MoVE x4 and the
standard model, random weights (speed does not depend on them), vocabulary 2,048 and
a context long enough for 1,000 tokens; the two samplers alternate over several
rounds and the median time of each is compared."""

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from move.config import model_config_from_preset
from move.export.hf import export_hf
from move.model.gpt import GPT
from move.model.sampling import generate
from move.text.tokenizer import Tokenizer
from move.training.checkpoint import save_checkpoint

ROUNDS = 3
LENGTHS = (200, 1000)


def median_seconds(run, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    import transformers

    tmp = Path(tempfile.mkdtemp())
    os.environ["HF_HOME"] = str(tmp / "hf_home")
    tokenizer = Tokenizer.train(["To be, or not to be, that is the question. " * 200], 512)
    (tmp / "tok").mkdir()
    tokenizer.save(tmp / "tok")
    prompt = torch.tensor([[tokenizer.bos_id, *tokenizer.encode("To be, or not to be")]])
    rows = []
    for variant, density in (("standard", 1), ("move", 4)):
        torch.manual_seed(0)
        model = GPT(
            model_config_from_preset(
                "small", vocab_size=tokenizer.vocab_size, seq_len=1100, value_memory=variant, memory_density=density
            )
        ).eval()
        ckpt = save_checkpoint(tmp / f"ckpt_{variant}", model, meta={})
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(
            export_hf(ckpt, tmp / f"hf_{variant}", tmp / "tok"), trust_remote_code=True
        ).eval()
        for n in LENGTHS:
            ours = median_seconds(lambda model=model, n=n: generate(model, prompt, n, temperature=0), ROUNDS)
            theirs = median_seconds(
                lambda hf_model=hf_model, n=n: hf_model.generate(
                    prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False
                ),
                ROUNDS,
            )
            rows.append(
                f"| {variant if variant == 'standard' else f'move x{density}'} | {n} | {ours:.2f} | "
                f"{theirs:.2f} | {theirs / ours:.2f}x |"
            )
    table = "\n".join(
        ["| model | new tokens | move sample (s) | HF generate (s) | HF / move |", "|---|---|---|---|---|", *rows]
    )
    note = (
        f"Measured with {torch.get_num_threads()} thread(s), torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {sys.platform}; median of {ROUNDS} rounds each."
    )
    Path(__file__).with_suffix(".md").write_text(
        "# Hugging Face generate vs the project's sampler\n\n"
        + __doc__.split("\n\n")[0]
        + "\n\n"
        + table
        + "\n\n"
        + note
        + "\n"
    )
    print(table)
    print(note)


if __name__ == "__main__":
    main()
