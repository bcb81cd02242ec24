"""Start a model from a trained checkpoint and add value memory to it
(`move train --init-from`).

The new model takes every tensor the source has, by name; what it adds starts so
that it computes exactly the source's function:
  - new value-memory tables (a MoVE bank, LaVE tables) at zero, so the memory adds
    nothing (MoVE: v' = g0 * v + sum_i g_i * 0 with g0 = 2*sigmoid(0) = 1);
  - new routers at zero (every gate exactly 1);
  - a denser MoVE bank (x1 -> x4) keeps the source's slots as its first ones, and each
    router keeps the source's gate rows (g0 and the old slots) per head; the new slots
    are zero, so their gates multiply nothing.
With init_new_memory = "random" the new tables get the model's own initialisation
instead (the function then changes from the first step).
Everything else about the source must match: width, depth, heads, vocabulary,
attention kind, context. The optimiser state is not taken: training starts fresh.
"""

from dataclasses import fields

import torch

from move.config import ModelConfig
from move.errors import ConfigError
from move.model.gpt import GPT
from move.model.value_tables import ValueTable

# what may differ between the source and the new model: the memory and how it starts
MEMORY_FIELDS = {
    "value_memory",
    "memory_density",
    "memory_slots",
    "move_gate_g0",
    "lave_full_gates",
    "router_init_scale",
    "memory_init_scale",
    "slot_dropout",
    "layer_start_bias",
    "slot_gate_channels",
}
ADDS_MEMORY_TO = ("standard", "lave", "move")  # kinds whose added parts can start as the identity
NEW_MEMORY_INITS = ("zero", "random")


def check_compatible(source: ModelConfig, target: ModelConfig, where: str) -> None:
    """Refuse, in one line naming the difference, a source the target cannot grow from."""
    for f in fields(ModelConfig):
        if f.name not in MEMORY_FIELDS and getattr(source, f.name) != getattr(target, f.name):
            raise ConfigError(
                f"{where}: {f.name} is {getattr(source, f.name)!r} there and {getattr(target, f.name)!r} here; "
                "--init-from keeps everything but the value memory"
            )
    for kind, role in ((source.value_memory, "source"), (target.value_memory, "new model")):
        if kind not in ADDS_MEMORY_TO:
            raise ConfigError(f"{where}: --init-from grows standard, LaVE or MoVE models; the {role} is {kind}")
    if source.value_memory == "move" and target.value_memory == "move" and target.n_slots < source.n_slots:
        raise ConfigError(f"{where}: the source has {source.n_slots} MoVE slots, the new model only {target.n_slots}")
    if source.value_memory == "lave" and target.value_memory == "lave" and target.n_slots < source.n_slots:
        raise ConfigError(f"{where}: the source has {source.n_slots} LaVE tables a layer, the new model fewer")
    if source.gate_g0 and not target.gate_g0 and target.value_memory == source.value_memory:
        raise ConfigError(f"{where}: the source gates its standard values (g0); the new model would drop the gate")


@torch.no_grad()
def initialise_from(model: GPT, source: GPT, init_new_memory: str, where: str) -> dict:
    """Copy source's tensors into model (which was built and initialised as usual) and
    start what it adds as described above. -> counts of copied and new tensors."""
    if init_new_memory not in NEW_MEMORY_INITS:
        raise ConfigError(f"init_new_memory must be one of {', '.join(NEW_MEMORY_INITS)}, got {init_new_memory!r}")
    check_compatible(source.config, model.config, where)
    theirs = source.state_dict()
    mine = dict(model.named_parameters())
    dropped = sorted(set(theirs) - set(model.state_dict()))
    if dropped:
        raise ConfigError(f"{where}: the new model has no place for {len(dropped)} source tensor(s): {dropped[0]}, ...")
    tables = {f"{name}.weight": t for name, t in model.named_modules() if isinstance(t, ValueTable)}
    for name, param in mine.items():
        if name in tables:
            copy_table(param, theirs.get(name), tables[name], zero_new=init_new_memory == "zero")
        elif name.endswith("router.weight"):
            copy_router(param, theirs.get(name), source.config, model.config)
        elif name.endswith("gate_bias"):
            copy_gate_bias(param, theirs.get(name), source.config, model.config)
        elif name in theirs:
            param.copy_(theirs[name])
    copied = sum(name in theirs for name in mine)
    return {"copied": copied, "new": len(mine) - copied}


def copy_table(param: torch.Tensor, old: torch.Tensor | None, table: ValueTable, zero_new: bool) -> None:
    """A table (rows, heads, slots, width): the source's slots first, the new ones zero
    (or as the model initialised them); a row-sharded table takes its own rows."""
    if zero_new:
        param.zero_()
    if old is None:
        return
    if table.shard is not None:
        old = old[table.shard.start : table.shard.stop]
    param[:, :, : old.shape[2]] = old.to(param.dtype)


def copy_router(param: torch.Tensor, old: torch.Tensor | None, source: ModelConfig, target: ModelConfig) -> None:
    """Router rows are (heads, gates) flattened, gates = [g0,] slot 1..S. A g0 the
    source lacks starts at logit 0 (gate exactly 1); the source's gates of each head
    come next, reading the channels they read; the new slots' rows keep the model's
    initialisation (zero, or random with router_init_scale), as their slots are zero."""
    heads = target.kv_heads
    rows = param.view(heads, param.shape[0] // heads, -1)
    new_g0 = target.gate_g0 and not source.gate_g0
    if new_g0:
        rows[:, 0] = 0
    if old is None:
        return
    first, gates_old = int(new_g0), old.shape[0] // heads
    rows[:, first : first + gates_old] = 0  # channels the source's router did not read (LaVE's narrow router)
    rows[:, first : first + gates_old, : old.shape[1]] = old.view(heads, gates_old, -1)


def copy_gate_bias(param: torch.Tensor, old: torch.Tensor | None, source: ModelConfig, target: ModelConfig) -> None:
    """The layer-assigned start's bias, (heads, gates) flattened as the router's rows.
    The source's gates keep the source's bias, or 0 where it had none (the paper's
    start: no bias is a bias of 0), so the grown model computes the source's function;
    the new slots keep the start's bias (their slots are zero, so it changes nothing yet)."""
    rows = param.view(target.kv_heads, -1)
    first = int(target.gate_g0 and not source.gate_g0)  # a new g0 was started at 0 already
    source_gates = int(source.gate_g0) + (source.n_slots if source.value_memory == "move" else 0)
    if old is None:
        rows[:, first : first + source_gates] = 0
    else:
        rows[:, first : first + source_gates] = old.view(target.kv_heads, source_gates)
