"""What a training run will need, computed without allocating anything: parameters
and FLOPs (the model is built on the meta device), memory per process, tokens and
time (`move plan`).

Memory per process, by what holds it (bytes):
- weights: every dense parameter in fp32 (replicated under DDP); the value-memory
  tables (MoVE bank, LaVE tables) are row-sharded, so a process holds 1/N of their
  rows, in the table dtype.
- gradients: fp32 for the dense parameters, plus DDP's bucket copy with N > 1; the
  tables' fast path keeps a persistent fp32 gradient of the shard ("exact"), or only
  the touched rows ("lazy").
- optimiser state: Muon one fp32 momentum per matrix (AdamW two), AdamW two fp32
  moments for the embedding, the head and the table shard (fp32 also for a bf16 bank).
- activations: BACKWARD_PEAK x what autograd saves for the backward pass per token of
  a micro-batch, counted on this model with saved-tensor hooks: per layer 72 bytes per channel
  (18 fp32 values: norms, q/k/v, attention output, the MLP's 4x-wide hidden state
  twice) and 16 per head, plus 13 bytes per channel outside the layers and 8 per
  vocabulary entry (the fp32 logits and their soft-cap), and for value memory the
  gathered slots and each memory layer's gates and mixed values. MLA adds its latent
  and the RoPE parts of q and k; on CPU also the H x T attention probabilities per
  token (no fused CPU kernel takes keys wider than values). Under bf16 autocast (CUDA)
  the per-layer part is halved, MLA's attention is assumed to run in a fused kernel
  (flash or memory-efficient: no T x T term), and the logits stay fp32.
The estimate leaves out what the framework itself occupies (the CUDA context, the
allocator's fragmentation, the Python process): keep a margin of ~10% of a GPU.
"""

import math
from dataclasses import dataclass, replace

import torch

from move.config import MEMORY_LABELS, SIZED_BY_DENSITY, ModelConfig, TrainConfig
from move.device import autocast, peak_memory_mb, pick_device, reset_peak_memory
from move.errors import ConfigError
from move.model.accounting import count_params, forward_flops_per_token
from move.model.gpt import GPT
from move.training.optim import Optimizers
from move.training.trainer import prepare_model

GIB = 1024**3
# The peak of a step exceeds the saved activations: the backward pass holds the gradients
# flowing back through them while it frees them, and the allocator keeps freed blocks a
# while. Measured on CPU (fp32) for four shapes (widths 256-512, 4-8 layers, vocabularies
# 4,096-16,384, MoVE x4 among them): 1.64-1.84 x the saved bytes; tests/test_plan.py
# checks the whole estimate against measured peaks of other shapes.
BACKWARD_PEAK = 1.75
TABLE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass
class RunPlan:
    config: ModelConfig
    train: TrainConfig
    processes: int
    bf16: bool  # activations under bf16 autocast
    params: dict[str, int]
    flops_per_token: int  # training: 3 x the forward (backward = 2 x forward)
    memory: dict[str, int]  # bytes per process, by what holds them
    micro_batch: int  # sequences per process per forward
    tokens: int  # tokens the run trains on

    @property
    def memory_total(self) -> int:
        return sum(self.memory.values())

    def hours(self, peak_tflops: float, mfu: float) -> float:
        """Wall-clock hours of training (evaluation excluded) at `mfu` of every
        process's `peak_tflops`."""
        return self.tokens * self.flops_per_token / (peak_tflops * 1e12 * mfu * self.processes) / 3600


def activation_bytes_per_token(config: ModelConfig, bf16: bool) -> float:
    """What autograd saves per token of a micro-batch (see the module docstring)."""
    c = config
    per_layer = 72 * c.n_embd + 16 * c.n_head
    if c.attention == "mla":
        # the latent and its norm, the decoupled RoPE parts of q and k (counted with hooks
        # as for MHA: 8 bytes per latent channel, 16 per head and RoPE channel)
        per_layer += 8 * c.kv_latent_width + 16 * c.n_head * c.rope_width
        if not bf16:
            # MLA's keys are wider than its values: PyTorch's CPU attention has no fused
            # kernel for that and saves the softmax probabilities, H x T floats per token
            per_layer += 4 * c.n_head * c.seq_len
    memory = 0.0
    if c.value_memory == "move":
        memory = 4 * c.n_slots * c.memory_width + c.n_layer * 4 * (c.memory_width + c.kv_heads * (c.n_slots + 1))
    elif c.value_memory == "lave":
        per_lave_layer = 4 * c.n_slots * c.memory_width + 4 * (c.memory_width + c.kv_heads * c.n_slots)
        memory = len(c.lave_layers) * per_lave_layer
    # the other designs (not calibrated against measured peaks; counted from what their
    # backward needs): the bigram rows once; v_l and v_1 of every layer after the first;
    # the product-key query, its scores, weights and gathered rows (its MLP's share of
    # per_layer is left in: an overestimate)
    elif c.value_memory == "bigram":
        memory = 4 * c.n_embd
    elif c.value_memory == "value_residual":
        memory = 4 * c.kv_heads * c.head_dim * c.n_layer
    elif c.value_memory == "pkm":
        heads, k = c.pkm_heads, c.pkm_topk
        memory = 4 * heads * (2 * 2 * c.head_dim + 2 * c.pkm_keys + k * (c.n_embd + 2))
    layers = c.n_layer * per_layer + memory
    return (layers / 2 if bf16 else layers) + 13 * c.n_embd + 8 * c.vocab_size


