"""Optimisers and the learning-rate schedule (nanochat's recipe).

- Muon (torch.optim.Muon; on CPU its Newton-Schulz runs in fp32: move/training/muon.py)
  for every 2-D transformer matrix, routers included;
  or AdamW for them with --optimizer adamw.
- AdamW for the token embedding, the lm_head and value memory (MoVE bank, LaVE
  tables, the other designs' bigram and product-key tables), each with its own
  learning rate, and for the other designs' scalars and product sub-keys. Value memory is optimised like an
  embedding, as the paper does. AdamW rates are scaled by (d_model/768)^-0.5 so
  one setting transfers across widths; fused AdamW avoids the slow foreach path
  over big tables.
- Value memory has two optimiser modes, both fed by the fast path's persistent
  gradient buffer. "exact": AdamW over the whole table (identical to dense AdamW).
  "lazy": RowAdam (move/training/row_adam.py) - only the rows a step touched are
  updated, and the moments of untouched rows do not decay (SparseAdam's semantics,
  different from AdamW, much cheaper for big banks; no weight decay).
- Moments of value memory are fp32 for a bf16 bank (--value-memory-dtype bfloat16):
  RowAdam in lazy mode, TableAdamW in exact mode.
- The image tokenizer and classifier (conv nets) use plain AdamW at lr_adamw_matrix.
- A model with a build_optimizers(oc) method builds its own (a retrofitted pretrained
  model: its bank, LoRA and dense weights have rates of their own).
- Schedule: linear warmup, constant, linear warmdown to zero over the last
  `warmdown_frac` of the steps.
"""

import torch

from move.config import OptimConfig
from move.errors import CheckpointError, ConfigError
from move.model.accounting import param_group
from move.model.gpt import GPT
from move.model.value_tables import RowSet
from move.training.distributed import all_reduce_, current, local_optimizer_state, shard_value_memory, sharded_tables
from move.training.muon import Muon
from move.training.row_adam import RowAdam
from move.training.table_adamw import TableAdamW


def build_optimizers(model, oc: OptimConfig) -> list[torch.optim.Optimizer]:
    """Every optimiser of `model`, each group's rate also kept as initial_lr (what the
    schedule multiplies)."""
    optimizers = model_optimizers(model, oc)
    for opt in optimizers:
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
    return optimizers


def model_optimizers(model, oc: OptimConfig) -> list[torch.optim.Optimizer]:
    # a model that says how its own parts train: a retrofitted pretrained model (bank,
    # routers, LoRA and dense weights, each at its rate: move/export/retrofit_trainable.py)
    if hasattr(model, "build_optimizers"):
        return model.build_optimizers(oc)
    if not isinstance(model, GPT):  # the small conv nets of the image pipeline: plain AdamW
        return [
            torch.optim.AdamW(
                model.parameters(), lr=oc.lr_adamw_matrix, betas=(0.9, 0.95), weight_decay=oc.weight_decay
            )
        ]
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        groups.setdefault(param_group(name), []).append(p)
    matrices = groups.get("transformer_matrices", []) + groups.get("routers", [])
    scale = (model.config.n_embd / 768) ** -0.5
    slots = model.config.n_slots if oc.value_memory_lr_per_slot else 1
    memory = dict(params=groups.get("value_memory", []), lr=oc.lr_value_memory * scale / max(slots, 1))
    adam_groups = [
        dict(params=groups.get("token_embedding", []), lr=oc.lr_embedding * scale),
        dict(params=groups.get("lm_head", []), lr=oc.lr_lm_head * scale),
        dict(params=groups.get("memory_control", []), lr=oc.lr_memory_control),
    ]
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    optimizers = []
    if oc.value_memory_optimizer == "lazy" and memory["params"]:
        tables = {id(t.weight): t for t in model.value_tables()}
        optimizers.append(RowAdam([memory], tables, lr=memory["lr"], betas=(0.8, 0.95), eps=1e-10))
    elif any(p.dtype == torch.bfloat16 for p in memory["params"]):  # fp32 state for a bf16 bank
        optimizers.append(TableAdamW([memory], lr=memory["lr"], weight_decay=oc.weight_decay))
    else:
        adam_groups.append(memory)
    if oc.optimizer == "muon":
        optimizers.append(Muon(matrices, lr=oc.lr_matrix, momentum=0.95, nesterov=True, weight_decay=oc.weight_decay))
    else:
        adam_groups.append(dict(params=matrices, lr=oc.lr_adamw_matrix))
    adam_groups = [g for g in adam_groups if g["params"]]
    optimizers.append(
        torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=oc.weight_decay, fused=fused)
    )
    return optimizers


