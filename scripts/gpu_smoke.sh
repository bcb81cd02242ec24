#!/usr/bin/env bash
# GPU smoke test: d12 (vocab 65,536) trained for 40 steps with standard / LaVE x1 /
# MoVE x1 / MoVE x4; prints tokens/s, MFU and peak GPU memory and writes
# runs/gpu_smoke/smoke.md with the card's name. Flags go to move.experiments.smoke,
# e.g. --nproc 8 (torchrun over 8 GPUs), or `-- --compile true` for `move train`.
source "$(dirname "$0")/setup.sh"
exec python -m move.experiments.smoke "$@"
