"""Token-indexed tables and their gradients: the storage side of value memory.

A ValueTable holds slots (vocab, heads, slots, width_per_head), stored head-major so
that a gathered row is already in the layout of the batched matmul that mixes it.
Everything here is gradient engineering around one lookup; the formula itself is
in move/model/value_memory.py.

Two gradient modes, one set of numbers (tested against each other):
  "autograd": plain indexing, autograd builds a dense table-sized gradient per step;
  "dense":    the fast path. The bank is gathered once per forward for all layers
              (_GatherRows); each layer's mix (_FastMix) leaves its slot gates and the
              gradient of its mixed values in a MixRecord, and a zero-sized "carrier"
              scalar ties every mix to the gather, so the gather's backward runs once,
              after all layers: one small batched matmul (gates^T @ grads) for all
              layers, summed per distinct token id, written into a persistent dense
              .grad whose touched rows alone are written and later zeroed; exact AdamW
              reads the whole buffer, lazy Adam (RowAdam) only the touched rows.
A table read by one consumer that differentiates the rows itself (the other memory
designs: a hashed bigram table, product-key values) uses `lookup` (_LookupRows):
the same per-row sums, the same modes.
A table sharded across processes (shard_rows) keeps only its own rows; the row
gradients wait in `pending` until reduce_shard_grads sends them to their owners.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn

from move.config import ROW_EXCHANGES
from move.errors import ConfigError
from move.model.row_ids import distinct_slots, sum_repeated_rows, sum_rows
from move.model.row_shard import RowShard

GRAD_MODES = ("autograd", "dense")


class Slots(NamedTuple):
    """Gathered memory rows plus, on the fast path, what ties the layers' mixes to
    one bank-gradient computation (None on the reference path)."""

    values: torch.Tensor  # (B, T, heads, slots, width)
    carrier: torch.Tensor | None = None  # scalar whose gradient triggers the bank backward
    record: "MixRecord | None" = None


class RowSet(NamedTuple):
    """The distinct rows of a table a step touched, in a buffer whose size no host has
    to read. torch.unique gives them too, but its output size depends on the data,
    which on a GPU waits for the device: a host sync in every step. Here the size is
    fixed by the shapes, min(ids looked up, rows of the table): the distinct ids come
    first, sorted, marked by `first`, and the padding after them repeats the first
    distinct id. A consumer that must count each row once (a norm) weights by `first`;
    one that writes (zeroing, Adam's update) computes a padded entry from the same
    values as entry 0 and writes the same result. Bounded by the table's rows, a
    large batch costs no more than one pass over the table."""

    ids: torch.Tensor  # (capacity,) the distinct ids, sorted, then padding
    first: torch.Tensor  # (capacity,) bool: a distinct id (False: padding)

    @classmethod
    def of(cls, ids: torch.Tensor, num_rows: int) -> "RowSet":
        """The RowSet of ids (any shape, repeats allowed) of a table of num_rows rows. An
        id equal to num_rows stands for no row (move/model/row_ids.py) and is left out;
        with no row at all every entry is padding (first all False) at row 0."""
        ids = torch.sort(ids.flatten()).values
        capacity = min(ids.numel(), num_rows)
        if capacity == 0:
            return cls(ids[:0], ids[:0].bool())
        slot = distinct_slots(ids)  # <= capacity: at most num_rows real ids, then the absent one
        distinct = torch.full((capacity + 1,), num_rows, dtype=ids.dtype, device=ids.device)
        distinct = distinct.scatter_(0, slot, ids)[:capacity]
        first = distinct < num_rows
        padding = torch.where(first[0], distinct[0], 0)
        return cls(torch.where(first, distinct, padding), first)


class MixRecord:
    """What each layer's backward leaves for the bank's: its slot gates and the
    gradient of its mixed values."""

    def __init__(self):
        self.gates: list[torch.Tensor] = []  # (B, T, H, S) per consuming layer
        self.grads: list[torch.Tensor] = []  # (B, T, H, D) per consuming layer


class _GatherRows(torch.autograd.Function):
    """Forward: rows = weight[idx]. Backward: the gradient of every row, for all
    consuming layers at once: grad_slots = G^T @ D with G the layers' slot gates
    stacked (B,T,H,L,S) and D their output gradients (B,T,H,L,D) - one small batched
    matmul instead of L full-size slot gradients summed - then summed per distinct
    token id. The result goes into a persistent dense .grad (touched rows only)."""

    @staticmethod
    def forward(ctx, weight, idx, table, record):
        ctx.set_materialize_grads(False)
        ctx.table, ctx.record = table, record
        ctx.save_for_backward(idx)
        rows = table.gather(idx, training=True)
        ctx.mark_non_differentiable(rows)
        return rows, weight.new_zeros(())

    @staticmethod
    def backward(ctx, _grad_rows, _grad_carrier):
        (idx,) = ctx.saved_tensors
        table, record = ctx.table, ctx.record
        gates = torch.stack(record.gates, dim=-2).float()  # (B,T,H,L,S)
        grads = torch.stack(record.grads, dim=-2).float()  # (B,T,H,L,D)
        record.gates.clear()
        record.grads.clear()
        # a backward called inside an autocast block runs under it: keep this product fp32,
        # as the table's fp32 gradient buffer needs
        with torch.autocast(idx.device.type, enabled=False):
            grad_slots = gates.transpose(-1, -2) @ grads  # (B,T,H,S,D)
        table.take_row_grads(idx.flatten(), grad_slots.flatten(0, 1))
        return None, None, None, None


class _LookupRows(torch.autograd.Function):
    """rows = weight[idx] for a table read by one consumer (the other memory designs:
    a hashed bigram table, product-key values): the backward sums the rows' gradients
    per distinct id and hands them to the table like _GatherRows does, so these
    tables get the same fast path (no table-sized gradient per step, lazy Adam,
    row sharding)."""

    @staticmethod
    def forward(ctx, weight, idx, table):
        ctx.table = table
        ctx.save_for_backward(idx)
        return table.gather(idx, training=True)

    @staticmethod
    def backward(ctx, grad_rows):
        (idx,) = ctx.saved_tensors
        grads = grad_rows.float().flatten(0, idx.dim() - 1)
        ctx.table.take_row_grads(idx.flatten(), grads)
        return None, None, None


class _FastMix(torch.autograd.Function):
    """The mix (its forward is the formula itself, passed in as `mix`) with a
    hand-derived backward that hands the slot gradient to _GatherRows."""

    @staticmethod
    def forward(ctx, mix, v, gates, slot_values, carrier, record, gate_g0):
        ctx.record, ctx.gate_g0 = record, gate_g0
        ctx.save_for_backward(v, gates, slot_values)
        return mix(v, slot_values, gates, gate_g0)

    @staticmethod
    def backward(ctx, grad_out):
        v, gates, slot_values = ctx.saved_tensors
        slot_gates = gates[..., 1:] if ctx.gate_g0 else gates
        # d out / d g_i = m_i . grad_out  for every slot i: (B,T,H,S,D) @ (B,T,H,D,1)
        grad_slot_gates = (slot_values.to(grad_out.dtype) @ grad_out.unsqueeze(-1)).squeeze(-1)
        if ctx.gate_g0:
            grad_v = gates[..., :1].to(grad_out.dtype) * grad_out
            grad_g0 = (grad_out * v).sum(-1, keepdim=True)
            grad_gates = torch.cat([grad_g0, grad_slot_gates], dim=-1)
        else:
            grad_v, grad_gates = grad_out, grad_slot_gates
        ctx.record.gates.append(slot_gates.detach())
        ctx.record.grads.append(grad_out)
        return None, grad_v.to(v.dtype), grad_gates.to(gates.dtype), None, torch.zeros((), device=v.device), None, None


class ValueTable(nn.Module):
    """Token-indexed slots: weight (vocab, heads, slots, width_per_head).

    grad_mode picks how its gradient is built (the maths is the same):
      "autograd": the reference path - plain indexing, a dense gradient per step;
      "dense":    fast path, a persistent dense .grad of which only the rows touched
                  in the step are written and zeroed (read whole by exact AdamW,
                  at the touched rows by lazy RowAdam).
    """

    def __init__(self, vocab_size: int, heads: int, slots: int, width_per_head: int, zero_init: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, heads, slots, width_per_head))
        self.zero_init = zero_init  # GPT.init_weights: zeros instead of the value projection's scale
        self.grad_mode = "dense"
        self.touched: list[torch.Tensor] = []  # the ids whose gradient rows were written, per backward
        self._touched_rows: RowSet | None = None  # touched, merged (touched_rows)
        self.shard: RowShard | None = None  # set by shard_rows(): weight then holds this rank's rows only
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # sharded: (ids, grads) not yet sent

    def shard_rows(self, rank: int, world_size: int, group=None, exchange: str = "sized") -> None:
        """Keep only this rank's rows (see move/model/row_shard.py). Every rank must
        hold the same full table when this is called (same seed or checkpoint)."""
        if self.grad_mode == "autograd":
            raise ConfigError("a sharded value-memory table needs the fast path (value_memory_path fast)")
        if exchange not in ROW_EXCHANGES:
            raise ConfigError(f"row exchange must be one of {', '.join(ROW_EXCHANGES)}, got {exchange!r}")
        self.shard = RowShard(self.weight.shape[0], rank, world_size, group, fixed=exchange == "fixed")
        self.weight = nn.Parameter(self.weight.data[self.shard.start : self.shard.stop].clone())

    def gather(self, idx: torch.Tensor, training: bool = False) -> torch.Tensor:
        """Rows of the full table for token ids idx (any shape). training: a lookup of
        the fast path (every rank looks up as many ids), which a shard with fixed
        exchanges serves without a host sync."""
        if self.shard is None:
            return self.weight[idx]
        if training and self.shard.fixed:
            return self._fetch_fixed(idx)
        return self._fetch_from_shards(idx)

    # Not traced by torch.compile: collectives and data-dependent shapes.
    @torch.compiler.disable
    def _fetch_from_shards(self, idx: torch.Tensor) -> torch.Tensor:
        ids, inverse = torch.unique(idx, return_inverse=True)
        return self.shard.fetch(self.weight.detach(), ids)[inverse]

    @torch.compiler.disable
    def _fetch_fixed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.shard.fetch_fixed(self.weight.detach(), idx)

    def on_fast_path(self) -> bool:
        """Whether a lookup now builds the fast path's row gradients (dense mode, autograd
        on); otherwise it is plain indexing, which torch.compile traces (decoding)."""
        return self.grad_mode == "dense" and torch.is_grad_enabled() and self.weight.requires_grad

    def forward(self, idx: torch.Tensor) -> Slots:
        """idx (B, T) -> slots (B, T, heads, slots, width_per_head)."""
        return self._fast_path_slots(idx) if self.on_fast_path() else Slots(self.gather(idx))

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows (idx.shape..., heads, slots, width) for one consumer that differentiates
        them directly (not through the value mix), on the table's gradient path."""
        return self._fast_path_rows(idx) if self.on_fast_path() else self.gather(idx)

    # Not traced by torch.compile: the fast path's backward talks to the layers' mixes
    # through a side channel (MixRecord) and writes the table's gradient buffer, which
    # dynamo cannot trace; compiled models run the rest of each block compiled.
    @torch.compiler.disable
    def _fast_path_slots(self, idx: torch.Tensor) -> Slots:
        record = MixRecord()
        rows, carrier = _GatherRows.apply(self.weight, idx, self, record)
        return Slots(rows, carrier, record)

    @torch.compiler.disable
    def _fast_path_rows(self, idx: torch.Tensor) -> torch.Tensor:
        return _LookupRows.apply(self.weight, idx, self)

    def take_row_grads(self, ids: torch.Tensor, grads: torch.Tensor) -> None:
        """The fast path's end: the fp32 gradients of the rows at ids (n,) (an id may
        repeat), summed per distinct row, go into the persistent buffer or (a sharded
        table) wait for reduce_shard_grads. An fp32 table's buffer sums them itself
        (index_add_ accumulates repeated ids): no per-step temporary of the distinct
        rows, whose fresh allocation cost more in page faults than its arithmetic. A
        bf16 buffer gets fp32 sums, rounded once."""
        if self.shard is not None:  # sent to the rows' owners after the backward (reduce_shard_grads)
            # fp32: partial sums are rounded once, at the owner
            self.pending.append(self.shard.merge_rows(ids, grads) if self.shard.fixed else sum_rows(ids, grads))
        elif self.weight.dtype == torch.float32:
            self.add_dense_grad(ids, grads, touched=ids)
        else:
            rows, summed = sum_repeated_rows(ids, grads)
            self.add_dense_grad(rows, summed.to(self.weight.dtype), touched=ids)

    def add_dense_grad(self, ids: torch.Tensor, grads: torch.Tensor, touched: torch.Tensor) -> None:
        """Add grads (n, ...) at ids (n,) of the dense buffer (repeated ids accumulate);
        touched: the ids of the rows written (repeats allowed)."""
        if self.weight.grad is None:  # allocated once, then reused: only touched rows are ever zeroed
            self.weight.grad = torch.zeros_like(self.weight)
            # the rows of a buffer someone else dropped (a plain zero_grad(set_to_none=True),
            # as transformers' Trainer and peft call it) are no longer ours to zero
            self.touched.clear()
            self._touched_rows = None
        self.weight.grad.index_add_(0, ids, grads)
        self.touched.append(touched)
        self._touched_rows = None

    def reduce_shard_grads(self) -> None:
        """Sharded tables, after the step's backward(s): send the row gradients to
        their owners and set this rank's .grad. Every rank calls it every step -
        also with nothing to send - so that the collectives match and every shard
        is stepped like the unsharded table (whose gradient is never None)."""
        heads, slots, width = self.weight.shape[1:]
        ids = torch.cat([self.weight.new_zeros(0, dtype=torch.long)] + [r for r, _ in self.pending])
        grads = torch.cat(
            [self.weight.new_zeros(0, heads, slots, width, dtype=torch.float32)] + [g for _, g in self.pending]
        )
        self.pending.clear()
        if self.shard.fixed:  # padding: rows == the local row count (absent), with zero gradients
            rows, grad_rows = self.shard.reduce_grads_fixed(*self.shard.merge_rows(ids, grads))
            written = rows.clamp(max=self.weight.shape[0] - 1)  # adds the padding's zeros to a real row
            self.add_dense_grad(written, grad_rows.to(self.weight.dtype), touched=rows)
            return
        rows, grad_rows = self.shard.reduce_grads(*sum_rows(ids, grads))  # micro-batches may share rows
        self.add_dense_grad(rows, grad_rows.to(self.weight.dtype), touched=rows)

    def touched_rows(self) -> RowSet | None:
        """The rows of the dense gradient written since the last zeroing, as a RowSet
        (no host sync); the micro-batches' ids are merged once and kept for the next
        caller (clipping, then lazy Adam, then zeroing)."""
        if self._touched_rows is None and self.touched:
            self._touched_rows = RowSet.of(torch.cat(self.touched), self.weight.shape[0])
        return self._touched_rows

    def zero_touched_grad(self) -> None:
        """Zero the rows written since the last call, keeping the buffer."""
        if self.touched and self.weight.grad is not None:
            self.weight.grad.index_fill_(0, self.touched_rows().ids, 0)  # padding zeroes its row again
        self.touched.clear()
        self._touched_rows = None


# Not traced by torch.compile, like ValueTable.forward.
@torch.compiler.disable
def fast_mix(mix: Callable, v, gates, slots: Slots, gate_g0: bool) -> torch.Tensor:
    """mix(v, slots, gates, gate_g0) on the fast path: gradients via the MixRecord."""
    return _FastMix.apply(mix, v, gates, slots.values, slots.carrier, slots.record, gate_g0)