def value_memory_grad_mode(path: str, optimizer_mode: str, compiled: bool = False, sharded: bool = False) -> str:
    """The ValueTable gradient mode for a (path, optimiser mode) pair.

    Compiled, the fast path's custom backward and its side channel to the layers'
    mixes are opaque to dynamo: each breaks the graph (a 2-layer MoVE forward: 7
    graphs, head and loss left eager). So with --compile the exact optimiser gets
    the reference gradient (plain indexing, differentiated by autograd inside the
    one compiled graph): the dense table gradient it makes is what exact AdamW reads
    anyway. The lazy optimiser needs the fast path's touched rows, and a row-sharded
    table (torchrun) its row exchange: those keep the fast path and its breaks."""
    if path == "reference":
        if optimizer_mode == "lazy":
            raise ConfigError("the lazy value-memory optimizer needs the fast path")
        return "autograd"
    if path != "fast":
        raise ConfigError(f"unknown value_memory_path {path!r}; choose fast or reference")
    if compiled and optimizer_mode == "exact" and not sharded:
        return "autograd"
    return "dense"  # both optimiser modes read the persistent buffer (lazy: at the touched rows)


def touched_rows(model) -> dict[int, RowSet]:
    """{id(table weight): rows} for fast-path tables whose dense gradient buffer is
    zero outside the rows this step touched."""
    if not isinstance(model, GPT):
        return {}
    return {
        id(t.weight): t.touched_rows()
        for t in model.value_tables()
        if t.grad_mode == "dense" and t.touched and t.weight.grad is not None
    }


@torch.no_grad()
def clip_grad_norm(
    parameters, max_norm: float, rows: dict[int, RowSet] | None = None, sharded: frozenset[int] = frozenset()
) -> torch.Tensor:
    """Global-norm clipping. `rows` (see touched_rows) lets a
    fast-path table's norm and rescaling read only its touched rows instead of the
    whole bank-sized buffer (the result is the same: the other rows are zero).
    `sharded` holds the ids of parameters split across the ranks of a distributed
    job (row-sharded tables): their squares are summed over ranks, the rest are
    replicated. Returns the norm before clipping."""
    rows = rows or {}
    grads = [(id(p), p.grad) for p in parameters if p.grad is not None]
    # a fast-path table's touched rows, read once for the norm and rescaled in place for the copy back;
    # the RowSet's padding repeats a row: read again, counted once (RowSet.first)
    touched = {k: g.index_select(0, rows[k].ids) for k, g in grads if k in rows}

    def square(key, g):
        if key not in rows:
            return torch.linalg.vector_norm(g, dtype=torch.float32).square()
        per_row = torch.linalg.vector_norm(touched[key].flatten(1), dim=1, dtype=torch.float32).square()
        return (per_row * rows[key].first).sum()

    squares = [(k, square(k, g)) for k, g in grads]
    square = torch.stack([s for k, s in squares if k not in sharded] or [torch.zeros(())]).sum()
    if sharded:
        square = square + all_reduce_(
            torch.stack([s for k, s in squares if k in sharded] or [square.new_zeros(())]).sum()
        )
    norm = square.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for key, g in grads:
        if key in rows:
            g.index_copy_(0, rows[key].ids, touched[key].mul_(scale.to(g.dtype)))
        else:
            g.mul_(scale.to(g.dtype))
    return norm


def decay_start(total_steps: int, oc: OptimConfig) -> int:
    """The first step of the linear warmdown (total_steps when there is none): steps
    before it run at the full rate, which is where a shorter budget may branch off."""
    return total_steps - round(oc.warmdown_frac * total_steps)


def lr_multiplier(step: int, total_steps: int, oc: OptimConfig) -> float:
    if step < oc.warmup_steps:
        return (step + 1) / oc.warmup_steps
    start = decay_start(total_steps, oc)
    if step >= start < total_steps:
        return (total_steps - step) / (total_steps - start)
    return 1.0


def set_lr(optimizers, multiplier: float) -> None:
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * multiplier


def prepare_for_training(
    model,
    value_memory_path: str = "fast",
    value_memory_optimizer: str = "exact",
    value_memory_dtype: str = "float32",
    compiled: bool = False,
    row_exchange: str = "sized",
) -> None:
    """Set how a GPT's value memory is stored and differentiated, and, under torchrun,
    keep only this rank's rows of every table. Call once, before building Optimizers;
    models without value memory (the image conv nets) need nothing."""
    if not isinstance(model, GPT):
        return
    model.set_value_memory_dtype(getattr(torch, value_memory_dtype))
    mode = value_memory_grad_mode(value_memory_path, value_memory_optimizer, compiled, current().active)
    model.set_value_memory_grad_mode(mode)
    if current().active:
        shard_value_memory(model, row_exchange)


