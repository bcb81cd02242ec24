#!/usr/bin/env bash
# The check to run on the first GPU you get (about 10 minutes on one H100): d12 at its
# own vocabulary (65,536 rows) in stages - standard / LaVE x1 / MoVE x1 / MoVE x4
# throughput (the loss must fall; tok/s, MFU and peak memory beside `move plan`), a bf16
# bank that fails after a checkpoint and resumes, --compile, compiled decoding over 10
# lengths in one process, torchrun over every GPU present - every training step under
# torch.cuda.set_sync_debug_mode("error"). Writes runs/gpu_smoke/report.json (naming
# the card) and smoke.md; exits 1 when a check failed. Flags go to
# move.experiments.smoke: --presets d12 d20 d32 gpt-b gpt-l, --stages ..., or
# `-- --flag value` for `move train`.
source "$(dirname "$0")/setup.sh"
exec python -m move.experiments.smoke "$@"
