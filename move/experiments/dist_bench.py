"""Row-sharded value memory vs a replicated bank, measured side by side in one
torchrun job (the choice made in move/model/row_shard.py):

    torchrun --nproc_per_node=2 -m move.experiments.dist_bench --out benchmarks/distributed

Both modes train the same MoVE model with DDP over the dense weights:
  sharded     the bank split by rows; a step moves the touched rows and their
              gradients (all_to_all), each rank optimises its own rows;
  replicated  every rank holds the whole bank; after the backward its dense
              gradient is all-reduced - the bytes that DDP, or FSDP2's
              all-gather + reduce-scatter of a fully_shard-ed bank, move for it.
Rounds alternate the two modes so drift in the machine's speed hits both.
Reported per rank: step time, value-memory bytes communicated per step (counted
from the tensors sent), and value-memory bytes held (weights + gradient + Adam
moments).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from move.config import ModelConfig
from move.device import autocast
from move.errors import UserError
from move.files import atomic_write_json, atomic_write_text
from move.model.gpt import GPT
from move.training import distributed
from move.training.optim import OptimConfig, build_optimizers, clip_grad_norm, touched_rows


class Mode:
    def __init__(self, name: str, args, device):
        torch.manual_seed(0)
        config = ModelConfig(vocab_size=args.vocab, seq_len=args.seq_len, n_layer=args.n_layer, n_embd=args.n_embd,
                             n_head=args.n_head, value_memory="move", memory_density=args.density)
        self.name, self.device = name, device
        self.model = GPT(config).to(device)
        self.model.set_value_memory_grad_mode("dense")
        if name == "sharded":
            distributed.shard_value_memory(self.model)
        self.sharded = distributed.sharded_tables(self.model)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, ["bank.weight"])
        self.ddp = DistributedDataParallel(self.model, forward_sync_buffers=False)
        self.optimizers = build_optimizers(self.model, OptimConfig())
        s = distributed.current()
        g = torch.Generator().manual_seed(1 + s.rank)  # each rank its own batch
        self.batches = [torch.randint(0, args.vocab, (args.batch_size, args.seq_len + 1), generator=g)
                        for _ in range(4)]
        self.bank = self.model.bank
        self.row_bytes = self.bank.weight[0].numel() * self.bank.weight.element_size()
        self.comm_bytes: list[int] = []

    def step(self, i: int) -> float:
        batch = self.batches[i % len(self.batches)].to(self.device)
        start = time.perf_counter()
        with autocast(self.device):
            loss = self.ddp(batch[:, :-1], targets=batch[:, 1:], check_ids=False)
        loss.backward()
        world = distributed.current().world_size
        if self.sharded:
            unique = int(torch.unique(batch[:, :-1]).numel())
            self.bank.reduce_shard_grads()
            self.comm_bytes.append(2 * 2 * unique * self.row_bytes)  # rows out + grads back, sent + received
        else:
            dist.all_reduce(self.bank.weight.grad)
            self.bank.weight.grad /= world
            # a ring all-reduce sends and receives 2 (world-1)/world of the tensor
            self.comm_bytes.append(int(2 * 2 * (world - 1) / world * self.bank.weight.numel()
                                       * self.bank.weight.element_size()))
        clip_grad_norm(list(self.model.parameters()), 1.0, touched_rows(self.model),
                       frozenset(id(t.weight) for t in self.sharded.values()))
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def held_bytes(self) -> int:
        w = self.bank.weight
        tensors = [w] + ([w.grad] if w.grad is not None else [])
        for opt in self.optimizers:
            tensors += [v for v in opt.state.get(w, {}).values() if torch.is_tensor(v) and v.dim()]
        return sum(t.numel() * t.element_size() for t in tensors)


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
        modes = {name: Mode(name, args, device) for name in ("sharded", "replicated")}
        times = {name: [] for name in modes}
        for mode in modes.values():  # warm-up: allocations, first-touch of the Adam state
            mode.step(0)
        for r in range(args.rounds):
            for name, mode in modes.items():
                times[name] += [mode.step(i) for i in range(args.steps)]
        s = distributed.current()
        result = {"world_size": s.world_size, "device": str(device), "args": vars(args),
                  "modes": {name: {"step_s_median": statistics.median(times[name]),
                                   "value_memory_comm_mb_per_step": statistics.mean(m.comm_bytes) / 2**20,
                                   "value_memory_held_mb": m.held_bytes() / 2**20}
                            for name, m in modes.items()}}
        if s.is_main:
            report(result, args.out)


def report(result: dict, out: str) -> None:
    sharded, replicated = result["modes"]["sharded"], result["modes"]["replicated"]
    a = result["args"]
    lines = [f"# Value memory across {result['world_size']} processes: row-sharded vs replicated", "",
             f"MoVE x{a['density']}, vocab {a['vocab']:,}, {a['n_layer']} layers, d_model {a['n_embd']}, "
             f"seq {a['seq_len']}, batch {a['batch_size']} per rank, device {result['device']}; "
             f"median of {a['rounds']} x {a['steps']} steps per mode, rounds interleaved.", "",
             "| mode | step time (s) | value-memory traffic per step and rank (MiB) | value memory held per rank (MiB) |",
             "|---|---|---|---|"]
    for name, m in result["modes"].items():
        lines.append(f"| {name} | {m['step_s_median']:.3f} | {m['value_memory_comm_mb_per_step']:.1f} | "
                     f"{m['value_memory_held_mb']:.1f} |")
    lines += ["", f"sharded / replicated: step time {sharded['step_s_median'] / replicated['step_s_median']:.2f}x, "
              f"traffic {sharded['value_memory_comm_mb_per_step'] / replicated['value_memory_comm_mb_per_step']:.3f}x, "
              f"memory {sharded['value_memory_held_mb'] / replicated['value_memory_held_mb']:.2f}x.", ""]
    text = "\n".join(lines)
    print(text)
    if out:
        atomic_write_text(Path(out).with_suffix(".md"), text)
        atomic_write_json(Path(out).with_suffix(".json"), result)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        raise SystemExit(f"error: {e}")
