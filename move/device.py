"""Device choice and mixed precision, with no CUDA-only import anywhere.

CUDA: bf16 autocast (weights and optimiser state stay fp32) and SDPA's flash
kernels; Apple MPS: tolerated, fp32; otherwise CPU, fp32.
"""

import contextlib

import torch


def pick_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device) -> contextlib.AbstractContextManager:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
