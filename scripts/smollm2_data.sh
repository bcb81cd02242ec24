# Sourced by the SmolLM2-135M study scripts: the set-up's environment, one thread per
# process, the packaged model ($MODEL) and the corpora under its tokenizer (made once):
# 300 invented facts (60 people x 5 relations, word values), news and Shakespeare.
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
MODEL="$(python -c "from move.export.hf_models import packaged_model; print(packaged_model('smollm2-135m'))")"
[ -f data/facts_smol/manifest.json ] || move knowledge-prepare --individuals 60 --name-tokens 2 \
    --tokenizer "$MODEL" --word-values --out data/facts_smol
for corpus in news shakespeare; do
    [ -f "data/${corpus}_smol/manifest.json" ] || move prepare --corpus "$corpus" --tokenizer "$MODEL" \
        --passage-tokens 128 --out "data/${corpus}_smol"
done
