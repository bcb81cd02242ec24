#!/usr/bin/env bash
# The SmolLM2-135M facts study (issue: teaching a pretrained model new facts): every
# arm on the same 300 invented facts, 100 steps of 8 x 64 tokens, 3 seeds (the new
# parameters' init and the data order), without and with news mixed into every batch
# (2 of the 8 rows). Rates: the sweep's choice (scripts/smollm2_select.py applies the
# rule written in scripts/smollm2_sweep.sh); arms the sweep did not cover take their
# family's rate, stated here before any of them ran:
#   full      full fine-tuning at the chosen dense rate
#   lora32    LoRA r=32 on every linear layer (9.8M trained, ~ bank1's 9.5M)
#   lora8     LoRA r=8 (2.4M), the chosen LoRA rate
#   bank1     MoVE bank M=1, the chosen bank rate, routers 1e-3
#   bank15    MoVE bank M=15 (density 1: LaVE x1's 141M parameters), the chosen bank rate / 15
#             (the project's per-slot rate)
#   lave      LaVE-style tables on the 15 alternate layers, no g0, the chosen bank rate
#   bank1+lora32  both, each at its chosen rate
# Added after seeds 0-1 of the arms above (post hoc, reported apart from the stated comparison): bank15
# trained exactly as bank1 (its slots start at zero with every gate at 1 and never separate), so
#   bank15-layer  MoVE bank M=15 with the layer-assigned start (--layer-start-bias 4: each slot is read
#                 by one LaVE layer at first), at the chosen bank rate (LaVE's: each slot is one layer's table)
# Forgetting: bpb and KL on held-out news and Shakespeare (with news mixed in, news is
# no longer unseen text: Shakespeare is). The untouched model's figures are measured
# once for every run (--untouched). Resumable: a finished run is skipped, a stopped one
# resumes from its checkpoint.
#   bash scripts/smollm2_study.sh [MIX ...]   -> results/smollm2-study/<mix>/<arm>/seed<k>/retrofit.json
# MIX: none and/or news (default both). Workers started with the same arguments share
# the runs: each run is claimed with an flock on <arm>/.seed<k>.lock (released when its process
# ends, even by kill -9), so two single-thread workers on a 2-core machine split a mix.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/smollm2_data.sh"
bash scripts/smollm2_sweep.sh  # (skips what is done)
RATES="$(python scripts/smollm2_select.py results/smollm2-sweep)"
rate() { python -c "import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$RATES" "$1"; }
BANK="$(rate bank)" LORA="$(rate lora)" FULL="$(rate full)"
BANK15="$(python -c "print(float('$BANK') / 15)")"
declare -A ARMS=(
    [full]="--memory none --lr-dense $FULL"
    [lora32]="--memory none --lora-rank 32 --lr-lora $LORA"
    [lora8]="--memory none --lora-rank 8 --lr-lora $LORA"
    [bank1]="--slots 1 --lr-memory $BANK --lr-router 1e-3"
    [bank15]="--slots 15 --lr-memory $BANK15 --lr-router 1e-3"
    [lave]="--memory lave --lr-memory $BANK --lr-router 1e-3"
    [bank1+lora32]="--slots 1 --lr-memory $BANK --lr-router 1e-3 --lora-rank 32 --lr-lora $LORA"
    [bank15-layer]="--slots 15 --layer-start-bias 4 --lr-memory $BANK --lr-router 1e-3"
)
declare -A MIXES=([none]="" [news]="--mix-data data/news_smol --mix-fraction 0.25")
OUT=results/smollm2-study
CHOSEN=("${@:-none news}")
for mix in ${CHOSEN[*]}; do
    [ -n "${MIXES[$mix]+set}" ] || { echo "unknown mix '$mix': choose none or news" >&2; exit 2; }
done
for seed in 0 1 2; do
    for mix in ${CHOSEN[*]}; do
        for arm in bank1 lora32 full lave bank15 lora8 bank1+lora32 bank15-layer; do
            out="$OUT/$mix/$arm/seed$seed"
            [ -f "$out/retrofit.json" ] && continue
            mkdir -p "$(dirname "$out")"
            exec {claim}>"$(dirname "$out")/.seed$seed.lock"
            # another worker holds this run: leave it to that worker
            flock --nonblock "$claim" || { exec {claim}>&-; continue; }
            [ -f "$out/retrofit.json" ] && { exec {claim}>&-; continue; }
            # a run stopped mid-way continues from its newest checkpoint (every 50 steps)
            if [ -f "$out/run.json" ]; then again=--resume; else rm -rf "$out"; again=""; fi
            # shellcheck disable=SC2086
            move retrofit "$MODEL" --data data/facts_smol --general-data data/news_smol $again \
                --general-data data/shakespeare_smol --untouched "$OUT/untouched.json" --no-save \
                --steps 100 --batch-size 8 --seq-len 64 --eval-tokens 8192 --kl-tokens 2048 --seed "$seed" \
                ${ARMS[$arm]} ${MIXES[$mix]} --out "$out"
            exec {claim}>&-
        done
    done
done
