#!/usr/bin/env bash
# GPU smoke test: d12 (vocab 65,536) trained for 40 steps with standard / LaVE x1 /
# MoVE x1 / MoVE x4; prints tokens/s, MFU, peak GPU memory and the memory `move plan`
# predicted, and writes runs/gpu_smoke/smoke.md with the card's name. Flags go to
# move.experiments.smoke: --presets d12 d20 d32 gpt-b gpt-l (every paper-scale shape;
# runs the plan says will not fit the card are skipped and listed), --nproc 8
# (torchrun over 8 GPUs), or `-- --compile true` for `move train`.
source "$(dirname "$0")/setup.sh"
exec python -m move.experiments.smoke "$@"
