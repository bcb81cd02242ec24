"""Peak resident memory of each rank through the life of a sharded job: start-up,
training steps, saving a checkpoint, and resuming it in a fresh job. The check that
no rank ever holds a whole value-memory table (tests/test_distributed.py) and the
figures in the README's torchrun section.

    torchrun --nproc_per_node=2 -m move.experiments.dist_memory --out DIR [--variant standard]
    torchrun --nproc_per_node=2 -m move.experiments.dist_memory --out DIR --resume

Each rank measures its resident set's high-water mark per phase (reset at the start
of the phase: /proc/self/clear_refs) and writes DIR/<variant>/<phase>_rank<R>.json
with the peak, the resident size after imports (what the process holds before any
model exists) and the bytes of its share of the value memory (weights, gradient and
two Adam moments of its rows). Training runs the same code path as `move train`
(recipes.build_training_model, Optimizers, the sharded checkpoint) on random tokens,
so the model's vocabulary may be larger than any prepared data. The job runs until
the phase `resume` when --resume is given (reading the checkpoint DIR/<variant>/ckpt).
"""

import argparse
import json
import time
from pathlib import Path

import torch

from move.config import ModelConfig, OptimConfig, TrainConfig
from move.device import autocast, peak_memory_mb, reset_peak_memory, resident_memory_mb
from move.recipes import build_training_model
from move.training import distributed
from move.training.optim import Optimizers
from move.training.sharded_checkpoint import load_sharded_checkpoint, save_sharded_checkpoint


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--variant", default="move", choices=("standard", "move"))
    p.add_argument("--density", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4, help="global batch")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="load DIR/<variant>/ckpt in a fresh job, then train")
    return p.parse_args(argv)


class Phases:
    """Per-phase peak resident memory and wall time of this rank."""

    def __init__(self, out: Path, rank: int, baseline_mb: float, share_bytes: int):
        self.out, self.rank, self.baseline_mb, self.share_bytes = out, rank, baseline_mb, share_bytes

    def run(self, name: str, fn):
        reset_peak_memory("cpu")
        start = time.perf_counter()
        result = fn()
        record = {
            "phase": name,
            "rank": self.rank,
            "peak_mb": peak_memory_mb("cpu"),
            "seconds": time.perf_counter() - start,
            "baseline_mb": self.baseline_mb,
            "memory_share_mb": self.share_bytes / 2**20,
        }
        (self.out / f"{name}_rank{self.rank}.json").write_text(json.dumps(record))
        return result


def train_steps(model, optimizers, config: ModelConfig, train: TrainConfig, steps: int) -> None:
    s = distributed.current()
    generator = torch.Generator().manual_seed(1 + s.rank)
    for _ in range(steps):
        tokens = torch.randint(
            config.vocab_size, (train.batch_size // s.world_size, config.seq_len + 1), generator=generator
        )
        with autocast("cpu"):
            loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        optimizers.reduce_shard_grads()
        optimizers.clip()
        optimizers.step()


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_flush_denormal(True)
    with distributed.distributed_job("cpu"):
        s = distributed.current()
        out = Path(args.out) / args.variant
        out.mkdir(parents=True, exist_ok=True)
        config = ModelConfig(
            vocab_size=args.vocab,
            seq_len=args.seq_len,
            n_layer=args.n_layer,
            n_embd=args.n_embd,
            n_head=4,
            value_memory=args.variant,
            memory_density=args.density,
        )
        # no DDP: the dense gradients are not averaged across ranks, which changes nothing
        # of what is measured here (how much memory the value memory's life takes)
        train = TrainConfig(
            batch_size=args.batch_size, steps=args.steps, device="cpu", optim=OptimConfig(optimizer="adamw")
        )
        torch.manual_seed(0)
        rows = -(-args.vocab // s.world_size) if args.variant == "move" else 0
        share = rows * config.n_slots * config.memory_width * (4 + 4 + 8)  # weights, gradient, two moments (fp32)
        phases = Phases(out, s.rank, resident_memory_mb(), share)
        model = phases.run("resume_startup" if args.resume else "startup", lambda: build_training_model(config, train))
        optimizers = Optimizers(model, train.optim)
        checkpoint = out / "ckpt"
        if args.resume:
            phases.run("resume", lambda: load_sharded_checkpoint(checkpoint, model, optimizers))
            phases.run("resume_steps", lambda: train_steps(model, optimizers, config, train, args.steps))
            return 0
        phases.run("steps", lambda: train_steps(model, optimizers, config, train, args.steps))
        phases.run(
            "save",
            lambda: save_sharded_checkpoint(checkpoint, model, optimizers, {"step": args.steps}, {"step": args.steps}),
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
