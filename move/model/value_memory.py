"""Value memory: token-indexed tables mixed into attention values by learned gates.

Both memory variants reduce to one formula per head h and position t:

    v'_{t,h} = g_{t,h,0} * v_{t,h} + sum_{i=1..S} g_{t,h,i} * m_{t,i,h}

where m_{t,i} are S slots looked up by the token id x_t and g = 2*sigmoid(router)
starts at exactly 1.0 (zero-initialised router). They differ in where the slots
live and what the router sees:

- MoVE: ONE global bank (vocab, H, M, width) shared by every layer and looked up
  once per forward; each layer has a router Linear(d_model -> H*(M+1)) on the full
  normed hidden state. Without g0 (ablation) the standard v is added ungated.
- LaVE (nanochat, Jan 2026): each participating layer owns k tables; a router
  Linear(32 -> H*k) reads only the first 32 channels and there is no g0, so
  v' = v + sum_i g_i * ve_i. The "full gates" ablation gives LaVE MoVE's router.

This file is the mechanism, top to bottom: the formula (mix, and mix_inference, the
same formula in fewer kernels for forwards without autograd) and how each layer gets
its gates and slots (LayerValueMemory). Storage, lookup and the fast path's
gradients live in move/model/value_tables.py.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from move.config import LAVE_GATE_CHANNELS, ModelConfig
from move.model.layers import KVCache
from move.model.value_tables import Slots, ValueTable, fast_mix


@dataclass
class MemoryInputs:
    """What one forward hands every layer's value memory: the token ids, MoVE's bank
    rows gathered once for all layers, and (value residual) the first layer's values,
    which layer 0 sets and the later layers read."""

    idx: torch.Tensor
    bank_slots: Slots | None = None
    first_values: torch.Tensor | None = None


def mix(v, slot_values, gates, gate_g0: bool):
    """The formula: v (B,T,H,D), slot_values (B,T,H,S,D), gates (B,T,H,S+g0) in (0, 2)
    -> g0 * v + sum_i g_i * m_i (or v + sum_i g_i * m_i without a gate g0)."""
    base, slot_gates = (gates[..., :1] * v, gates[..., 1:]) if gate_g0 else (v, gates)
    # (B,T,H,1,S) @ (B,T,H,S,D): the weighted sum over slots as one batched matmul.
    mixed = torch.matmul(slot_gates.unsqueeze(-2).to(slot_values.dtype), slot_values).squeeze(-2)
    return base + mixed.to(v.dtype)


def mix_values(v: torch.Tensor, slots: Slots, gates: torch.Tensor, gate_g0: bool) -> torch.Tensor:
    """The formula applied to looked-up slots. On the fast path (slots carry a
    MixRecord) the same forward runs under a custom backward that feeds the table's
    gradient; otherwise autograd differentiates it directly (the reference path)."""
    if slots.record is not None:
        return fast_mix(mix, v, gates, slots, gate_g0)
    return mix(v, slots.values, gates, gate_g0)


def mix_inference(v, slot_values, gate_logits, gate_g0: bool):
    """The formula in as few kernels as it takes, for forwards without autograd
    (decoding, evaluation): v (B,T,H,D), slot_values (B,T,H,S,D), gate_logits
    (B,T,H,S+g0) -> 2*sigmoid(logits) as weights over [v, m_1..m_S] (with g0) in one
    batched matmul, or v + the weighted slots in one baddbmm (without). Per layer and
    token that is 3-4 kernels instead of mix's ~10 small ops (at batch 1 on a CPU
    each costs as much as its arithmetic); equal to mix up to rounding (tested)."""
    batch, length, heads, slots, width = slot_values.shape
    rows = batch * length * heads
    gates = torch.sigmoid(gate_logits).mul_(2).view(rows, 1, -1).to(v.dtype)
    slot_values = slot_values.to(v.dtype)
    if gate_g0:
        operands = torch.cat([v.unsqueeze(-2), slot_values], dim=-2).view(rows, slots + 1, width)
        return torch.bmm(gates, operands).view(batch, length, heads, width)
    mixed = torch.baddbmm(v.reshape(rows, 1, width), gates, slot_values.reshape(rows, slots, width))
    return mixed.view(batch, length, heads, width)


def gate_values(gate_logits: torch.Tensor) -> torch.Tensor:
    """Gates in (0, 2), exactly 1.0 at a zero logit (the zero-initialised router)."""
    return 2 * torch.sigmoid(gate_logits)


def layer_start_logits(heads: int, slots: int, gate_g0: bool, own_slots: list[int], bias: float) -> torch.Tensor:
    """The layer-assigned start's gate-logit bias, flat as a router's output (heads x
    (g0 + slots)): 0 (gate exactly 1) for g0 and the layer's own slots, -bias (gate
    2*sigmoid(-b)) for every other slot, each head alike."""
    logits = torch.full((heads, slots + int(gate_g0)), -bias)
    first = int(gate_g0)
    logits[:, :first] = 0
    logits[:, [first + m for m in own_slots]] = 0
    return logits.flatten()


def mix_memory(v, gate_logits, slots: Slots, gate_g0: bool, slot_dropout: float = 0.0) -> torch.Tensor:
    """v' from the standard values v (B,T,H,D), the router's gate logits (B,T,H,S+g0)
    and the looked-up slots: the fused form without autograd, the formula (fast path
    or reference) with it. Every model with value memory mixes through here (this
    project's GPT, and a retrofitted Hugging Face model).

    slot_dropout p (training only): each slot's gate is zeroed with probability p per
    token and head and the others scaled by 1/(1-p), so a slot cannot rely on the
    others of its row (g0 is never dropped). The bank's gradient sees the same
    dropped gates, on the fast path as on the reference one."""
    if not torch.is_grad_enabled():
        return mix_inference(v, slots.values, gate_logits, gate_g0)
    gates = gate_values(gate_logits)
    if slot_dropout > 0:
        g0 = int(gate_g0)
        keep = torch.rand_like(gates[..., g0:]) >= slot_dropout
        gates = torch.cat([gates[..., :g0], gates[..., g0:] * keep / (1 - slot_dropout)], dim=-1)
    return mix_values(v, slots, gates, gate_g0)


def plain_linear(module: nn.Module) -> bool:
    """Whether module(x) is exactly F.linear(x, module.weight): an nn.Linear itself,
    without bias and without hooks of its own or global ones."""
    hooks = (
        module._forward_hooks,
        module._forward_pre_hooks,
        nn.modules.module._global_forward_hooks,
        nn.modules.module._global_forward_pre_hooks,
    )
    return type(module) is nn.Linear and module.bias is None and not any(hooks)


class LayerValueMemory(nn.Module):
    """One layer's gates (and, for LaVE, its own tables).

    The router reads the normed block input x, as the layer's value projection does
    (MHA/GQA: c_v; MLA: the latent's down-projection c_kv_down); `project` computes
    both, then forward(v, gate_logits, idx, bank_slots) mixes: v the per-head
    standard values (B,T,H,D) (on MLA+MoVE: the latent split in H chunks), idx the
    token ids, bank_slots MoVE's gathered global bank rows (or None).
    """

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.heads = config.kv_heads
        self.slots = config.n_slots
        self.gate_g0 = config.gate_g0
        self.slot_dropout = config.slot_dropout
        full_width = config.value_memory == "move" or config.lave_full_gates
        self.gate_channels = config.n_embd if full_width else LAVE_GATE_CHANNELS
        self.router = nn.Linear(self.gate_channels, self.heads * (self.slots + int(self.gate_g0)), bias=False)
        # the layer-assigned start: a trained bias on the gate logits (memory_control group)
        self.gate_bias = None
        self.start_bias = config.layer_start_bias
        self.own_slots = config.own_slots(layer)
        if self.start_bias > 0:
            self.gate_bias = nn.Parameter(torch.empty(self.heads * (self.slots + int(self.gate_g0))))
        # the content-reading gate: slot m's logit also gets u_h . m[:k] (memory_control group)
        self.slot_gate = None
        if config.slot_gate_channels:
            self.slot_gate = nn.Parameter(torch.empty(self.heads, config.slot_gate_channels))
        self.table = None
        if config.value_memory == "lave":
            self.table = ValueTable(config.vocab_size, self.heads, self.slots, config.memory_width // self.heads)

    def project(self, x: torch.Tensor, projection: nn.Linear, cache: KVCache | None, layer: int):
        """(projection(x), gate logits (B,T,H,S+g0)). Decoding with a cache, both come
        from one matmul of the two weights stacked once per cache (weights do not
        change while a cache decodes; with autograd on they are always two): a memory
        layer then adds no matmul to a decoding step. Only plain nn.Linear modules are
        stacked: a subclass or a wrapped module (a LoRA adapter, a quantised layer) or
        one with forward hooks computes more than its weight, so it is called."""
        B, T, _ = x.shape
        if cache is None or torch.is_grad_enabled() or not (plain_linear(projection) and plain_linear(self.router)):
            v, logits = projection(x), self.router(x[..., : self.gate_channels])
        else:
            stacked = cache.prepared(layer, "value_and_router", lambda: self.stacked_weight(projection))
            both = F.linear(x, stacked)
            v, logits = both[..., : projection.out_features], both[..., projection.out_features :]
        if self.gate_bias is not None:
            logits = logits + self.gate_bias.to(logits.dtype)
        return v, logits.view(B, T, self.heads, -1)

    @torch.no_grad()
    def start_gate_bias(self) -> None:
        """The layer-assigned start (layer_start_logits) into this layer's gate bias."""
        self.gate_bias.copy_(layer_start_logits(self.heads, self.slots, self.gate_g0, self.own_slots, self.start_bias))

    def stacked_weight(self, projection: nn.Linear) -> torch.Tensor:
        """[projection; router] as one matrix; LaVE's router, which reads only the
        first channels, gets zero columns for the rest."""
        router = F.pad(self.router.weight, (0, projection.in_features - self.gate_channels))
        return torch.cat([projection.weight, router]).detach()

    gate_values = staticmethod(gate_values)

    def forward(self, v, gate_logits, idx, bank_slots):
        slots = self.table(idx) if self.table is not None else bank_slots
        if self.slot_gate is not None:
            gate_logits = self.read_slots(gate_logits, slots.values)
        return mix_memory(v, gate_logits, slots, self.gate_g0, self.slot_dropout if self.training else 0.0)

    def read_slots(self, gate_logits: torch.Tensor, slot_values: torch.Tensor) -> torch.Tensor:
        """Add u_h . m[:k] to each slot's gate logit (not to g0): a gate that reads its
        slot's content, so slots of one row that differ get different gates from the
        first step. The content is read without a gradient to the bank (the bank
        learns through the mix alone; u learns to read it), so the fast path's bank
        gradient, which sees the gates only, stays exact."""
        k = self.slot_gate.shape[1]
        content = slot_values.detach()[..., :k].to(gate_logits.dtype)  # (B,T,H,S,k)
        reads = (content * self.slot_gate.to(gate_logits.dtype)[:, None, :]).sum(-1)  # (B,T,H,S)
        return torch.cat([gate_logits[..., : int(self.gate_g0)], gate_logits[..., int(self.gate_g0) :] + reads], -1)
