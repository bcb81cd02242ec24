"""Small building blocks shared by both attention kinds: norm, rotary, MLP, KV cache."""

import torch
import torch.nn as nn
import torch.nn.functional as F


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm (nanochat): no gain to learn, nothing to decay."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(length: int, dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (1, length, 1, dim/2) for `apply_rotary`."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + d/2]) of x: (B, T, heads, d) by position-dependent angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class MLP(nn.Module):
    """relu^2 MLP with 4x expansion (nanochat / modded-nanogpt)."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class KVCache:
    """Per-layer, per-name buffers of shape (B, capacity, ...), allocated for max_len
    positions and doubled when a sequence outgrows them (a Hugging Face `generate`
    does not say its length up front; the project's sampler sizes them exactly).

    Attention layers `update` with the new positions and get back everything up to
    them; what is cached is whatever the layer needs to rebuild keys and values
    (MHA: mixed k and v; MLA: the mixed latent and the RoPE key). The position
    advances once per forward, after all layers.
    """

    def __init__(self, n_layer: int, batch_size: int, max_len: int):
        self.batch_size = batch_size
        self.max_len = max_len
        self.pos = 0
        self.buffers: list[dict[str, torch.Tensor]] = [dict() for _ in range(n_layer)]

    def update(self, layer: int, name: str, x: torch.Tensor) -> torch.Tensor:
        end = self.pos + x.size(1)
        buf = self.buffers[layer].get(name)
        if buf is None or buf.size(1) < end:
            grown = x.new_zeros((self.batch_size, max(end, self.max_len, 2 * (0 if buf is None else buf.size(1))),
                                 *x.shape[2:]))
            if buf is not None:
                grown[:, :self.pos] = buf[:, :self.pos]
            buf = self.buffers[layer][name] = grown
        buf[:, self.pos:end] = x
        return buf[:, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for layer in self.buffers for b in layer.values())
