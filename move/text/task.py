"""The text task for the shared training loop: BOS-aligned training batches and
validation bits per byte on a fixed held-out token set."""

from pathlib import Path

import torch

from move.errors import DataError
from move.evaluation.bpb import bits_per_byte
from move.text.loader import eval_windows, training_loader
from move.text.prepare import PreparedData


class TextTask:
    def __init__(
        self,
        data: PreparedData,
        seq_len: int,
        batch_size: int,
        seed: int,
        eval_tokens: int,
        rank: int = 0,
        world_size: int = 1,
        mixed_in: PreparedData | None = None,
        mix_fraction: float = 0.0,
    ):
        """mixed_in: another corpus with the same tokenizer, round(batch_size x
        mix_fraction) rows of every batch (general text that continued training must
        not forget); its validation bpb is reported as mix_val_bpb."""
        self.data, self.seq_len, self.batch_size, self.eval_tokens = data, seq_len, batch_size, eval_tokens
        self.mixed_in = mixed_in
        for corpus in [data] + ([mixed_in] if mixed_in else []):
            for split in ("train", "val"):  # checked now, not minutes in at the first evaluation
                tokens = corpus.manifest["splits"][split]["tokens"]
                if tokens < seq_len + 1:
                    raise DataError(
                        f"{corpus.directory}: the {split} split has {tokens} tokens, fewer than one window of "
                        f"{seq_len + 1}; prepare more text (or a larger --val-fraction)"
                    )
        self.tokens_per_example = seq_len
        self.loader = training_loader(data, batch_size, seq_len, seed, rank, world_size, mixed_in, mix_fraction)
        self.token_bytes = torch.from_numpy(data.tokenizer.token_bytes())

    def check_model(self, model) -> None:
        # Larger would run, but the extra rows would never be trained and the run's
        # accounting would count them: a model built for other data is a mistake.
        if model.config.vocab_size != self.data.tokenizer.vocab_size:
            raise DataError(
                f"model vocab_size {model.config.vocab_size} does not match the data's tokenizer "
                f"({self.data.tokenizer.vocab_size} tokens); build the model with "
                f"vocab_size={self.data.tokenizer.vocab_size}"
            )

    def evaluate(self, model) -> dict:
        scores = {"val_bpb": self.bits_per_byte(model, self.data)}
        if self.mixed_in:
            scores["mix_val_bpb"] = self.bits_per_byte(model, self.mixed_in)
        return scores

    def bits_per_byte(self, model, corpus: PreparedData) -> float:
        batches = eval_windows(corpus.tokens("val"), self.seq_len, self.eval_tokens, self.batch_size)
        return bits_per_byte(model, batches, self.token_bytes)

    def checkpoint_files(self) -> dict[str, bytes]:
        """The tokenizer goes into every checkpoint: a run can be moved or shared alone."""
        return {"tokenizer.json": (Path(self.data.directory) / "tokenizer.json").read_bytes()}

    def describe(self) -> dict:
        m = self.data.manifest
        return {
            "modality": "text",
            "data": str(Path(self.data.directory).resolve()),
            "source": m["options"]["source"],
            "tokenizer_sha256": m["tokenizer_sha256"],
            "train_tokens": m["splits"]["train"]["tokens"],
            "eval_tokens": min(self.eval_tokens, m["splits"]["val"]["tokens"] - 1),
            **({"mixed_in": str(Path(self.mixed_in.directory).resolve())} if self.mixed_in else {}),
        }
