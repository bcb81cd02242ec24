"""A/B of the training step before and after the host-sync removal, one code version
per process, alternated: `move bench`'s Subject (6 layers x 384, batch 8 x 256) at
vocabulary 8,192, each configuration's median step over 7 steps after 2 warm-up
steps, configurations interleaved within a round; prints one JSON line of
{config: median seconds}. Run with the code to measure first on PYTHONPATH:

    git worktree add /tmp/before bf16ca0
    for i in 1 2; do
      PYTHONPATH=/tmp/before OMP_NUM_THREADS=2 python benchmarks/no_sync_step/ab_train_step.py before
      OMP_NUM_THREADS=2 python benchmarks/no_sync_step/ab_train_step.py after
    done
"""

import json
import statistics
import sys
import time

import torch

from move.experiments.bench import CONFIGS, BenchShape, Subject

NAMES = ["standard", "move_x1", "move_x4", "move_x4_lazy", "move_x4_bf16", "move_x4_lazy_bf16"]


def main(label: str) -> None:
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    shape = BenchShape()
    subjects = {name: Subject(shape, 8192, torch.device("cpu"), *CONFIGS[name]) for name in NAMES}
    for s in subjects.values():
        for _ in range(2):
            s.train_step()
    times = {name: [] for name in NAMES}
    for _ in range(7):
        for name, s in subjects.items():
            start = time.perf_counter()
            s.train_step()
            times[name].append(time.perf_counter() - start)
    print(json.dumps({"code": label, **{n: statistics.median(t) for n, t in times.items()}}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
