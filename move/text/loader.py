"""Batches from a flat token array: BOS-aligned, seeded, exactly resumable.

Training rows start at BOS positions (passage starts); which ones each batch
holds, and the resumable state, come from the shared EpochSampler.
"""

import numpy as np
import torch

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
