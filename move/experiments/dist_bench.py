"""Row-sharded value memory vs FSDP2 and vs a replicated bank, measured side by
side in one torchrun job (the choice made in move/model/row_shard.py):

    torchrun --nproc_per_node=2 -m move.experiments.dist_bench --out benchmarks/distributed

All modes train the same MoVE model (exact AdamW on the bank) on the same
batches from the same initialisation, with DDP over the dense weights:
  sharded     ours: the bank split by rows; a step moves the touched rows and
              their gradients (all_to_all), each rank optimises its own rows;
  fsdp2       torch.distributed.fsdp.fully_shard on the bank: sharded storage and
              optimiser state, but each step all-gathers the whole bank and
              reduce-scatters a whole-bank gradient (which needs autograd's dense
              gradient, i.e. the reference path);
  replicated  every rank holds the whole bank and all-reduces its gradient.
Rounds alternate the modes so drift in the machine's speed hits all. Reported per
rank: step time, value-memory bytes communicated per step (from the sizes of the
collectives: all_to_all sends and receives the rows it moves, a ring all-reduce
2 (world-1)/world of the tensor each way, all-gather + reduce-scatter the same),
value-memory bytes held between steps (weights + gradient + Adam moments), and the
largest loss difference to the sharded mode (all modes compute the same training,
so this is float noise). Clipping is left out in all modes: FSDP2's DTensor
gradients do not mix with plain tensors in one norm.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from move.config import ModelConfig
from move.device import autocast
from move.errors import UserError
from move.files import atomic_write_json, atomic_write_text
from move.model.gpt import GPT
from move.training import distributed
from move.training.optim import OptimConfig, Optimizers

MODES = ("sharded", "fsdp2", "replicated")


class Mode:
    def __init__(self, name: str, args, device):
        torch.manual_seed(0)
        config = ModelConfig(
            vocab_size=args.vocab,
            seq_len=args.seq_len,
            n_layer=args.n_layer,
            n_embd=args.n_embd,
            n_head=args.n_head,
            value_memory="move",
            memory_density=args.density,
        )
        self.name, self.device = name, device
        self.model = GPT(config).to(device)
        self.model.set_value_memory_grad_mode("autograd" if name == "fsdp2" else "dense")
        world = distributed.current().world_size
        if name == "sharded":
            distributed.shard_value_memory(self.model)
        elif name == "fsdp2":
            fully_shard(self.model.bank, mesh=init_device_mesh(device.type, (world,)))
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, ["bank.weight"])
        self.ddp = DistributedDataParallel(self.model, forward_sync_buffers=False)
        # AdamW for the matrices and modest rates: Muon's bf16 orthogonalisation and large
        # Adam steps would amplify the modes' different fp32 summation orders into
        # visibly different losses, hiding the check that they train the same model
        self.optimizers = Optimizers(
            self.model, OptimConfig(optimizer="adamw", lr_value_memory=0.02, lr_embedding=0.02)
        )
        s = distributed.current()
        g = torch.Generator().manual_seed(1 + s.rank)  # each rank its own batch
        self.batches = [
            torch.randint(0, args.vocab, (args.batch_size, args.seq_len + 1), generator=g) for _ in range(4)
        ]
        self.bank = self.model.bank
        self.row_bytes = self.bank.weight[0].numel() * self.bank.weight.element_size()
        # a ring all-reduce (or all-gather + reduce-scatter) of the whole bank, sent + received
        self.whole_bank_bytes = int(2 * 2 * (world - 1) / world * args.vocab * self.row_bytes)
        self.comm_bytes: list[int] = []
        self.losses: list[float] = []

    def step(self, i: int) -> float:
        batch = self.batches[i % len(self.batches)].to(self.device)
        start = time.perf_counter()
        with autocast(self.device):
            loss = self.ddp(batch[:, :-1], targets=batch[:, 1:])
        loss.backward()
        self.losses.append(loss.item())
        self.optimizers.reduce_shard_grads()  # the sharded mode's row exchange; nothing for the others
        if self.name == "sharded":
            unique = int(torch.unique(batch[:, :-1]).numel())
            self.comm_bytes.append(2 * 2 * unique * self.row_bytes)  # rows out + grads back, sent + received
        elif self.name == "replicated":
            dist.all_reduce(self.bank.weight.grad)
            self.bank.weight.grad /= distributed.current().world_size
            self.comm_bytes.append(self.whole_bank_bytes)
        else:  # FSDP2 all-gathered before the forward and reduce-scattered in the backward
            self.comm_bytes.append(self.whole_bank_bytes)
        self.optimizers.step()
        if self.name == "replicated":  # rows other ranks touched are non-zero too
            self.bank.weight.grad.zero_()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def held_bytes(self) -> int:
        w = self.bank.weight
        tensors = [w] + ([w.grad] if w.grad is not None else [])
        for opt in self.optimizers.optimizers:
            tensors += [v for v in opt.state.get(w, {}).values() if torch.is_tensor(v) and v.dim()]
        local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]  # FSDP2: DTensors
        return sum(t.numel() * t.element_size() for t in local)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="sharded vs replicated value memory under torchrun")
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--density", type=int, default=4)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4, help="per rank")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round and mode")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="", help="write <out>.md and <out>.json (rank 0)")
    args = p.parse_args(argv)
    if not distributed.launched_by_torchrun():
        raise SystemExit("error: run under torchrun, e.g. torchrun --nproc_per_node=2 -m move.experiments.dist_bench")
    torch.set_flush_denormal(True)
    with distributed.distributed_job("auto") as device:
        modes = {name: Mode(name, args, device) for name in MODES}
        times = {name: [] for name in modes}
        for mode in modes.values():  # warm-up: allocations, first-touch of the Adam state
            mode.step(0)
        for _r in range(args.rounds):
            for name, mode in modes.items():
                times[name] += [mode.step(i) for i in range(args.steps)]
        s = distributed.current()
        result = {
            "world_size": s.world_size,
            "device": str(device),
            "args": vars(args),
            "modes": {
                name: {
                    "step_s_median": statistics.median(times[name]),
                    "value_memory_comm_mb_per_step": statistics.mean(m.comm_bytes) / 2**20,
                    "value_memory_held_mb": m.held_bytes() / 2**20,
                    "max_loss_diff_to_sharded": max(abs(a - b) for a, b in zip(m.losses, modes["sharded"].losses)),
                }
                for name, m in modes.items()
            },
        }
        if s.is_main:
            report(result, args.out)


def report(result: dict, out: str) -> None:
    sharded, replicated = result["modes"]["sharded"], result["modes"]["replicated"]
    a = result["args"]
    lines = [
        f"# Value memory across {result['world_size']} processes: row-sharded vs FSDP2 vs replicated",
        "",
        f"MoVE x{a['density']}, vocab {a['vocab']:,}, {a['n_layer']} layers, d_model {a['n_embd']}, "
        f"seq {a['seq_len']}, batch {a['batch_size']} per rank, device {result['device']}; "
        f"median of {a['rounds']} x {a['steps']} steps per mode, rounds interleaved.",
        "",
        "| mode | step time (s) | vs sharded | value-memory traffic per step and rank (MiB) | "
        "value memory held per rank (MiB) | max loss difference to sharded |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in result["modes"].items():
        lines.append(
            f"| {name} | {m['step_s_median']:.3f} | {m['step_s_median'] / sharded['step_s_median']:.2f}x | "
            f"{m['value_memory_comm_mb_per_step']:.1f} | {m['value_memory_held_mb']:.1f} | "
            f"{m['max_loss_diff_to_sharded']:.1e} |"
        )
    lines += [
        "",
        f"sharded / replicated: step time {sharded['step_s_median'] / replicated['step_s_median']:.2f}x, "
        f"traffic {sharded['value_memory_comm_mb_per_step'] / replicated['value_memory_comm_mb_per_step']:.3f}x, "
        f"memory {sharded['value_memory_held_mb'] / replicated['value_memory_held_mb']:.2f}x. FSDP2 holds "
        "the same shard between steps, but materialises the whole bank and a whole-bank gradient in every "
        "step and moves whole-bank bytes.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if out:
        atomic_write_text(Path(out).with_suffix(".md"), text)
        atomic_write_json(Path(out).with_suffix(".json"), result)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
