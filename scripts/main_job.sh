#!/usr/bin/env bash
# The main job: standard vs LaVE x1 vs MoVE x1 vs MoVE x4 on Shakespeare, identical
# data order and shared-weight init, then a table and a report in runs/main/.
# About 15 minutes on 2 CPU cores; rerunning skips finished runs and resumes
# interrupted ones. Extra flags go to `move compare` (e.g. --steps 200).
source "$(dirname "$0")/setup.sh"
if [ ! -f data/shakespeare/manifest.json ]; then
    python -m move prepare --corpus shakespeare --vocab-size 2048 --passage-tokens 256 --out data/shakespeare
fi
exec python -m move compare --data data/shakespeare --out runs/main --preset small \
    --steps 800 --batch-size 16 --eval-every 200 --eval-tokens 131072 --checkpoint-every 200 \
    --variants standard lave:1 move:1 move:4 "$@"
