"""Multi-process training on PyTorch's own stack: torchrun + torch.distributed.

    torchrun --nproc_per_node=N -m move train ...

What lives where, with N processes:
- Data: each rank reads its contiguous slice of every global batch (the
  EpochSampler); --batch-size is the global batch, so N processes see exactly
  what one process sees, and the loader state is the same on every rank.
- Dense weights (embedding, transformer matrices, routers, lm_head) are
  replicated; DDP averages their gradients, overlapping the all-reduce with the
  backward. Every rank runs the same optimiser step on the same averaged
  gradients, so replicas stay equal.
- Value-memory tables (the MoVE bank, LaVE's tables) are sharded by rows and
  left out of DDP (move/model/row_shard.py): each rank stores and optimises
  1/N of the rows.
- Gradient clipping uses the global norm: the replicated part is the same on
  every rank, the sharded part is summed across ranks.
- Checkpoints are sharded (move/training/sharded_checkpoint.py, through
  torch.distributed.checkpoint): every rank writes its own rows of every table and
  of their optimiser moments, nothing is gathered, and any number of processes -
  one included - resumes them, each reading its own rows. A checkpoint written by
  one process is read whole by every rank, which keeps its rows (local_state_dict).
- Only rank 0 writes the other files, logs and prints. Every rank takes part in evaluation,
  because a sharded table's forward is collective: bits per byte and image NLL are
  split over the ranks and summed (split_for_ranks); the other evaluations (recall,
  the conv nets' metrics) run the same batches on every rank. Rank 0 records.
- Process groups: gloo on CPU, NCCL on CUDA (one GPU per process, by LOCAL_RANK).
  The tables' traffic has its own group so that it never interleaves with DDP's.
"""

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from move.device import pick_device
from move.errors import CheckpointError, ConfigError

FAULT_ENV = "MOVE_INJECT_FAULT"  # "rank:step[:save]": that rank raises there (tests of failure handling)


@dataclass(frozen=True)
class DistState:
    rank: int = 0
    world_size: int = 1
    memory_group: object = None  # process group for value-memory traffic
    device: torch.device | None = None  # this rank's device (None: one process, pick_device decides)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def current() -> DistState:
    """The job's distributed state (one process: rank 0 of 1)."""
    return _state


_state = DistState()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def distributed_job(requested_device: str = "auto"):
    """Set up the process group when launched by torchrun (a no-op for one
    process) and tear it down on the way out. Yields the device this rank uses."""
    global _state  # noqa: PLW0603 - one process group per process: module state is what torch.distributed keeps too
    device = pick_device(requested_device)
    if not launched_by_torchrun():
        yield device
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=float(os.environ.get("MOVE_DIST_TIMEOUT_S", "600")))
    dist.init_process_group(backend, timeout=timeout)
    _state = DistState(rank, world_size, dist.new_group(backend=backend), device)
    try:
        yield device
    finally:
        _state = DistState()
        dist.destroy_process_group()


def job_device(requested: str = "auto") -> torch.device:
    """Where this process trains: under torchrun the rank's own device (so that
    --device cuda:0 cannot put every rank on one GPU), else pick_device(requested)."""
    return current().device or pick_device(requested)


def per_rank_batch(batch_size: int) -> int:
    world = current().world_size
    if batch_size % world:
        raise ConfigError(f"batch_size {batch_size} is the global batch and must divide evenly over {world} processes")
    return batch_size // world


def shard_value_memory(model, exchange: str = "sized") -> None:
    """Row-shard every value-memory table of a GPT across the job's ranks; exchange:
    sized or fixed (move/model/row_shard.py)."""
    s = current()
    for table in model.value_tables():
        if table.weight.shape[0] < s.world_size:
            raise ConfigError(f"a table of {table.weight.shape[0]} rows cannot be sharded over {s.world_size} ranks")
        table.shard_rows(s.rank, s.world_size, s.memory_group, exchange)


