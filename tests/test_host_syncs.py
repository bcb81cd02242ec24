"""No host-device synchronisation in a single-process training step, for every
variant, with and without gradient accumulation.

On a GPU an op whose result size or value the host must read (unique, nonzero,
bincount, .item()...) waits for the device to drain, leaving it idle while the host
then launches the optimiser's kernels. On a CPU nothing waits, so the test counts
the ops that would: a TorchDispatchMode sees every aten op of the step (forward,
backward, clipping, optimiser) and records those that sync on CUDA."""

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_model import VOCAB, make_config
from torch.utils._python_dispatch import TorchDispatchMode

from move.config import OTHER_MEMORY_DESIGNS, OptimConfig
from move.model.gpt import GPT
from move.training.optim import Optimizers, prepare_for_training

aten = torch.ops.aten
# ops whose output shape or value depends on tensor contents: CUDA must finish first
SYNCING = {
    aten._local_scalar_dense,  # .item(), float(t), bool(t), .tolist()
    aten.nonzero,
    aten.nonzero_static,
    aten.unique_consecutive,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.bincount,
    aten.masked_select,
    aten.masked_scatter,
}


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        syncing = packet in SYNCING
        if packet is aten.repeat_interleave:
            syncing = kwargs.get("output_size") is None  # the output length is read from the repeats
        if packet in (aten.index, aten.index_put, aten.index_put_):  # boolean-mask indexing runs nonzero
            indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
            syncing = any(t is not None and t.dtype == torch.bool for t in indices)
        if syncing:
            self.syncs.append(str(func))
        return func(*args, **kwargs)


def test_the_counter_sees_the_ops_that_sync():
    x = torch.tensor([3, 1, 3, 2])
    with SyncCounter() as counter:
        torch.unique(x)
        x.sum().item()
        x[x > 1]
        torch.repeat_interleave(x, x)
        torch.repeat_interleave(x, x, output_size=9)
        x.sort()
    assert len(counter.syncs) == 4, counter.syncs


VARIANTS = [
    ("standard", {}, "exact"),
    ("lave", {}, "exact"),
    ("move", {"memory_density": 2}, "exact"),
    ("move", {"memory_density": 2}, "lazy"),
    ("move", {"attention": "mla", "kv_latent_dim": 48, "rope_head_dim": 8}, "exact"),
    *[(design, {}, "exact") for design in OTHER_MEMORY_DESIGNS],
]


@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("variant,extra,optimizer", VARIANTS, ids=[f"{v}-{o}-{len(e)}" for v, e, o in VARIANTS])
@pytest.mark.parametrize("bank_dtype", ["float32", "bfloat16"])
def test_a_training_step_never_syncs(variant, extra, optimizer, grad_accum, bank_dtype):
    if bank_dtype == "bfloat16" and variant not in ("move", "lave"):
        pytest.skip("the bank dtype applies to MoVE and LaVE tables")
    config = make_config(**{"shape": "mha", "variant": variant, **extra})
    model = GPT(config)
    prepare_for_training(model, "fast", optimizer, bank_dtype)
    optimizers = Optimizers(model, OptimConfig(value_memory_optimizer=optimizer, grad_clip=1.0))
    batches = [torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(i)) for i in range(3 * 2)]

    def step(micro_batches):
        for idx in micro_batches:
            loss = model(idx[:, :-1], targets=idx[:, 1:])
            (loss / len(micro_batches)).backward()
        optimizers.reduce_shard_grads()
        optimizers.clip()
        optimizers.step()

    step(batches[:grad_accum])  # the first step creates the optimiser state
    with SyncCounter() as counter:
        for s in range(1, 3):
            step(batches[s * grad_accum : (s + 1) * grad_accum])
    assert counter.syncs == []


def run_sync_probe(out: Path, optimizer: str, exchange: str, micro_batches: int = 2):
    """tests/torchrun_sync_probe.py on 2 processes: (each rank's record, the whole bank
    after its 3 steps, the ranks' rows put together)."""
    out.mkdir()
    probe = Path(__file__).parent / "torchrun_sync_probe.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", probe, micro_batches, optimizer]
    result = subprocess.run(
        [str(c) for c in [*command, exchange, out]],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    shards = sorted((torch.load(out / f"rank{r}.pt") for r in (0, 1)), key=lambda shard: shard["start"])
    return ranks, {key: torch.cat([shard[key] for shard in shards]) for key in ("bank", "initial")}


@pytest.mark.parametrize("optimizer", ["exact", "lazy"])
def test_syncs_under_torchrun_are_the_documented_ones_and_fixed_exchanges_have_none(tmp_path, optimizer):
    """A row-sharded bank with sized exchanges reads the row counts on the host: per
    micro-batch the forward fetch (unique, bincount, the exchanged counts read back) and
    the sum of its row gradients (unique); per step the gradient exchange (merge
    unique, bincount, counts read back, the owner's unique). 4 x micro-batches + 4 per
    step and rank; on a CPU the reads back (tolist) are not dispatched, so 3 x
    micro-batches + 3 are counted here (docs/gpu.md). Fixed-capacity exchanges
    (--row-exchange fixed) read nothing, and train the same bank."""
    micro_batches = 2
    sized, sized_bank = run_sync_probe(tmp_path / "sized", optimizer, "sized", micro_batches)
    expected = {"aten._unique2.default": 2 * micro_batches + 2, "aten.bincount.default": micro_batches + 1}
    for r in sized:
        assert collections.Counter(r["syncs"]) == expected, r
    fixed, fixed_bank = run_sync_probe(tmp_path / "fixed", optimizer, "fixed", micro_batches)
    assert [r["syncs"] for r in fixed] == [[], []]
    moved = (sized_bank["bank"] != sized_bank["initial"]).flatten(1).any(1)
    assert moved.float().mean() > 0.3  # the steps moved rows of both shards: the comparison below means something
    assert moved[: len(moved) // 2].any() and moved[len(moved) // 2 :].any()
    torch.testing.assert_close(fixed_bank["bank"], sized_bank["bank"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["standard", "move"])
def test_compiled_training_does_not_recompile_after_the_first_step(variant):
    """torch.compile'd training (dynamo with the eager backend: the tracing and guards
    of --compile, without code generation) compiles its graphs in the first step and
    reuses them for 50 more: nothing the model changes between steps (its rotary
    tables, the tables' touched rows) may invalidate a guard."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = GPT(make_config("mha", variant, memory_density=2))
    prepare_for_training(model, "fast", "exact", "float32")
    optimizers = Optimizers(model, OptimConfig())
    counter = CompileCounter()
    forward = torch.compile(model, backend=counter)
    g = torch.Generator().manual_seed(0)
    frames = []
    for _ in range(51):
        idx = torch.randint(0, VOCAB, (2, 9), generator=g)
        forward(idx[:, :-1], targets=idx[:, 1:]).backward()
        optimizers.clip()
        optimizers.step()
        frames.append(counter.frame_count)
    assert frames[-1] == frames[0], frames