def plan_run(config: ModelConfig, train: TrainConfig, processes: int = 1, bf16: bool = False) -> RunPlan:
    """The plan of training `config` with `train` on `processes` processes (torchrun,
    row-sharded tables); bf16: activations under bf16 autocast (CUDA)."""
    if processes < 1:
        raise ConfigError(f"processes must be >= 1, got {processes}")
    if train.batch_size % processes:  # the Trainer's rule (per_rank_batch)
        raise ConfigError(
            f"batch_size {train.batch_size} is the global batch and must divide evenly over {processes} processes"
        )
    with torch.device("meta"):
        params = count_params(GPT(config))
    tables = params["value_memory"]
    dense = params["total"] - tables
    shard = math.ceil(tables / processes)
    matrices = params["transformer_matrices"] + params["routers"]
    adam_dense = params["token_embedding"] + params["lm_head"] + params["memory_control"]
    micro_batch = train.batch_size // processes
    micro_tokens = micro_batch * config.seq_len
    o = train.optim
    # the fast path's persistent gradient buffer of the whole shard, in the table's dtype
    # (read whole by exact AdamW, at the touched rows by lazy RowAdam)
    table_grads = TABLE_BYTES[train.value_memory_dtype] * shard
    memory = {
        "weights": 4 * dense + TABLE_BYTES[train.value_memory_dtype] * shard,
        "gradients": 4 * dense * (2 if processes > 1 else 1) + table_grads,
        "optimizer": (4 if o.optimizer == "muon" else 8) * matrices + 8 * adam_dense + 8 * shard,
        "activations": int(BACKWARD_PEAK * activation_bytes_per_token(config, bf16) * micro_tokens),
    }
    flops = 3 * forward_flops_per_token(config, params)["total"]
    tokens = train.steps * train.batch_size * train.grad_accum * config.seq_len
    return RunPlan(config, train, processes, bf16, params, flops, memory, micro_batch, tokens)


# A GPU never gives all of its memory to tensors: the CUDA context, NCCL buffers and the
# caching allocator's fragmentation take their share. 10% is the margin `fits` keeps.
GPU_MARGIN = 0.10


def fits(plan: RunPlan, device_bytes: int) -> bool:
    return plan.memory_total <= (1 - GPU_MARGIN) * device_bytes


