"""Run by tests/test_host_syncs.py under torchrun (2 processes, gloo): a few training
steps of a MoVE model with a row-sharded bank, the syncing ops of each step counted
on every rank. Writes OUT/rank<r>.json: {"rank", "grad_accum", "syncs": [ops]} and,
with SAVE, the bank's rows and the routers after the steps (rank<r>.pt).

    torchrun --nproc_per_node=2 tests/torchrun_sync_probe.py GRAD_ACCUM exact|lazy sized|fixed OUT"""

import json
import sys
from pathlib import Path

import torch
from test_host_syncs import SyncCounter
from test_model import VOCAB, make_config

from move.config import OptimConfig
from move.model.gpt import GPT
from move.training.distributed import current, distributed_job, wrap_ddp
from move.training.optim import Optimizers, prepare_for_training


def main(grad_accum: int, optimizer: str, exchange: str, out: Path) -> None:
    with distributed_job("cpu") as device:
        torch.manual_seed(0)
        model = GPT(make_config("mha", "move", memory_density=2), init_seed=0)
        prepare_for_training(model, "fast", optimizer, "float32", row_exchange=exchange)
        optimizers = Optimizers(model, OptimConfig(value_memory_optimizer=optimizer, grad_clip=1.0))
        ddp = wrap_ddp(model, device)
        rank = current().rank
        g = torch.Generator().manual_seed(rank)
        batches = [torch.randint(0, VOCAB, (2, 9), generator=g) for _ in range(3 * grad_accum)]

        def step(micro_batches):
            for i, idx in enumerate(micro_batches):
                last = i == len(micro_batches) - 1
                with ddp.no_sync() if not last else torch.enable_grad():
                    loss = ddp(idx[:, :-1], targets=idx[:, 1:])
                    (loss / len(micro_batches)).backward()
            optimizers.reduce_shard_grads()
            optimizers.clip()
            optimizers.step()

        initial = model.bank.weight.detach().clone()
        step(batches[:grad_accum])  # the first step creates the optimiser state
        with SyncCounter() as counter:
            step(batches[grad_accum : 2 * grad_accum])
        record = {"rank": rank, "grad_accum": grad_accum, "syncs": counter.syncs}
        (out / f"rank{rank}.json").write_text(json.dumps(record))
        step(batches[2 * grad_accum :])  # rows that an exchange sent wrong would move the wrong way
        torch.save(
            {"bank": model.bank.weight.detach(), "initial": initial, "start": model.bank.shard.start},
            out / f"rank{rank}.pt",
        )


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4]))
