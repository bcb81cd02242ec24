#!/usr/bin/env bash
# Teaching SmolLM2-135M invented facts: a one-slot MoVE bank (dense weights frozen)
# against LoRA r=32 on every linear layer (about the bank's trainable parameters),
# 3 seeds each, 100 steps of 8 x 64 tokens, learning rates of the pilot (bank 1e-2 /
# routers 1e-3; LoRA 1e-3), no general text mixed in. Recall on the held-out phrasing
# and news bpb (forgetting) before and after. Resumable: a finished run is skipped.
#   bash scripts/smollm2_facts.sh            -> results/smollm2-facts/<arm>/seed<k>/retrofit.json
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/smollm2_data.sh"
declare -A ARMS=(
    [bank]="--slots 1 --lr-memory 1e-2 --lr-router 1e-3"
    [lora]="--memory none --lora-rank 32 --lr-lora 1e-3"
)
for seed in 0 1 2; do
    for arm in bank lora; do
        out="results/smollm2-facts/$arm/seed$seed"
        [ -f "$out/retrofit.json" ] && continue
        rm -rf "$out"
        # shellcheck disable=SC2086
        move retrofit "$MODEL" --data data/facts_smol --general-data data/news_smol --no-save \
            --steps 100 --batch-size 8 --seq-len 64 --eval-tokens 16384 --seed "$seed" ${ARMS[$arm]} --out "$out"
    done
done
python scripts/smollm2_facts_table.py results/smollm2-facts > results/smollm2-facts/summary.md
