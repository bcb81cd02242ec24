"""`move export-hf <checkpoint> <dir>`: a Hugging Face model folder.

The folder holds config.json (with auto_map to the modelling code), the weights
as model.safetensors (the GPT's tensors under `gpt.`), the tokenizer files, and
the modelling code: modeling_move.py plus copies of the project's model files
with their imports made relative, so
    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)
    AutoTokenizer.from_pretrained(dir)
work with only torch and transformers installed. Generation through
`model.generate()` recomputes the full context each step (no HF cache); greedy
decoding gives the tokens of the project's own KV-cache sampler (tested for every
variant, MHA and MLA).
"""

import json
import re
import shutil
from pathlib import Path

from safetensors.torch import save_file

from move.errors import UserError
from move.files import EXPORT_MARKERS, check_replaceable, replace_directory, temporary_sibling
from move.text.tokenizer import Tokenizer
from move.training.checkpoint import first_non_finite, load_model, read_header, tokenizer_source

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the `move` package

# project module -> file name in the export; imports between them are rewritten
MODEL_FILES = {
    "move.errors": "move_errors.py",
    "move.config": "move_config.py",
    "move.model.layers": "move_layers.py",
    "move.model.row_shard": "move_row_shard.py",
    "move.model.value_tables": "move_value_tables.py",
    "move.model.value_memory": "move_value_memory.py",
    "move.model.attention": "move_attention.py",
    "move.model.gpt": "move_gpt.py",
}


def _relative_source(module: str) -> str:
    path = PACKAGE_ROOT.joinpath(*module.split(".")[1:]).with_suffix(".py")
    source = path.read_text()
    for name, file in MODEL_FILES.items():
        source = re.sub(rf"^from {re.escape(name)} import", f"from .{file[:-3]} import", source, flags=re.M)
    leftover = re.search(r"^(from|import) move\b.*$", source, flags=re.M)
    if leftover:
        raise RuntimeError(f"{path}: import not covered by the export: {leftover.group(0)}")
    return source


def export_hf(checkpoint, out_dir, tokenizer_dir=None, force: bool = False) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise UserError(f"{out_dir} already exists; pass --force to replace it")
    check_replaceable(out_dir, EXPORT_MARKERS, "a Hugging Face export")
    model, header = load_model(checkpoint, "cpu")
    bad = first_non_finite(model.state_dict())
    if bad:
        raise UserError(f"{checkpoint}: {bad} holds NaN or infinite values; refusing to export it")
    tokenizer = Tokenizer.load(tokenizer_source(checkpoint, header, tokenizer_dir))
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model {model.config.vocab_size}")
    tmp = temporary_sibling(out_dir)
    for module, file in MODEL_FILES.items():
        (tmp / file).write_text(_relative_source(module))
    shutil.copyfile(Path(__file__).parent / "hf_modeling_template.py", tmp / "modeling_move.py")
    save_file({f"gpt.{k}": v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors",
              metadata={"format": "pt"})
    bos = tokenizer.hf.id_to_token(tokenizer.bos_id)
    config = {
        "architectures": ["MoveForCausalLM"], "model_type": "move",
        "auto_map": {"AutoConfig": "modeling_move.MoveConfig", "AutoModelForCausalLM": "modeling_move.MoveForCausalLM"},
        "move_config": model.config.to_dict(), "vocab_size": model.config.vocab_size,
        "bos_token_id": tokenizer.bos_id, "pad_token_id": tokenizer.bos_id, "eos_token_id": None,
        "use_cache": False, "torch_dtype": "float32", "source_checkpoint": str(Path(checkpoint).resolve()),
        "source_sha256": read_header(checkpoint)["sha256"],
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save(tmp)
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "pad_token": bos,
        "add_bos_token": False, "model_max_length": model.config.seq_len}, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": tokenizer.bos_id,
                                                            "pad_token_id": tokenizer.bos_id, "use_cache": False}))
    replace_directory(tmp, out_dir)
    return out_dir
