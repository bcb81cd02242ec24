"""Causal self-attention: MHA/GQA and multi-head latent attention (MLA), each with
optional value memory (and, on MHA/GQA, the value residual of memory_designs.py).
What goes into the KV cache is always the *mixed* value (MHA) or the *mixed* latent
(MLA+MoVE), so decoding costs one bank-row gather per token and the gates and mix per
layer more than the standard model, nothing else (the router rides in the value
projection's matmul: LayerValueMemory.project).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from move.config import ModelConfig
from move.model.layers import KVCache, apply_rotary, rms_norm
from move.model.memory_designs import ValueResidual
from move.model.value_memory import LayerValueMemory, MemoryInputs


def causal_attention(
    q, k, v, cache_offset, key_mask: torch.Tensor | None = None, pad_values: bool | None = None
) -> torch.Tensor:
    """q (B,Tq,H,D), k (B,Tk,Hkv,D), v (B,Tk,Hkv,Dv) -> (B,Tq,H,Dv).

    The queries sit at positions cache_offset..cache_offset+Tq-1 of the keys. An int
    offset means the keys end with the queries (a growing cache); a tensor offset (a
    StaticKVCache) means the keys are a whole buffer whose positions past the queries
    are not written yet, so they are always masked.
    key_mask (B,Tk) bool, for padded batches: False marks a padding key that no query
    attends to. Every query still attends to itself, so a padding query (whose output
    nobody reads) gets a finite value instead of a softmax over nothing, whose NaN
    would reach real tokens through a zero attention weight (0 x NaN = NaN).
    pad_values (default: on CUDA) pads v to q's width when it is narrower (MLA), so
    that SDPA can choose its flash kernel.
    """
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    width = v.size(-1)
    if pad_values is None:
        pad_values = q.is_cuda
    if pad_values and q.size(-1) > width:
        # SDPA's flash kernel needs one head width for q, k and v, and MLA's queries and
        # keys (no-position part + RoPE part, 192 at the MLA presets) are wider than its
        # values (128). Zero columns appended to v add zero columns to the output, cut
        # off below: the same result from the flash kernel, for 1.5x the P.V product.
        # Off the GPU the math kernel takes unequal widths, so nothing is padded there.
        v = F.pad(v, (0, q.size(-1) - width))
    gqa = q.size(1) != k.size(1)
    t_q, t_k = q.size(2), k.size(2)
    keys_end_with_queries = isinstance(cache_offset, int)
    if key_mask is None and keys_end_with_queries and t_q == t_k:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif key_mask is None and keys_end_with_queries and t_q == 1:  # one new token sees every cached position
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    else:  # a chunk appended to a cache, a static cache's buffer, or padded rows
        q_pos = cache_offset + torch.arange(t_q, device=q.device)
        keys = torch.arange(t_k, device=q.device)
        mask = keys[None, :] <= q_pos[:, None]  # (Tq, Tk)
        if key_mask is not None:
            mask = (mask & key_mask[:, None, :]) | (keys[None, :] == q_pos[:, None])  # (B, Tq, Tk)
            mask = mask[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return y[..., :width].transpose(1, 2)


class CausalSelfAttention(nn.Module):
    """Multi-head attention with grouped-query heads, RoPE and QK-norm."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        d = config.n_embd
        self.c_q = nn.Linear(d, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, d, bias=False)
        self.value_memory = LayerValueMemory(config, layer_idx) if layer_idx in config.memory_layers() else None
        value_residual = config.value_memory == "value_residual"
        self.keeps_first_values = value_residual and layer_idx == 0
        self.value_residual = ValueResidual() if value_residual and layer_idx > 0 else None

    def forward(self, x, memory: MemoryInputs, cos, sin, cache: KVCache | None, key_mask=None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.value_memory is None:
            v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        else:
            v, gate_logits = self.value_memory.project(x, self.c_v, cache, self.layer_idx)
            v = self.value_memory(
                v.view(B, T, self.n_kv_head, self.head_dim), gate_logits, memory.idx, memory.bank_slots
            )
        if self.keeps_first_values:
            memory.first_values = v
        elif self.value_residual is not None:
            v = self.value_residual(v, memory.first_values)
        q, k = rms_norm(apply_rotary(q, cos, sin)), rms_norm(apply_rotary(k, cos, sin))
        offset = 0
        if cache is not None:
            offset = cache.pos
            k = cache.update(self.layer_idx, "k", k)
            v = cache.update(self.layer_idx, "v", v)
        y = causal_attention(q, k, v, offset, key_mask)
        return self.c_proj(y.reshape(B, T, -1))


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2 MLA: keys and values are up-projected from a cached latent c_KV
    of width d_c; a decoupled RoPE key (shared by all heads) carries position.

    Value memory placement:
    - MoVE mixes into the latent (split in H chunks of d_c/H) *before* the
      up-projections, so the cache still holds only the latent and the RoPE key.
    - LaVE adds its table after the value up-projection (the paper's baseline); the
      mixed values then cannot be rebuilt from the latent, so they are cached too:
      LaVE costs MLA its compressed cache, which is part of the comparison.
    The latent is RMS-normed (DeepSeek's kv_a_layernorm, parameter-free here)
    before mixing, so bank rows and latent share a scale.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.head_dim, self.rope_dim = config.n_head, config.head_dim, config.rope_width
        self.latent_dim = config.kv_latent_width
        d = config.n_embd
        self.c_q = nn.Linear(d, self.n_head * (self.head_dim + self.rope_dim), bias=False)
        self.c_kv_down = nn.Linear(d, self.latent_dim, bias=False)
        self.c_k_rope = nn.Linear(d, self.rope_dim, bias=False)
        self.c_k_up = nn.Linear(self.latent_dim, self.n_head * self.head_dim, bias=False)
        self.c_v_up = nn.Linear(self.latent_dim, self.n_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, d, bias=False)
        self.value_memory = LayerValueMemory(config, layer_idx) if layer_idx in config.memory_layers() else None
        self.memory_in_latent = config.value_memory == "move"

    def forward(self, x, memory: MemoryInputs, cos, sin, cache: KVCache | None, key_mask=None):
        B, T, _ = x.shape
        H, hd, r = self.n_head, self.head_dim, self.rope_dim
        q = self.c_q(x).view(B, T, H, hd + r)
        q = torch.cat([q[..., :hd], apply_rotary(q[..., hd:], cos, sin)], dim=-1)
        if self.value_memory is None:
            latent = rms_norm(self.c_kv_down(x))
        else:  # the router reads x, as the down-projection does
            latent, gate_logits = self.value_memory.project(x, self.c_kv_down, cache, self.layer_idx)
            latent = rms_norm(latent)
        if self.value_memory is not None and self.memory_in_latent:
            latent = self.value_memory(latent.view(B, T, H, -1), gate_logits, memory.idx, memory.bank_slots).reshape(
                B, T, -1
            )
        k_rope = apply_rotary(self.c_k_rope(x).view(B, T, 1, r), cos, sin)
        lave_values = None
        if self.value_memory is not None and not self.memory_in_latent:
            lave_values = self.value_memory(
                self.c_v_up(latent).view(B, T, H, hd), gate_logits, memory.idx, memory.bank_slots
            )
        offset = 0
        if cache is not None:
            offset = cache.pos
            latent = cache.update(self.layer_idx, "latent", latent)
            k_rope = cache.update(self.layer_idx, "k_rope", k_rope)
            if lave_values is not None:
                lave_values = cache.update(self.layer_idx, "v", lave_values)
        t_k = latent.size(1)
        k_nope = self.c_k_up(latent).view(B, t_k, H, hd)
        v = lave_values if lave_values is not None else self.c_v_up(latent).view(B, t_k, H, hd)
        k = torch.cat([k_nope, k_rope.expand(B, t_k, H, r)], dim=-1)
        q, k = rms_norm(q), rms_norm(k)
        y = causal_attention(q, k, v, offset, key_mask)
        return self.c_proj(y.reshape(B, T, -1))
