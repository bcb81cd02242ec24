"""The phases of move.experiments.dist_memory through the code of commit 5994dfe, the
last one with gather-on-save checkpoints (every rank builds the whole table, then keeps
its rows; rank 0 gathers the bank and its moments and writes one file; every rank reads
the whole checkpoint on resume). It imports that commit's API, so run it there:

    git worktree add /tmp/old 5994dfe && cp benchmarks/gather_on_save_memory.py /tmp/old/
    cd /tmp/old && PYTHONPATH=. OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 gather_on_save_memory.py --out DIR
    cd /tmp/old && PYTHONPATH=. OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 gather_on_save_memory.py \
        --out DIR --resume

Same shapes as dist_memory's defaults (MoVE x8, vocabulary 32,768, 4 layers, width 128);
writes DIR/move/<phase>_rank<R>.json. Results: benchmarks/dist_memory.md.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from move.config import ModelConfig, OptimConfig, TrainConfig
from move.device import peak_memory_mb, reset_peak_memory
from move.model.gpt import GPT
from move.training import distributed
from move.training.checkpoint import load_state_dict, load_train_state, save_checkpoint
from move.training.optim import Optimizers
from move.training.trainer import prepare_model

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--resume", action="store_true")
args = p.parse_args()
torch.set_flush_denormal(True)
with distributed.distributed_job("cpu"):
    s = distributed.current()
    out = Path(args.out) / "move"
    out.mkdir(parents=True, exist_ok=True)
    config = ModelConfig(
        vocab_size=32768, seq_len=64, n_layer=4, n_embd=128, n_head=4, value_memory="move", memory_density=8
    )
    train = TrainConfig(batch_size=4, steps=2, device="cpu", optim=OptimConfig(optimizer="adamw"))
    torch.manual_seed(0)

    def run(name, fn):
        reset_peak_memory("cpu")
        start = time.perf_counter()
        result = fn()
        (out / f"{name}_rank{s.rank}.json").write_text(
            json.dumps(
                {
                    "phase": name,
                    "rank": s.rank,
                    "peak_mb": peak_memory_mb("cpu"),
                    "seconds": time.perf_counter() - start,
                }
            )
        )
        return result

    def build():
        model = GPT(config)
        prepare_model(model, train)
        return model

    model = run("resume_startup" if args.resume else "startup", build)
    optimizers = Optimizers(model, train.optim)
    checkpoint = out / "ckpt"

    def steps():
        generator = torch.Generator().manual_seed(1 + s.rank)
        for _ in range(2):
            tokens = torch.randint(32768, (2, 65), generator=generator)
            model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
            optimizers.reduce_shard_grads()
            optimizers.clip()
            optimizers.step()

    def save():
        state, moments = distributed.full_state_dict(model), optimizers.state_dicts()
        if s.is_main:
            save_checkpoint(
                checkpoint, model, meta={"step": 2}, train_state={"step": 2, "optimizers": moments}, state_dict=state
            )
        distributed.barrier()

    def resume():
        state, _ = load_state_dict(checkpoint)
        model.load_state_dict(distributed.local_state_dict(model, state))
        optimizers.load_state_dicts(load_train_state(checkpoint)["optimizers"])

    if args.resume:
        run("resume", resume)
        run("resume_steps", steps)
    else:
        run("steps", steps)
        run("save", save)
