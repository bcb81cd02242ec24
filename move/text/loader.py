"""Batches from a flat token array: BOS-aligned, seeded, exactly resumable.

Training rows start at BOS positions (passage starts), visited in a fresh
permutation each epoch drawn from (seed, epoch); the loader's whole state is
(epoch, cursor), so a resumed loader yields exactly the batches an uninterrupted
one would. With several processes, each global batch of world*B rows is cut in
contiguous slices, so N processes see together what one process with batch N*B
sees.
"""

import numpy as np
import torch

from move.errors import DataError


class BatchLoader:
    def __init__(self, tokens: np.ndarray, bos_id: int, batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        starts = np.flatnonzero(np.asarray(tokens) == bos_id)
        self.starts = starts[starts + seq_len + 1 <= len(tokens)]
        if len(self.starts) == 0:
            raise DataError(f"no BOS-aligned sequence of {seq_len + 1} tokens fits in {len(tokens)} tokens")
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.starts))

    def _next_start(self) -> int:
        if self.cursor == len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        start = self.starts[self._order[self.cursor]]
        self.cursor += 1
        return int(start)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (batch_size, seq_len) int64, this rank's slice."""
        starts = [self._next_start() for _ in range(self.batch_size * self.world_size)]
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        rows = np.stack([np.asarray(self.tokens[s:s + self.seq_len + 1], dtype=np.int64) for s in mine])
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise DataError(f"loader state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)


def eval_windows(tokens: np.ndarray, seq_len: int, max_tokens: int, batch_size: int):
    """Consecutive non-overlapping windows over the first max_tokens tokens, so that
    every scored token is scored exactly once. Yields (inputs, targets) batches."""
    n = min(len(tokens) - 1, max_tokens)
    n_windows = n // seq_len
    if n_windows == 0:
        raise DataError(f"evaluation needs more than {seq_len} tokens, got {len(tokens)}")
    data = torch.from_numpy(np.asarray(tokens[:n_windows * seq_len + 1], dtype=np.int64))
    x = data[:-1].view(n_windows, seq_len)
    y = data[1:].view(n_windows, seq_len)
    for i in range(0, n_windows, batch_size):
        yield x[i:i + batch_size], y[i:i + batch_size]
