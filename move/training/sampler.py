"""Which examples each training batch holds: seeded, exactly resumable, rank-sliced.

Examples 0..n-1 are visited in a fresh permutation each epoch drawn from
(seed, epoch); the whole state is (epoch, cursor), so a resumed sampler yields
exactly the batches an uninterrupted one would. With several processes, each
global batch of world*B examples is cut in contiguous slices, so N processes
see together what one process with batch N*B sees. Text and image loaders both
draw their batches from here.
"""

import numpy as np

from move.errors import DataError


class EpochSampler:
    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if n <= 0:
            raise DataError("no training examples")
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def _next(self) -> int:
        if self.cursor == self.n:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        index = self._order[self.cursor]
        self.cursor += 1
        return int(index)

    def next_indices(self) -> np.ndarray:
        """This rank's slice of the next global batch."""
        indices = [self._next() for _ in range(self.batch_size * self.world_size)]
        return np.asarray(indices[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise DataError(f"loader state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)
