"""What value memory is doing: gate statistics per layer and head, which bank
rows a batch touches, and how large the rows are. Used for training-time
diagnostics (logged next to the metrics) and by `move gates`."""

import torch

from move.device import evaluating
from move.model.value_memory import LayerValueMemory


@torch.no_grad()
def collect_gates(model, idx: torch.Tensor) -> dict[int, torch.Tensor]:
    """{layer: gates (B, T, H, S + g0)} of one forward on idx: g0 first when the
    layer gates the standard value, then one gate per memory slot."""
    gates, hooks = {}, []
    for layer, block in enumerate(model.blocks):
        for module in block.modules():
            if isinstance(module, LayerValueMemory):
                hooks.append(module.register_forward_hook(
                    lambda m, args, out, layer=layer: gates.__setitem__(layer, m.gates(args[0]).float().cpu())))
    try:
        with evaluating(model):
            model(idx, check_ids=False)
    finally:
        for h in hooks:
            h.remove()
    return gates


@torch.no_grad()
def value_memory_diagnostics(model, idx: torch.Tensor) -> dict[str, float]:
    """Flat scalars: per layer the mean and spread of g0 and of the slot gates;
    the fraction of table rows the batch touches; the norms of those rows."""
    if not model.value_tables():
        return {}
    out = {}
    for layer, g in collect_gates(model, idx).items():
        slots = g[..., 1:] if model.config.gate_g0 else g
        if model.config.gate_g0:
            out[f"vm/layer{layer}/g0_mean"] = g[..., 0].mean().item()
            out[f"vm/layer{layer}/g0_std"] = g[..., 0].std().item()
        out[f"vm/layer{layer}/slot_gate_mean"] = slots.mean().item()
        out[f"vm/layer{layer}/slot_gate_std"] = slots.std().item()
    touched = torch.unique(idx)
    out["vm/rows_touched_frac"] = touched.numel() / model.config.vocab_size
    norms = torch.cat([t.gather(touched.to(t.weight.device)).float().flatten(1).norm(dim=1).cpu()
                       for t in model.value_tables()])
    out["vm/row_norm_mean"] = norms.mean().item()
    out["vm/row_norm_max"] = norms.max().item()
    return out
