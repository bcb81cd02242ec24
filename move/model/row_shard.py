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

Two ways to size the exchanges (RowShard.fixed):

  sized (default)  each rank sends exactly its distinct ids and rows. Their number
            depends on the batch, so the host reads it before every collective:
            unique, bincount and the exchanged counts are host syncs (4 per
            micro-batch + 4 per step, listed in docs/gpu.md).
  fixed     each rank sends every owner a buffer of C = min(ids looked up, rows per
            rank) entries, its ids first and padding after (row_ids.py: sorting,
            no unique). The sizes follow from the shapes, so no host reads anything:
            no sync in the step. The price is traffic: world x C rows each way
            instead of the distinct ids, at most a whole table's rows per exchange.
            Every rank must look up the same number of ids (a training batch split
            evenly, as under torchrun here); forwards without autograd (evaluation,
            decoding) use the sized exchange, whose batches may differ by rank.

Traffic per step, sized: 2 x (unique ids in the batch) x row bytes, independent of the
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

from move.model.row_ids import distinct_slots, sum_repeated_rows, sum_rows


class RowShard:
    def __init__(self, num_rows: int, rank: int, world_size: int, group=None, fixed: bool = False):
        self.num_rows, self.rank, self.world_size, self.group = num_rows, rank, world_size, group
        self.fixed = fixed  # fixed-capacity exchanges (no host sync) for lookups with autograd on
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

    # ---- the fixed-capacity exchange: sizes from the shapes, no host sync ----
    def _places(self, ids: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For sorted ids (n,), each real id once, then `num_rows` (absent): the owner
        of each and its place in the owner's part of a (world, capacity + 1) buffer;
        absent ids go to the last column, which is never sent."""
        owner = self.owners(ids).clamp_(max=self.world_size - 1)
        bounds = torch.arange(self.world_size, device=ids.device) * self.per_rank
        place = torch.arange(len(ids), device=ids.device) - torch.searchsorted(ids, bounds)[owner]
        return owner, torch.where(ids < self.num_rows, place, capacity)

    def _exchange(self, owner, place, values: torch.Tensor, capacity: int, fill) -> torch.Tensor:
        """values (n, ...) at (owner, place) of a padded buffer, sent: -> (world,
        capacity, ...), what each rank put in our part."""
        buffer = values.new_full((self.world_size, capacity + 1, *values.shape[1:]), fill)
        buffer[owner, place] = values
        send = buffer[:, :capacity].contiguous()
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.group)
        return received

    def fetch_fixed(self, local_weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Rows of the full table for token ids idx (any shape, repeats allowed), by
        fixed-capacity exchanges. Every rank calls it with as many ids."""
        flat = idx.flatten()
        sorted_ids, order = torch.sort(flat)
        slot = distinct_slots(sorted_ids)
        distinct = torch.full_like(flat, self.num_rows).scatter_(0, slot, sorted_ids)  # each id once, then absent
        capacity = min(len(flat), self.per_rank)
        owner, place = self._places(distinct, capacity)
        asked = self._exchange(owner, place, distinct, capacity, self.num_rows)  # (world, capacity) global ids
        if self.stop > self.start:
            local = (asked - self.start).clamp_(0, self.stop - self.start - 1)  # padding answers a row nobody reads
            answers = local_weight[local].contiguous()
        else:  # the last ranks of a small table may own no row: nobody asks them anything
            answers = local_weight.new_zeros((*asked.shape, *local_weight.shape[1:]))
        got = torch.empty_like(answers)
        dist.all_to_all_single(got, answers, group=self.group)  # got[o, c]: the row we asked owner o for at c
        rows = torch.empty((len(flat), *local_weight.shape[1:]), dtype=local_weight.dtype, device=flat.device)
        rows[order] = got[owner[slot], place[slot]]
        return rows.view(*idx.shape, *local_weight.shape[1:])

    def merge_rows(self, ids: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row gradients (ids (n,), grads (n, ...)) summed per distinct id in a buffer
        of n entries, the distinct ids first, sorted, then `num_rows` (absent)."""
        return sum_repeated_rows(ids, grads, absent=self.num_rows)

    def reduce_grads_fixed(self, ids: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """reduce_grads by fixed-capacity exchanges, for merge_rows' output: (local row
        indices, their gradients summed over ranks / world), in a buffer of world x C
        entries whose padding holds local_rows (absent) with zero gradients."""
        capacity = min(len(ids), self.per_rank)
        owner, place = self._places(ids, capacity)
        asked = self._exchange(owner, place, ids, capacity, self.num_rows).flatten()
        received = self._exchange(owner, place, grads, capacity, 0).flatten(0, 1)
        local_rows = self.stop - self.start
        local = torch.where(asked < self.num_rows, asked - self.start, local_rows)
        rows, summed = sum_repeated_rows(local, received, absent=local_rows)
        return rows, summed / self.world_size
