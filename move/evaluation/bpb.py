"""Bits per byte: a tokenizer-independent language-modelling metric.

bpb = (sum over scored targets of -ln p(target)) / (ln 2 * sum of their UTF-8 bytes),
where targets that are special tokens (BOS: 0 bytes) are excluded from both sums,
as nanochat computes it, and so are targets marked -1 (context a sliding window only
reads). Changing the vocabulary changes tokens per byte, not bpb.
"""

import math

import torch

from move.device import autocast, evaluating
from move.progress import progress
from move.training.distributed import all_reduce_sum, split_for_ranks


@torch.no_grad()
def bits_per_byte(model, batches, token_bytes: torch.Tensor) -> float:
    """batches: iterable of (inputs, targets) (B, T); token_bytes: (vocab,) int64.
    Under torchrun each rank scores its share of the batches and the sums are added
    over ranks, so every rank returns the same value."""
    with evaluating(model):
        device = next(model.parameters()).device
        token_bytes = token_bytes.to(device)
        total_nats = torch.zeros((), dtype=torch.float64, device=device)
        total_bytes = torch.zeros((), dtype=torch.int64, device=device)
        for (x, y), counts in progress(split_for_ranks(list(batches)), "bits per byte", unit="batch"):
            x, y = x.to(device), y.to(device)
            with autocast(device):
                nats = model(x, targets=y, reduction="none")
            if counts:
                nbytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], 0)
                total_nats += (nats.double() * (nbytes > 0)).sum()
                total_bytes += nbytes.sum()
    total_nats, total_bytes = all_reduce_sum([total_nats.item(), total_bytes.item()], device)
    if total_bytes == 0:
        return float("nan")
    return total_nats / (math.log(2) * total_bytes)
