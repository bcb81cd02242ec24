"""A value-memory table split by rows across the processes of a torch.distributed job.

Rank r owns the contiguous token ids [r * per_rank, (r + 1) * per_rank) (the last
rank may own fewer). A step moves only the rows its batch touches:

  forward   each rank sends the sorted unique ids it needs to their owners, the
            owners answer with the rows (two all_to_all_single calls, after one
            that exchanges the counts);
  backward  each rank sends the gradients of those rows back the same way; an
            owner sums what all ranks sent for a row and averages over ranks like
            DDP does for the dense weights, then applies its optimiser to its own
            rows only (exact AdamW or lazy row-wise Adam, both element-wise, so
            the shard update equals the unsharded update restricted to its rows).

Traffic per step is 2 x (unique ids in the batch) x row bytes, independent of the
vocabulary. FSDP2's fully_shard would all-gather the whole table before the
forward and reduce-scatter a whole-table gradient after the backward: the same
bytes as replicating it, vocab x row bytes, which is what sharding is meant to
avoid (benchmarks/distributed.md measures both).

Under torchrun checkpoints are written sharded, each rank its own rows, and read
back with any number of processes (move/training/sharded_checkpoint.py).
"""

import math

import torch
import torch.distributed as dist


def sum_rows(ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted distinct ids, the sum of the values of each id's occurrences) for
    ids (n,) and values (n, ...): how row gradients are combined, wherever the same
    row shows up more than once."""
    rows, position = torch.unique(ids, return_inverse=True)
    return rows, values.new_zeros((len(rows), *values.shape[1:])).index_add_(0, position, values)


class RowShard:
    def __init__(self, num_rows: int, rank: int, world_size: int, group=None):
        self.num_rows, self.rank, self.world_size, self.group = num_rows, rank, world_size, group
        self.per_rank = math.ceil(num_rows / world_size)
        self.start = min(rank * self.per_rank, num_rows)
        self.stop = min(self.start + self.per_rank, num_rows)

    def owners(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.div(ids, self.per_rank, rounding_mode="floor")

    def _all_to_all(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        recv = send.new_empty((sum(recv_counts), *send.shape[1:]))
        dist.all_to_all_single(recv, send.contiguous(), recv_counts, send_counts, group=self.group)
        return recv

    def _route(self, ids: torch.Tensor) -> tuple[list[int], list[int], torch.Tensor]:
        """For sorted ids: (how many go to each owner, how many each rank asks of
        us, the global ids asked of us in rank order)."""
        send_counts = torch.bincount(self.owners(ids), minlength=self.world_size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_counts, recv_counts = send_counts.tolist(), recv_counts.tolist()
        return send_counts, recv_counts, self._all_to_all(ids, send_counts, recv_counts)

    def fetch(self, local_weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the full table for sorted unique global `ids` (n, ...). Every
        rank of the group must call it, each with its own ids."""
        send_counts, recv_counts, asked = self._route(ids)
        answers = local_weight[asked - self.start]
        return self._all_to_all(answers, recv_counts, send_counts)

    def reduce_grads(self, ids: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Send the gradients of sorted unique global `ids` to their owners.
        Returns (local row indices, their gradients summed over ranks / world)."""
        send_counts, recv_counts, asked = self._route(ids)
        rows, summed = sum_rows(asked - self.start, self._all_to_all(grads, send_counts, recv_counts))
        return rows, summed / self.world_size
