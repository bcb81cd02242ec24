"""Sharded checkpoints of a torchrun job, through torch.distributed.checkpoint (DCP).

A job whose value-memory tables are row-sharded writes its checkpoints this way: no
rank ever gathers a table. checkpoints/step_N/ then holds
    config.json         the header of every move checkpoint (checkpoint.py), with
                        "layout": "dcp" and a SHA-256 of every file below
    dcp/.metadata       DCP's index: every tensor's global shape and where its pieces are
    dcp/__R_0.distcp    what rank R wrote: its rows of every sharded table and of their
                        optimiser moments, and its share of the replicated state
                        (DCP writes each replicated tensor once)
    train_state.pt      step, data position, RNG, losses, timing (rank 0; tensors and
                        plain data only)
    tokenizer.json, ... what using the checkpoint needs (as in one process)
State keys are names, not positions: "model.<state-dict key>" for weights and
"optim.<parameter name>.<state name>" for optimiser state (Adam moments, Muon's
momentum, step counts), so a checkpoint survives a change of optimiser grouping.

Loading reshards to any number of processes: each rank asks DCP for its own rows of
every table (a sharded table is a DTensor with Shard(0) placement, which is exactly
RowShard's layout: ceil(rows / N) contiguous rows per rank), and DCP reads the pieces
that overlap them, one stored piece at a time. One process reads everything (plain
tensors). `move consolidate` turns a sharded checkpoint into the single-file layout
that sample, eval and export-hf read, filling the output file piece by piece.

Atomic like a one-process checkpoint: every rank writes into one temporary sibling
directory, rank 0 writes the header last (after DCP has collected every rank's
writes) and renames the directory into place; a crash at any point leaves no
directory with a checkpoint's name.
"""

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from move.errors import CheckpointError
from move.training import distributed
from move.training.checkpoint import (
    DCP_DIR,
    SHARDED_LAYOUT,
    TRAIN_STATE,
    WEIGHTS,
    first_non_finite,
    fsync_dir,
    is_sharded,
    load_train_state,
    put_in_place,
    read_header,
    stored_tensors,
    streamed_sha256,
    verify_files,
    write_header,
    write_synced,
)
from move.training.optim import split_state_key


# ---------------------------------------------------------------------------- the state, by name
def _as_dtensor(table, local: torch.Tensor) -> DTensor:
    """A rank's rows of a table-shaped tensor as the global tensor DCP sees."""
    shard = table.shard
    group = shard.group if shard.group is not None else dist.group.WORLD
    mesh = DeviceMesh.from_group(group, local.device.type)
    shape = torch.Size((shard.num_rows, *local.shape[1:]))
    return DTensor.from_local(
        local, mesh, [Shard(0)], run_check=False, shape=shape, stride=torch.empty(shape, device="meta").stride()
    )


def _is_row_state(table, value) -> bool:
    """Optimiser state shaped like the table's rows (moments), not a scalar step."""
    return table is not None and torch.is_tensor(value) and value.dim() == table.weight.dim()


def live_state(model, optimizers) -> dict:
    """The model's and optimisers' state under their names, sharing storage with them
    (sharded tables and their moments as DTensors): what a save writes, and what a
    load fills in place (the model's part)."""
    tables = distributed.sharded_tables(model)
    state = {
        f"model.{k}": (_as_dtensor(tables[k], v.detach()) if k in tables else v.detach())
        for k, v in model.state_dict().items()
    }
    if optimizers is not None:
        params = dict(model.named_parameters())
        by_param = {id(t.weight): t for t in tables.values()}
        for key, value in optimizers.named_state().items():
            table = by_param.get(id(params[split_state_key(key)[0]]))
            state[key] = _as_dtensor(table, value) if _is_row_state(table, value) else value
    return state


# ---------------------------------------------------------------------------- save
def save_sharded_checkpoint(
    path, model, optimizers, meta: dict, train_state: dict, extra_files: dict[str, bytes] | None = None
) -> Path | None:
    """Write checkpoint directory `path` from every rank (collective); -> path on rank 0."""
    path = Path(path)
    s = distributed.current()
    state = live_state(model, optimizers)
    bad = first_non_finite(
        {k: v.to_local() if isinstance(v, DTensor) else v for k, v in state.items() if torch.is_tensor(v)}
    )
    if distributed.all_reduce_sum([float(bad is not None)], next(model.parameters()).device)[0]:
        raise CheckpointError(f"refusing to write {path}: non-finite values ({bad or 'on another rank'})")
    tmp = path.parent / f".{path.name}.tmp-sharded"
    if s.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / DCP_DIR).mkdir(parents=True)
    distributed.barrier()
    try:
        dcp.save(state, checkpoint_id=tmp / DCP_DIR)  # returns once every rank's files are written
        distributed.maybe_inject_fault(meta.get("step", -1), "save")
        if s.is_main:
            buffer = io.BytesIO()
            torch.save(train_state, buffer)
            files = {TRAIN_STATE: buffer.getvalue(), **(extra_files or {})}
            for name, data in files.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                write_synced(tmp / name, data)
            checksums = {
                f.relative_to(tmp).as_posix(): streamed_sha256(f) for f in sorted(tmp.rglob("*")) if f.is_file()
            }
            write_header(
                tmp, model.kind, model.config.to_dict(), meta, checksums, layout=SHARDED_LAYOUT, world_size=s.world_size
            )
            fsync_dir(tmp / DCP_DIR)
            put_in_place(tmp, path)
    except OSError as e:
        if s.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"{path}: could not write the checkpoint ({e.strerror or e}); earlier checkpoints are intact"
        ) from None
    distributed.barrier()  # no rank goes on (or rotates checkpoints away) before it exists
    return path if s.is_main else None


