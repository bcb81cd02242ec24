"""Text preparation time against input size, for one single-line document (the
case that used to be quadratic: 0.25M / 0.5M / 1M tokens took 0.47 / 1.96 / 7.66 s).

    python benchmarks/prepare_linear.py      # writes benchmarks/prepare_linear.md

Times the tokenisation and passage grouping of `encode_document` with a fixed BPE
tokenizer, so the ratio between sizes is what matters: ~2x per doubling is linear."""

import time
from pathlib import Path

from move.text.prepare import encode_document
from move.text.tokenizer import Tokenizer

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "the",
    "lazy",
    "dog",
    "and",
    "then",
    "some",
    "more",
    "words",
    "follow",
    "here",
]


def one_line(n_words: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] + str(i % 97) for i in range(n_words))


def main() -> None:
    tokenizer = Tokenizer.train([one_line(20000)], 512)
    rows, previous = [], None
    for n_words in (125_000, 250_000, 500_000, 1_000_000, 2_000_000):
        text = one_line(n_words)
        start = time.perf_counter()
        tokens = len(encode_document(tokenizer, text, 256))
        seconds = time.perf_counter() - start
        ratio = f"{seconds / previous:.2f}x" if previous else ""
        rows.append(f"| {len(text) / 1e6:.1f} MB | {tokens:,} | {seconds:.2f} | {ratio} |")
        previous = seconds
    table = "\n".join(["| one line of | tokens | seconds | vs previous size (2x input) |", "|---|---|---|---|", *rows])
    out = Path(__file__).with_suffix(".md")
    out.write_text("# Text preparation scales linearly\n\n" + __doc__.split("\n\n")[0] + "\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
