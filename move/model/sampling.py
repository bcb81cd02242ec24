"""Autoregressive sampling with a KV cache: temperature, top-k, top-p, seeded, batched."""

import math

import torch

from move.device import autocast, evaluating
from move.errors import ConfigError


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token once the mass *before* it already exceeds top_p (keeps at least one)
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) > top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator) -> torch.Tensor:
    """logits (B, V) -> next ids (B, 1); temperature 0 means greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


MAX_NEW_TOKENS = 1 << 20  # the KV cache is allocated for the whole length up front


def check_sampling_args(temperature: float, top_k: int, top_p: float, max_new_tokens: int, seed: int = 0) -> None:
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k < 0:
        raise ConfigError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ConfigError(f"max_new_tokens must be in [0, {MAX_NEW_TOKENS}], got {max_new_tokens}")
    if not 0 <= seed < 2**63:
        raise ConfigError(f"seed must be in [0, 2**63), got {seed}")


def decode_step(model, token: torch.Tensor, cache) -> torch.Tensor:
    """One token per row (B, 1) against the cache -> next-token logits (B, V)."""
    return model(token, cache=cache)[:, -1]


# decode_step compiled (on first call) for a StaticKVCache: one graph for every position;
# a new model, batch size or cache length compiles once more. fullgraph: the step must
# not fall back to eager pieces silently (a memory model without autograd is one graph).
compiled_decode_step = torch.compile(decode_step, fullgraph=True, dynamic=False)

# generate(compiled=True) sizes its static cache in buckets, powers of two from this
# one: every length of a bucket reuses one graph (a length baked into each graph would
# recompile per call, and dynamo's recompile limit, 8 by default, then ends a long-lived
# process). A bucket costs at most twice the cache memory and attention over its
# whole buffer; 1M tokens take 15 buckets.
STATIC_CACHE_MIN = 64


def static_cache_length(length: int) -> int:
    """The bucket of a cache of `length` positions: the next power of two >= length,
    at least STATIC_CACHE_MIN."""
    return max(STATIC_CACHE_MIN, 1 << max(0, length - 1).bit_length())


@torch.no_grad()
def generate(
    model,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    compiled: bool = False,
) -> torch.Tensor:
    """prompt (B, T0) of equal-length prompts -> (B, T0 + max_new_tokens).

    The prompt is prefilled in one forward; each new token then costs one
    single-position forward against the cache. compiled: that step is
    torch.compile'd against a static cache (worth it for long generations: the first
    call compiles, tens of seconds on a CPU); the prefill stays eager. The cache is
    sized by bucket (static_cache_length), so calls of other lengths reuse the graph.
    """
    check_sampling_args(temperature, top_k, top_p, max_new_tokens, seed)
    model.check_token_ids(prompt)
    with evaluating(model), autocast(prompt.device):  # bf16 on CUDA, as training; nothing elsewhere
        generator = torch.Generator(device=prompt.device).manual_seed(seed)
        length = prompt.size(1) + max_new_tokens
        cache = model.new_cache(prompt.size(0), static_cache_length(length) if compiled else length, static=compiled)
        step = compiled_decode_step if compiled else decode_step
        out = prompt
        logits = model(prompt, cache=cache)[:, -1]
        for i in range(max_new_tokens):
            nxt = pick_next(logits, temperature, top_k, top_p, generator)
            out = torch.cat([out, nxt], dim=1)
            if i + 1 < max_new_tokens:
                logits = step(model, nxt, cache)
    return out