def split_state_key(key: str) -> tuple[str, str]:
    """ "optim.<parameter name>.<entry>" (Optimizers.named_state) -> (name, entry)."""
    name, _, entry = key[len("optim.") :].rpartition(".")
    return name, entry


class Optimizers:
    """Every optimiser of a model behind one object, and the one order in which a
    step must run with the fast value-memory path:

        backward(s) -> reduce_shard_grads (sharded tables: row gradients to their owners)
                    -> clip (global norm; dense tables read only their touched rows)
                    -> step (every optimiser) and zero_grad (touched rows only)

    The Trainer and both benchmarks step through this class, so the protocol exists
    once. named_state / load_named_state hold every optimiser's state by parameter
    name, the layout of every checkpoint (loaded by N processes: each keeps its rows)."""

    def __init__(self, model, config: OptimConfig):
        self.model, self.config = model, config
        self.optimizers = build_optimizers(model, config)
        self.sharded_tables = list(sharded_tables(model).values())

    def set_lr(self, multiplier: float) -> None:
        set_lr(self.optimizers, multiplier)

    def reduce_shard_grads(self) -> None:
        for table in self.sharded_tables:
            table.reduce_shard_grads()

    def clip(self, max_norm: float | None = None) -> torch.Tensor:
        """Clip to max_norm (default: the config's grad_clip; 0 = only measure);
        -> the global gradient norm before clipping."""
        max_norm = self.config.grad_clip if max_norm is None else max_norm
        return clip_grad_norm(
            list(self.model.parameters()),
            max_norm or float("inf"),
            touched_rows(self.model),
            frozenset(id(t.weight) for t in self.sharded_tables),
        )

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)

    def named_state(self) -> dict:
        """{"optim.<parameter name>.<entry>": value}: every optimiser's per-parameter
        state (moments, momentum, step counts) under names, as checkpoints store it; a
        sharded table's entries are this rank's rows (the live tensors, not copies)."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        return {
            f"optim.{names[id(p)]}.{entry}": value
            for opt in self.optimizers
            for p, entries in opt.state.items()
            for entry, value in entries.items()
        }

    def load_named_state(self, named: dict) -> None:
        """Load named_state's layout through each optimiser's own load_state_dict (which
        places every value on its parameter's device and dtype as that optimiser
        expects). Entries shaped like a whole sharded table (a checkpoint written by
        one process) are cut to this rank's rows."""
        params = dict(self.model.named_parameters())
        tables = {id(t.weight): t for t in self.sharded_tables}
        owners = {id(p): opt for opt in self.optimizers for group in opt.param_groups for p in group["params"]}
        entries: dict[int, dict] = {}
        for key, value in named.items():
            name, entry = split_state_key(key)
            if name not in params or id(params[name]) not in owners:
                raise CheckpointError(f"optimiser state for {name!r}, which this model does not train")
            p, table = params[name], tables.get(id(params[name]))
            if (
                table is not None
                and torch.is_tensor(value)
                and value.dim() == p.dim()
                and value.shape[0] == table.shard.num_rows
            ):
                value = value[table.shard.start : table.shard.stop]
            entries.setdefault(id(p), {})[entry] = value
        for opt in self.optimizers:
            state = opt.state_dict()
            order = [p for group in opt.param_groups for p in group["params"]]
            state["state"] = {i: entries[id(p)] for i, p in enumerate(order) if id(p) in entries}
            opt.load_state_dict(state)

    def load_state_dicts(self, states: list) -> None:
        """Load position-indexed optimiser state dicts, as one-process checkpoints of
        format version 2 stored them (read for compatibility); under torchrun each rank
        keeps the rows of its table shards."""
        local = [local_optimizer_state(opt, self.model, s) for opt, s in zip(self.optimizers, states)]
        for opt, state in zip(self.optimizers, local):
            opt.load_state_dict(state)

    def state_tensors(self) -> list[torch.Tensor]:
        """The optimisers' persistent tensors (moments, momentum buffers)."""
        return [
            v
            for opt in self.optimizers
            for state in opt.state.values()
            for v in state.values()
            if torch.is_tensor(v) and v.dim() > 0
        ]
