#!/usr/bin/env bash
# The image main job: standard vs LaVE x1 vs MoVE x1 class-conditional models on
# MNIST (VQ-VAE tokens, 7x7 grid), identical data order and shared-weight init,
# then FID, class accuracy, NLL and a sample grid per variant in runs/image_main/.
# About 25 minutes on 2 CPU cores; every step is skipped when done and resumed
# when interrupted. Extra flags go to `move compare` (e.g. --steps 200).
source "$(dirname "$0")/setup.sh"
RUNS=runs/image_main

train_once() {  # train_once <run dir> <command...>: skip when finished, resume when started
    local dir="$1"; shift
    if [ -f "$dir/summary.json" ]; then echo "$dir: complete, skipped"; return; fi
    if [ -f "$dir/run.json" ]; then "$@" --out "$dir" --resume; else "$@" --out "$dir"; fi
}

train_once $RUNS/tokenizer python -m move image-tokenizer --dataset mnist --hidden 32 --steps 1500
if [ ! -f data/mnist_vq/manifest.json ]; then
    python -m move image-encode --dataset mnist --tokenizer $RUNS/tokenizer --out data/mnist_vq
fi
train_once $RUNS/classifier python -m move image-classifier --dataset mnist --steps 4000 --lr-adamw-matrix 0.003
exec python -m move compare --data data/mnist_vq --out $RUNS --preset small \
    --steps 1000 --batch-size 64 --eval-every 250 --checkpoint-every 250 --eval-tokens 98000 \
    --classifier $RUNS/classifier --fid-samples 500 --cfg-scale 1.5 \
    --variants standard lave:1 move:1 "$@"