def advice(plan: RunPlan, device_bytes: int) -> list[str]:
    """Single changes of the command line that make a plan fit device_bytes, each
    checked by planning again; the smallest micro-batch when none does."""
    c, t = plan.config, plan.train

    def replan(train=t, processes=plan.processes):
        return plan_run(c, train, processes, plan.bf16)

    lines = []
    factor = 2
    while factor <= plan.micro_batch:  # same tokens per step, smaller micro-batches
        if t.batch_size % (factor * plan.processes) == 0:
            smaller = replan(replace(t, batch_size=t.batch_size // factor, grad_accum=t.grad_accum * factor))
            if fits(smaller, device_bytes):
                lines.append(
                    f"--batch-size {smaller.train.batch_size} --grad-accum {smaller.train.grad_accum} "
                    f"(same tokens per step): {gib(smaller.memory_total)}"
                )
                break
        factor *= 2
    if plan.params["value_memory"]:
        for n in range(plan.processes + 1, t.batch_size + 1):  # more shards of the tables
            if t.batch_size % n == 0:
                wider = replan(processes=n)
                if fits(wider, device_bytes):
                    lines.append(
                        f"--processes {n} (each holds 1/{n} of the value memory and of the batch): "
                        f"{gib(wider.memory_total)}"
                    )
                    break
        if t.value_memory_dtype == "float32":
            half = replan(replace(t, value_memory_dtype="bfloat16"))
            if fits(half, device_bytes):
                lines.append(f"--value-memory-dtype bfloat16 (a bf16 bank): {gib(half.memory_total)}")
    if t.optim.optimizer == "adamw":
        muon = replan(replace(t, optim=replace(t.optim, optimizer="muon")))
        if fits(muon, device_bytes):
            lines.append(f"--optimizer muon (one moment per matrix): {gib(muon.memory_total)}")
    if not lines:
        floor = replan(replace(t, batch_size=plan.processes, grad_accum=t.grad_accum * plan.micro_batch))
        lines.append(
            f"no single change fits: even one sequence per micro-batch needs {gib(floor.memory_total)}; "
            f"combine more processes, a bf16 bank and a shorter --seq-len, or a larger device"
        )
    return lines


def measure_peak_bytes(config: ModelConfig, train: TrainConfig, steps: int = 2) -> int:
    """The memory one process really needs to train `config`: a few steps on random
    tokens on train.device, measured from before the model exists (CUDA: the
    allocator's peak, which excludes the CUDA context; CPU: the growth of the resident
    set's high-water mark, which includes the allocator's slack). The check of plan_run."""
    device = pick_device(train.device)
    reset_peak_memory(device)  # from here the peak starts at what is in use now
    baseline = peak_memory_mb(device)
    generator = torch.Generator().manual_seed(train.seed)
    model = GPT(config).to(device)
    prepare_model(model, train)
    optimizers = Optimizers(model, train.optim)
    for _ in range(steps):
        for _ in range(train.grad_accum):
            tokens = torch.randint(config.vocab_size, (train.batch_size, config.seq_len + 1), generator=generator)
            x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
            with autocast(device):
                loss = model(x, targets=y)
            (loss / train.grad_accum).backward()
        optimizers.reduce_shard_grads()
        optimizers.clip()
        optimizers.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return int((peak_memory_mb(device) - baseline) * 2**20)


def gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def variant_label(c: ModelConfig) -> str:
    name = MEMORY_LABELS[c.value_memory]
    density = f" x{c.memory_density}" if c.value_memory in SIZED_BY_DENSITY else ""
    return f"{name}{density}, {c.attention.upper()}"


def plan_text(
    plan: RunPlan,
    device_bytes: int | None = None,
    peak_tflops: float | None = None,
    mfu: float | None = None,
    card: str = "",
) -> str:
    """What `move plan` prints: sizes, FLOPs, memory per process, tokens and time."""
    c, t, p = plan.config, plan.train, plan.params
    lines = [
        f"{variant_label(c)}: {c.n_layer} layers, width {c.n_embd}, {c.n_head} heads, vocabulary "
        f"{c.vocab_size:,}, context {c.seq_len:,}",
        f"{plan.processes} process(es) x {plan.micro_batch} sequences per micro-batch, {t.grad_accum} "
        f"micro-batch(es) per step: {t.batch_size * t.grad_accum * c.seq_len:,} tokens per step",
        "",
        "parameters",
    ]
    for group, n in p.items():
        if group != "total" and n:
            lines.append(f"  {group:<22}{n:>16,}  ({n / p['total']:.1%})")
    lines += [
        f"  {'total':<22}{p['total']:>16,}",
        "",
        f"training FLOPs per token  {plan.flops_per_token:,} (3 x forward; lookups free)",
        f"tokens                    {plan.tokens:,} ({t.steps:,} steps; "
        f"{plan.tokens / (p['total'] - p['value_memory']):.1f} per dense parameter)",
        f"training FLOPs            {plan.tokens * plan.flops_per_token:.3e}",
        "",
    ]
    shard = "the whole table" if plan.processes == 1 else f"1/{plan.processes} of its rows"
    lines.append(f"memory per process (value memory: {shard}; activations {'bf16' if plan.bf16 else 'fp32'})")
    for part, n in plan.memory.items():
        lines.append(f"  {part:<22}{gib(n):>16}")
    lines.append(f"  {'total':<22}{gib(plan.memory_total):>16}")
    if device_bytes:
        usable = (1 - GPU_MARGIN) * device_bytes
        if fits(plan, device_bytes):
            lines.append(
                f"fits {gib(device_bytes)} per device with {gib(usable - plan.memory_total)} to spare "
                f"(after a {GPU_MARGIN:.0%} margin for the CUDA context and fragmentation)"
            )
        else:
            lines.append(
                f"WILL NOT FIT {gib(device_bytes)} per device: needs {gib(plan.memory_total)}, "
                f"{gib(usable)} usable after a {GPU_MARGIN:.0%} margin. Each of these fits:"
            )
            lines += [f"  - {line}" for line in advice(plan, device_bytes)]
    if peak_tflops:
        where = f"{card}, " if card else ""
        hours = plan.hours(peak_tflops, mfu)
        lines += [
            "",
            f"time: {hours:,.2f} h ({hours * 60:,.0f} min) of training at {mfu:.0%} MFU "
            f"({where}{peak_tflops:,.0f} TFLOP/s peak per device, {plan.processes} device(s); "
            f"evaluation not included)",
        ]
    return "\n".join(lines)