# ---------------------------------------------------------------------------- load
def check_sharded_compatible(model, path: Path, stored: dict) -> None:
    """Refuse, naming the first mismatch, a checkpoint whose weights do not fit `model`."""
    own = {f"model.{k}": v.shape for k, v in model.state_dict().items()}
    for key, table in distributed.sharded_tables(model).items():
        own[f"model.{key}"] = torch.Size((table.shard.num_rows, *table.weight.shape[1:]))
    theirs = {k: v.size for k, v in stored.items() if k.startswith("model.")}
    for key in sorted(set(own) | set(theirs)):
        if own.get(key) != theirs.get(key):
            raise CheckpointError(
                f"{path}: {key[len('model.') :]} is {theirs.get(key)} in the checkpoint, {own.get(key)} in the model"
            )


def load_sharded_checkpoint(path, model, optimizers) -> dict:
    """Fill the model and optimisers from a sharded checkpoint, this rank's rows only
    (collective under torchrun); -> the train state. Verified first (on rank 0, the
    verdict shared), so a checkpoint that does not verify changes nothing."""
    path = Path(path)
    s = distributed.current()
    header = read_header(path)
    problem = ""
    if s.is_main:
        try:
            verify_files(path, header)
        except CheckpointError as e:
            problem = str(e)
    problems = [problem]
    if s.active:
        dist.broadcast_object_list(problems, src=0)
    if problems[0]:
        raise CheckpointError(problems[0])
    stored = stored_tensors(path)
    check_sharded_compatible(model, path, stored)
    state = live_state(model, None)
    everything = FileSystemReader(path / DCP_DIR).read_metadata().state_dict_metadata
    targets = _optimizer_targets(model, everything)
    state.update(targets)
    dcp.load(state, checkpoint_id=path / DCP_DIR, no_dist=not s.active)
    optimizers.load_named_state(
        {k: state[k].to_local() if isinstance(state[k], DTensor) else state[k] for k in targets}
    )
    return load_train_state(path)


def _optimizer_targets(model, stored: dict) -> dict:
    """{state key: what DCP loads it into} for every optimiser entry the checkpoint
    holds: tensors shaped as this rank holds them (a table's moments: its rows);
    plain values (a step count kept as a number) get a placeholder DCP replaces."""
    params = dict(model.named_parameters())
    by_param = {id(t.weight): t for t in distributed.sharded_tables(model).values()}
    targets = {}
    for key, meta in stored.items():
        if not key.startswith("optim."):
            continue
        name = split_state_key(key)[0]
        if name not in params:
            raise CheckpointError(f"optimiser state for {name!r}, which this model does not have")
        p, table = params[name], by_param.get(id(params[name]))
        if not isinstance(meta, TensorStorageMetadata):
            targets[key] = 0
        elif table is not None and len(meta.size) == p.dim():  # a table's moments: this rank's rows
            local = torch.zeros(
                (table.shard.stop - table.shard.start, *meta.size[1:]), dtype=meta.properties.dtype, device=p.device
            )
            targets[key] = _as_dtensor(table, local)
        else:
            targets[key] = torch.zeros(meta.size, dtype=meta.properties.dtype)
    return targets


# ---------------------------------------------------------------------------- consolidate
SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def consolidate(src, out) -> Path:
    """A sharded checkpoint as a one-file checkpoint (weights, header, extra files; no
    training state), written without holding the model in memory: the output file is
    laid out from DCP's index and memory-mapped, and DCP fills each tensor in place, one
    stored piece at a time. safetensors has no streaming writer, hence the header here
    (its published format: 8-byte little-endian length, JSON, then the raw bytes)."""
    src, out = Path(src), Path(out)
    header = read_header(src)
    if not is_sharded(header):
        raise CheckpointError(f"{src}: already a one-file checkpoint (nothing to consolidate)")
    verify_files(src, header)
    stored = {k[len("model.") :]: v for k, v in stored_tensors(src).items() if k.startswith("model.")}
    # widest elements first, so every tensor starts aligned to its element size
    stored = dict(sorted(stored.items(), key=lambda kv: (-kv[1].properties.dtype.itemsize, kv[0])))
    layout, offset = {}, 0
    for name, meta in stored.items():
        if meta.properties.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{src}: {name} has dtype {meta.properties.dtype}, which safetensors cannot hold")
        size = int(np.prod(meta.size)) * meta.properties.dtype.itemsize
        layout[name] = {
            "dtype": SAFETENSORS_DTYPES[meta.properties.dtype],
            "shape": list(meta.size),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    table = json.dumps(layout, separators=(",", ":")).encode()
    table += b" " * (-len(table) % 8)  # the data starts 8-byte aligned
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weights = tmp / WEIGHTS
        with open(weights, "wb") as f:
            f.write(len(table).to_bytes(8, "little") + table)
            f.truncate(8 + len(table) + offset)
        data = np.memmap(weights, dtype=np.uint8, mode="r+", offset=8 + len(table), shape=(max(offset, 1),))
        for name, meta in stored.items():
            begin, end = layout[name]["data_offsets"]
            target = torch.from_numpy(data[begin:end]).view(meta.properties.dtype).view(meta.size)
            dcp.load({f"model.{name}": target}, checkpoint_id=src / DCP_DIR, no_dist=True)
        data.flush()
        del data
        extra = [n for n in header["sha256"] if n != TRAIN_STATE and not n.startswith(f"{DCP_DIR}/")]
        for name in extra:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, tmp / name)
        write_header(
            tmp,
            header["model_kind"],
            header["model_config"],
            {**header.get("meta", {}), "consolidated_from": str(src)},
            {n: streamed_sha256(tmp / n) for n in [WEIGHTS, *extra]},
        )
        put_in_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