def sharded_tables(model) -> dict[str, object]:
    """{state-dict key of the weight: table} for the model's sharded tables."""
    tables = model.value_tables() if hasattr(model, "value_tables") else []
    by_module = {id(t): t for t in tables if t.shard is not None}
    return {f"{name}.weight": by_module[id(m)] for name, m in model.named_modules() if id(m) in by_module}


def wrap_ddp(model, device: torch.device) -> nn.Module:
    """DDP over the dense weights; sharded tables are left out (they sync their rows
    themselves). No buffer syncing per forward: the only buffers are rotary tables
    that every rank computes the same way."""
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(sharded_tables(model)))
    return DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None, forward_sync_buffers=False
    )


def split_for_ranks(items: list) -> list[tuple[object, bool]]:
    """This rank's share of a list of evaluation batches, as (item, counts) pairs:
    every world_size-th item from this rank's index on, padded with (items[0], False)
    so that every rank runs the same number of forwards (a sharded table's forward is
    collective); the caller drops what a padding item computes and sums the rest
    over ranks (all_reduce_sum). One process gets every item."""
    s = current()
    if not items:
        return []
    rounds = -(-len(items) // s.world_size)
    return [
        (items[i], True) if i < len(items) else (items[0], False)
        for i in range(s.rank, rounds * s.world_size, s.world_size)
    ]


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the job's ranks, in place (nothing to do in one process)."""
    if current().active:
        dist.all_reduce(tensor)
    return tensor


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Python numbers summed over the ranks (in float64)."""
    return all_reduce_(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def barrier() -> None:
    if current().active:
        dist.barrier()


# ---------------------------------------------------------------------------- one-process checkpoints, N processes
def _slice_rows(table, full: torch.Tensor, what: str) -> torch.Tensor:
    if full.shape[0] != table.shard.num_rows:
        raise CheckpointError(f"{what}: the checkpoint has {full.shape[0]} rows, the model {table.shard.num_rows}")
    return full[table.shard.start : table.shard.stop].clone()


def local_state_dict(model, full: dict) -> dict:
    """This rank's part of an unsharded state dict."""
    local = dict(full)
    for key, table in sharded_tables(model).items():
        if key in local:
            local[key] = _slice_rows(table, local[key], key)
    return local


def _table_states(optimizer, model):
    """(index in the optimizer's state dict, table) of the sharded tables it holds."""
    tables = {id(t.weight): t for t in sharded_tables(model).values()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return [(i, tables[id(p)]) for i, p in enumerate(params) if id(p) in tables]


def _map_row_states(optimizer, model, state: dict, fn) -> dict:
    """state with fn(table, tensor) applied to the per-row tensors (those shaped like
    the weight: Adam moments) of the sharded tables' optimiser state; scalars such
    as the step count are the same on every rank and stay as they are."""
    state = {"state": dict(state["state"]), "param_groups": state["param_groups"]}
    for index, table in _table_states(optimizer, model):
        entry = dict(state["state"].get(index, {}))
        for name, value in entry.items():
            if torch.is_tensor(value) and value.dim() == table.weight.dim():
                entry[name] = fn(table, value)
        state["state"][index] = entry
    return state


def local_optimizer_state(optimizer, model, full: dict) -> dict:
    """This rank's part of an unsharded optimizer state dict."""
    return _map_row_states(optimizer, model, full, lambda table, value: _slice_rows(table, value, "optimizer state"))


def maybe_inject_fault(step: int, point: str = "step") -> None:
    """Raise on the rank and step named by MOVE_INJECT_FAULT="rank:step" (in the
    middle of that training step) or "rank:step:save" (while that step's checkpoint
    is being written: after the ranks' data, before the header). Only for testing
    how a job handles a failing process."""
    spec = os.environ.get(FAULT_ENV)
    if spec:
        rank, at, *where = spec.split(":")
        if int(rank) == current().rank and step == int(at) and (where or ["step"])[0] == point:
            raise RuntimeError(f"injected fault on rank {rank} at step {step} ({FAULT_ENV}={spec})")
