"""Muon's Newton-Schulz batched by matrix shape vs one matrix at a time.

Before = the same optimiser with one parameter group per matrix (nothing is stacked:
exactly the per-matrix iteration of the previous code); after = one group (matrices
of a shape stacked). Counts the aten ops of one step (each a kernel launch on a GPU)
for every matrix of a preset (on the meta device: no arithmetic), and times a step on
this CPU for the `small` preset (median of 20, after 3 warm-up steps).

    OMP_NUM_THREADS=2 python benchmarks/muon_batched/muon_batched.py > benchmarks/muon_batched/result.md
"""

import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from move.config import model_config_from_preset
from move.model.accounting import param_group
from move.model.gpt import GPT
from move.training.muon import Muon


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def matrices(preset: str, device: str) -> list[torch.nn.Parameter]:
    with torch.device(device):
        model = GPT(model_config_from_preset(preset, value_memory="move"), init_seed=0)
    # what build_optimizers hands Muon: the transformer's matrices and the routers
    return [p for name, p in model.named_parameters() if param_group(name) in ("transformer_matrices", "routers")]


def optimiser(params, batched: bool) -> Muon:
    groups = [{"params": params}] if batched else [{"params": [p]} for p in params]
    return Muon(groups, lr=0.02, momentum=0.95, nesterov=True, ns_dtype=torch.float32)


def ops_per_step(preset: str, batched: bool) -> int:
    params = matrices(preset, "meta")
    for p in params:
        p.grad = torch.empty_like(p)
    opt = optimiser(params, batched)
    opt.step()  # creates the momentum buffers
    with OpCounter() as counter:
        opt.step()
    return counter.ops


def seconds_per_step(preset: str, batched: bool) -> float:
    torch.manual_seed(0)
    params = matrices(preset, "cpu")
    opt = optimiser(params, batched)
    times = []
    for i in range(23):
        for p in params:
            p.grad = torch.randn_like(p)
        start = time.perf_counter()
        opt.step()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(2)
    print("| preset | matrices | shapes | aten ops per step, one at a time | batched | ratio |")
    print("|---|---|---|---|---|---|")
    for preset in ("small", "d12", "d20"):
        params = matrices(preset, "meta")
        before, after = ops_per_step(preset, False), ops_per_step(preset, True)
        shapes = len({tuple(p.shape) for p in params})
        print(f"| {preset} | {len(params)} | {shapes} | {before:,} | {after:,} | {after / before:.2f} |")
    print()
    print("| preset | CPU seconds per Muon step, one at a time | batched | ratio |")
    print("|---|---|---|---|")
    for preset in ("small",):
        before, after = seconds_per_step(preset, False), seconds_per_step(preset, True)
        print(f"| {preset} | {before * 1e3:.2f} ms | {after * 1e3:.2f} ms | {after / before:.2f} |")


if __name__ == "__main__":
    main()
