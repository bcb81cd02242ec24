#!/usr/bin/env bash
# Learning-rate sweep for the SmolLM2-135M facts study (one seed, seed 0), the same
# corpus and budget as scripts/smollm2_facts.sh: 100 steps of 8 x 64 tokens, no
# general text mixed in. Resumable: a finished point is skipped.
#
# Selection rule, written before any sweep point ran: per arm, the rate with the most
# stored bits on the held-out phrasing among the rates that raise news bpb (text the
# arm never trains on) by at most 0.10 over the untouched model; if no rate stays within
# that, the rate that raises it least.
#
# Two points are the pilot's seed-0 runs (same command): results/smollm2-facts
# bank/seed0 (bank 1e-2) and lora/seed0 (LoRA 1e-3), copied here, not rerun.
#   bash scripts/smollm2_sweep.sh   -> results/smollm2-sweep/<arm>-<rate>/retrofit.json
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/smollm2_data.sh"
OUT=results/smollm2-sweep
for pilot in "bank-1e-2:bank" "lora-1e-3:lora"; do
    mkdir -p "$OUT/${pilot%%:*}"
    cp -n "results/smollm2-facts/${pilot##*:}/seed0/retrofit.json" "$OUT/${pilot%%:*}/"
done
declare -A POINTS=(
    [bank-3e-3]="--slots 1 --lr-memory 3e-3 --lr-router 1e-3"
    [bank-3e-2]="--slots 1 --lr-memory 3e-2 --lr-router 1e-3"
    [bank-1e-1]="--slots 1 --lr-memory 1e-1 --lr-router 1e-3"
    [lora-1e-4]="--memory none --lora-rank 32 --lr-lora 1e-4"
    [lora-3e-4]="--memory none --lora-rank 32 --lr-lora 3e-4"
    [full-1e-5]="--memory none --lr-dense 1e-5"
    [full-3e-5]="--memory none --lr-dense 3e-5"
)
for point in bank-3e-2 lora-3e-4 full-1e-5 bank-1e-1 lora-1e-4 full-3e-5 bank-3e-3; do
    out="$OUT/$point"
    [ -f "$out/retrofit.json" ] && continue
    rm -rf "$out"
    # shellcheck disable=SC2086
    move retrofit "$MODEL" --data data/facts_smol --general-data data/news_smol --no-save \
        --steps 100 --batch-size 8 --seq-len 64 --eval-tokens 16384 --seed 0 ${POINTS[$point]} --out "$out"
done
