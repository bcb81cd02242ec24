"""Device choice and mixed precision, with no CUDA-only import anywhere.

CUDA: bf16 autocast (weights and optimiser state stay fp32) for training, evaluation
and decoding, TF32 for the matmuls left in fp32, and SDPA's flash kernels; Apple
MPS: tolerated, fp32; otherwise CPU, fp32.
"""

import contextlib

import torch


def pick_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return allow_tf32(torch.device(requested))
    if torch.cuda.is_available():
        return allow_tf32(torch.device("cuda"))
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def allow_tf32(device: torch.device) -> torch.device:
    """On CUDA, let the fp32 matmuls that autocast leaves in fp32 (the optimiser's
    Newton-Schulz, fp32 evaluation) use TF32 tensor cores: torch's default precision
    "highest" is the only one changed, so a precision the user set stays."""
    if device.type == "cuda" and torch.get_float32_matmul_precision() == "highest":
        torch.set_float32_matmul_precision("high")
    return device


def autocast(device) -> contextlib.AbstractContextManager:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


SYNC_DEBUG_ENV = "MOVE_CUDA_SYNC_DEBUG"  # "warn" or "error": torch.cuda.set_sync_debug_mode around each step


@contextlib.contextmanager
def sync_debug(device, mode: str | None):
    """Run the block under torch.cuda.set_sync_debug_mode(mode) ("warn" or "error": an op
    that waits for the device warns or raises); nothing off CUDA or without a mode."""
    if not mode or torch.device(device).type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def synchronize(device) -> None:
    """Wait for the work queued on a CUDA device (a sync point's timing); nothing elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def evaluating(model):
    """Eval mode inside the block; the model's previous mode is restored after it,
    also when the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_memory(device) -> None:
    """Start a new peak-memory measurement. CUDA: allocator peak. CPU (Linux):
    writing 5 to /proc/self/clear_refs resets the process's resident high-water
    mark, so runs made one after another in one process are measured separately."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device) -> float | None:
    """Peak since reset_peak_memory: CUDA allocated bytes, or CPU resident set (None if unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = _proc_status_kib("VmHWM")
    return None if peak is None else peak / 1024


def resident_memory_mb() -> float | None:
    rss = _proc_status_kib("VmRSS")
    return None if rss is None else rss / 1024


# Dense bf16 tensor-core peaks (no sparsity) from the vendors' data sheets, in
# FLOP/s, matched against torch.cuda.get_device_name. PCIe parts clock lower.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
)


def peak_flops(device, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device for MFU: the override if given, else the data-sheet
    bf16 peak of a known GPU; None when unknown (CPUs: no meaningful single figure)."""
    if override_tflops:
        return override_tflops * 1e12
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)
