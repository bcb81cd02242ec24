"""Batches from a flat token array: BOS-aligned, seeded, exactly resumable.

Training rows start at BOS positions (passage starts); which ones each batch
holds, and the resumable state, come from the shared EpochSampler.
"""

import numpy as np
import torch

from move.config import mixed_rows
from move.errors import DataError
from move.training.sampler import EpochSampler


class BatchLoader:
    def __init__(
        self,
        tokens: np.ndarray,
        bos_id: int,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.tokens, self.seq_len = tokens, seq_len
        starts = np.flatnonzero(np.asarray(tokens) == bos_id)
        self.starts = starts[starts + seq_len + 1 <= len(tokens)]
        if len(self.starts) == 0:
            raise DataError(f"no BOS-aligned sequence of {seq_len + 1} tokens fits in {len(tokens)} tokens")
        self.sampler = EpochSampler(len(self.starts), batch_size, seed, rank, world_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, seq_len) int64, this rank's slice."""
        starts = self.starts[self.sampler.next_indices()]
        rows = np.stack([np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts])
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class MixedLoader:
    """Every batch holds rows of two corpora: the main loader's rows first, then the
    mixed-in loader's (a fixed count, so the ratio holds in every step, not only on
    average). Each keeps its own seeded order; the state holds both."""

    def __init__(self, main: BatchLoader, mixed_in: BatchLoader):
        self.main, self.mixed_in = main, mixed_in

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        (x, y), (mx, my) = self.main.next_batch(), self.mixed_in.next_batch()
        return torch.cat([x, mx]), torch.cat([y, my])

    def state_dict(self) -> dict:
        return {"main": self.main.state_dict(), "mixed_in": self.mixed_in.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.main.load_state_dict(state["main"])
        self.mixed_in.load_state_dict(state["mixed_in"])


def training_loader(
    data,
    batch_size: int,
    seq_len: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    mixed_in=None,
    mix_fraction: float = 0.0,
):
    """Training batches of prepared data (PreparedData); with `mixed_in` (another corpus
    under the same tokenizer), round(batch_size x mix_fraction) rows of every batch
    come from it (MixedLoader). Refuses, in one line, a share that leaves a corpus no
    row and a corpus under another tokenizer."""
    rows_mixed = mixed_rows(batch_size, mix_fraction, DataError, " (per process)") if mixed_in else 0
    if mixed_in and mixed_in.tokenizer.fingerprint() != data.tokenizer.fingerprint():
        raise DataError(f"{mixed_in.directory} was prepared with another tokenizer than {data.directory}")
    bos = data.tokenizer.bos_id
    loader = BatchLoader(data.tokens("train"), bos, batch_size - rows_mixed, seq_len, seed, rank, world_size)
    if not mixed_in:
        return loader
    return MixedLoader(loader, BatchLoader(mixed_in.tokens("train"), bos, rows_mixed, seq_len, seed, rank, world_size))


def eval_windows(tokens: np.ndarray, seq_len: int, max_tokens: int, batch_size: int):
    """Consecutive non-overlapping windows over the first max_tokens tokens, so that
    every scored token is scored exactly once. Yields (inputs, targets) batches."""
    n = min(len(tokens) - 1, max_tokens)
    n_windows = n // seq_len
    if n_windows == 0:
        raise DataError(f"evaluation needs more than {seq_len} tokens, got {len(tokens)}")
    data = torch.from_numpy(np.asarray(tokens[: n_windows * seq_len + 1], dtype=np.int64))
    x = data[:-1].view(n_windows, seq_len)
    y = data[1:].view(n_windows, seq_len)
    for i in range(0, n_windows, batch_size):
        yield x[i : i + batch_size], y[i : i + batch_size]


def sliding_windows(tokens: np.ndarray, seq_len: int, stride: int, max_tokens: int, batch_size: int):
    """The field's standard protocol, as the transformers recipe computes it ("Perplexity
    of fixed-length models", max_length = the context): windows of up to seq_len tokens
    start every `stride` tokens; each scores only the targets no earlier window scored,
    every one of them with at least seq_len - stride tokens of context (all before it,
    near the start). Targets a window only reads are -1 (ignored, 0 bytes). Every target
    in the first max_tokens tokens is scored exactly once. Yields (inputs, targets)
    batches of equal-length windows (inputs: at most seq_len - 1 tokens, as the recipe's
    last position predicts nothing it scores)."""
    if not 1 <= stride < seq_len:
        raise DataError(f"the stride must lie in [1, {seq_len - 1}] (below the window of {seq_len}), got {stride}")
    n = min(len(tokens), max_tokens + 1)
    if n < 2:
        raise DataError(f"evaluation needs at least 2 tokens, got {n}")
    data = torch.from_numpy(np.asarray(tokens[:n], dtype=np.int64))
    windows, scored_until = [], 1  # targets [1, scored_until) are scored
    for begin in range(0, n, stride):
        end = min(begin + seq_len, n)  # window data[begin:end]: inputs [begin, end-1), targets [begin+1, end)
        targets = data[begin + 1 : end].clone()
        targets[: max(0, scored_until - begin - 1)] = -1
        windows.append((data[begin : end - 1], targets))
        scored_until = end
        if end == n:
            break
    batch: list = []
    for x, y in windows:
        if batch and (len(batch) == batch_size or len(batch[-1][0]) != len(x)):
            yield torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
            batch = []
        batch.append((x, y))
    yield torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
