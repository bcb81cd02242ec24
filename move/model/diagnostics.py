"""What value memory is doing: gate statistics per layer and head, how much the
memory changes the values, whether a row's slots have specialised, which bank rows
a batch touches, and how large the rows are. Used for training-time diagnostics
(logged next to the metrics) and by `move gates`."""

import torch

from move.config import OTHER_MEMORY_DESIGNS
from move.device import evaluating
from move.model.memory_designs import bigram_hash, previous_tokens
from move.model.value_memory import LayerValueMemory


@torch.no_grad()
def _layer_records(model, idx: torch.Tensor) -> dict[int, tuple[torch.Tensor, float]]:
    """{layer: (gates (B, T, H, S + g0), memory share)} of one forward on idx.
    The memory share is ||v' - v|| / ||v||: how far value memory (and g0) moved the
    layer's values, 0 for a layer whose memory is silent."""
    records = {}

    def record(module, args, out, layer):
        v, gate_logits = args[0].float(), args[1]
        share = ((out.float() - v).norm() / v.norm().clamp_min(1e-12)).item()
        records[layer] = (module.gate_values(gate_logits).float().cpu(), share)

    hooks = [
        module.register_forward_hook(lambda m, a, o, layer=layer: record(m, a, o, layer))
        for layer, block in enumerate(model.blocks)
        for module in block.modules()
        if isinstance(module, LayerValueMemory)
    ]
    try:
        with evaluating(model):
            model(idx)
    finally:
        for h in hooks:
            h.remove()
    return records


def collect_gates(model, idx: torch.Tensor) -> dict[int, torch.Tensor]:
    """{layer: gates (B, T, H, S + g0)} of one forward on idx: g0 first when the
    layer gates the standard value, then one gate per memory slot."""
    return {layer: gates for layer, (gates, _) in _layer_records(model, idx).items()}


def slot_cosine(rows: torch.Tensor) -> float:
    """Mean cosine similarity between the distinct slots of one row and head, over
    rows (N, H, S, D) with S >= 2: ~0 for independent random slots, 1 when every
    slot of a row points the same way (slots that never specialised)."""
    unit = torch.nn.functional.normalize(rows.float(), dim=-1)
    gram = unit @ unit.transpose(-1, -2)  # (N, H, S, S)
    slots = rows.shape[2]
    off_diagonal = gram.sum((-1, -2)) - gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    return (off_diagonal / (slots * (slots - 1))).mean().item()


@torch.no_grad()
def value_memory_diagnostics(model, idx: torch.Tensor) -> dict[str, float]:
    """Flat scalars: per layer the mean and spread of g0 and of the slot gates, the
    spread of the gates across the slots of one position and head (0 while the
    slots are interchangeable), and the memory share ||v' - v|| / ||v||; the
    fraction of table rows the batch touches; the norms of those rows; and, for
    tables with several slots per row, the mean slot-to-slot cosine of those rows.
    The other memory designs report their own (design_diagnostics)."""
    if model.config.value_memory in OTHER_MEMORY_DESIGNS:
        return design_diagnostics(model, idx)
    if not model.value_tables():
        return {}
    out = {}
    shares = []
    for layer, (g, share) in _layer_records(model, idx).items():
        slots = g[..., 1:] if model.config.gate_g0 else g
        if model.config.gate_g0:
            out[f"vm/layer{layer}/g0_mean"] = g[..., 0].mean().item()
            out[f"vm/layer{layer}/g0_std"] = g[..., 0].std().item()
        out[f"vm/layer{layer}/slot_gate_mean"] = slots.mean().item()
        out[f"vm/layer{layer}/slot_gate_std"] = slots.std().item()
        if slots.shape[-1] > 1:
            out[f"vm/layer{layer}/gate_spread_across_slots"] = slots.std(-1).mean().item()
        out[f"vm/layer{layer}/memory_share"] = share
        shares.append(share)
    out["vm/memory_share_mean"] = sum(shares) / len(shares)
    touched = torch.unique(idx)
    out["vm/rows_touched_frac"] = touched.numel() / model.config.vocab_size
    rows = [t.gather(touched.to(t.weight.device)) for t in model.value_tables()]
    out.update(row_norms(rows))
    multi_slot = [r for r in rows if r.shape[2] > 1]
    if multi_slot:
        out["vm/slot_cosine"] = sum(slot_cosine(r) for r in multi_slot) / len(multi_slot)
    return out


def row_norms(rows: list[torch.Tensor]) -> dict[str, float]:
    norms = torch.cat([r.float().flatten(1).norm(dim=1).cpu() for r in rows])
    return {"vm/row_norm_mean": norms.mean().item(), "vm/row_norm_max": norms.max().item()}


@torch.no_grad()
def design_diagnostics(model, idx: torch.Tensor) -> dict[str, float]:
    """The other memory designs: their learned mixing weights per layer (bigram
    scales, value-residual a and b) and, for the tables, the fraction of rows the
    batch reads (product keys: the paper's "memory usage") and those rows' norms."""
    c, out = model.config, {}
    if c.value_memory == "value_residual":
        for layer, block in enumerate(model.blocks[1:], 1):
            a, b = block.attn.value_residual.lambdas.tolist()
            out[f"vm/layer{layer}/own_values_weight"] = a
            out[f"vm/layer{layer}/first_values_weight"] = b
        return out
    if c.value_memory == "bigram":
        for layer, scale in enumerate(model.bigram.scales.tolist()):
            out[f"vm/layer{layer}/bigram_scale"] = scale
        table = model.bigram.table
        read = bigram_hash(idx, previous_tokens(idx), c.bigram_rows).unique()
    else:  # pkm: the rows its heads pick for the batch's inputs at its layer
        memory = model.blocks[c.pkm_layer].mlp
        inputs = []
        hook = memory.register_forward_hook(lambda m, args, o: inputs.append(args[0]))
        try:
            with evaluating(model):
                model(idx)
        finally:
            hook.remove()
        table = memory.table
        read = memory.address(inputs[0])[0].unique()
    all_rows = table.shard.num_rows if table.shard is not None else table.weight.shape[0]
    out["vm/rows_touched_frac"] = read.numel() / all_rows
    out.update(row_norms([table.gather(read.to(table.weight.device))]))
    return out
