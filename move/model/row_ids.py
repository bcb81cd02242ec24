"""Token ids made distinct on the device: the bookkeeping of a table's touched rows.

torch.unique answers "which rows, and how often" in a tensor whose size depends on
the data; on a GPU the host must read that size before it can go on (a host sync).
Everything here keeps sizes fixed by the shapes instead: sort, mark where a new id
starts, count the marks with a cumulative sum. The results hold the distinct ids
first, then padding.

An id equal to `absent` (a table's row count, one past its last row) stands for "no
row": the padding that a fixed-size buffer carries through an exchange between
processes (move/model/row_shard.py). It sorts after every real id and is never
reported as present.
"""

import torch


def distinct_slots(sorted_ids: torch.Tensor) -> torch.Tensor:
    """For sorted ids (n,): the place of each id among the distinct ones (0, 0, 1, 2,
    2, ...), computed on the device (no unique, no host sync)."""
    new_run = torch.ones_like(sorted_ids, dtype=torch.bool)
    new_run[1:] = sorted_ids[1:] != sorted_ids[:-1]
    return torch.cumsum(new_run, 0) - 1


def sum_repeated_rows(ids: torch.Tensor, values: torch.Tensor, absent: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(row ids (n,), sums (n, ...)): the values of each distinct id of ids (n,) summed
    into one slot, the distinct ids sorted; each slot sums in the original order (a
    stable sort), so the result does not depend on how equal ids were ordered. The
    slots past the last distinct id hold `absent` (-1: id 0, with zero sums, so adding
    them anywhere changes nothing). The size is fixed by n: no host sync (sum_rows
    gives the compact form, at the price of one)."""
    order = torch.sort(ids, stable=True).indices
    ids = ids[order]
    slot = distinct_slots(ids)
    sums = torch.zeros_like(values).index_add_(0, slot, values[order])
    fill = torch.zeros_like(ids) if absent < 0 else torch.full_like(ids, absent)
    return fill.index_copy_(0, slot, ids), sums


def sum_rows(ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted distinct ids, the sum of the values of each id's occurrences) for ids
    (n,) and values (n, ...), compact: its size is the number of distinct ids, which
    the host reads (torch.unique: one sync)."""
    rows, position = torch.unique(ids, return_inverse=True)
    return rows, values.new_zeros((len(rows), *values.shape[1:])).index_add_(0, position, values)
