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

    static = False  # positions are Python ints; buffers grow; attention reads only what is written

    def __init__(self, n_layer: int, batch_size: int, max_len: int):
        self.batch_size = batch_size
        self.max_len = max_len
        self.pos = 0
        self.buffers: list[dict[str, torch.Tensor]] = [dict() for _ in range(n_layer)]
        self.weights: list[dict[str, torch.Tensor]] = [dict() for _ in range(n_layer)]

    def prepared(self, layer: int, name: str, build) -> torch.Tensor:
        """A tensor a layer derives from its weights (e.g. two projections stacked into
        one matrix), built on first use and kept while this cache decodes: weights do
        not change during a decode, and a new decode starts with a new cache."""
        if name not in self.weights[layer]:
            self.weights[layer][name] = build()
        return self.weights[layer][name]

    def update(self, layer: int, name: str, x: torch.Tensor) -> torch.Tensor:
        end = self.pos + x.size(1)
        buf = self.buffers[layer].get(name)
        if buf is None or buf.size(1) < end:
            grown = x.new_zeros(
                (self.batch_size, max(end, self.max_len, 2 * (0 if buf is None else buf.size(1))), *x.shape[2:])
            )
            if buf is not None:
                grown[:, : self.pos] = buf[:, : self.pos]
            buf = self.buffers[layer][name] = grown
        buf[:, self.pos : end] = x
        return buf[:, :end]

    def span(self, length: int):
        """Where the next `length` positions go: a slice (this cache) or an index tensor
        (StaticKVCache), either of which indexes a (1, positions, ...) table."""
        return slice(self.pos, self.pos + length)

    def advance(self, n: int) -> None:
        self.pos += n

    # Beam search, assisted and contrastive decoding rearrange what a cache holds:
    def select_rows(self, index: torch.Tensor) -> None:
        """Keep rows `index` (B',) of the batch, in that order (repeats allowed): a beam
        search step keeps the beams it continues."""
        for layer in self.buffers:
            for name, buf in layer.items():
                layer[name] = buf.index_select(0, index.to(buf.device))
        self.batch_size = index.numel()

    def repeat_rows(self, times: int) -> None:
        """Each row `times` times in a row (row i becomes rows i*times .. i*times+times-1)."""
        for layer in self.buffers:
            for name, buf in layer.items():
                layer[name] = buf.repeat_interleave(times, dim=0)
        self.batch_size *= times

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on (rejected draft tokens): the next
        update writes there, and attention reads only up to what is written."""
        if not 0 <= length <= self.pos:
            raise ValueError(f"cannot truncate a cache of {self.pos} positions to {length}")
        self.pos = length

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for layer in self.buffers for b in layer.values())


class StaticKVCache(KVCache):
    """A KV cache for a compiled decoding step (move.model.sampling.compiled_decode_step):
    its position is a tensor and its buffers are allocated once for max_len positions,
    so one compiled single-token step serves every position (a Python int position
    would be baked into the graph and recompile it at every token). update returns
    the whole buffer; attention masks the positions past the queries (causal_attention
    does so for any tensor position). Writing past max_len is an indexing error."""

    static = True

    def __init__(self, n_layer: int, batch_size: int, max_len: int, device):
        super().__init__(n_layer, batch_size, max_len)
        self.pos = torch.zeros((), dtype=torch.long, device=device)

    def span(self, length: int) -> torch.Tensor:
        return self.pos + torch.arange(length, device=self.pos.device)

    def update(self, layer: int, name: str, x: torch.Tensor) -> torch.Tensor:
        buf = self.buffers[layer].get(name)
        if buf is None:  # first use (the eager prefill), so a compiled step finds every buffer
            buf = self.buffers[layer][name] = x.new_zeros((self.batch_size, self.max_len, *x.shape[2:]))
        return buf.index_copy_(1, self.span(x.size(1)), x)

    def advance(self, n: int) -> None:
        self.pos.add_(n)
