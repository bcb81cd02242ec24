"""`move export-hf <checkpoint> <dir>`: a Hugging Face model folder.

The folder holds config.json (with auto_map to the modelling code), the weights
as model.safetensors (the GPT's tensors under `gpt.`), the tokenizer files, and
the modelling code: modeling_move.py plus copies of the project's model files
with their imports made relative, so
    AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)
    AutoTokenizer.from_pretrained(dir)
work with only torch and transformers installed. Generation through
`model.generate()` uses the project's KV cache (mixed values / mixed latent cached,
one forward per new token), and left-padded batches generate what each prompt
generates alone; greedy decoding gives the tokens of the project's own sampler
(tested for every variant, MHA and MLA). The tokenizer adds the BOS token the
project's models were trained with, as `move sample` does; README.md is a model card.
"""

import json
import re
import shutil
from pathlib import Path

from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from move.errors import UserError
from move.files import EXPORT_MARKERS, check_replaceable, replace_directory, temporary_sibling
from move.model.accounting import count_params
from move.text.tokenizer import Tokenizer
from move.training.checkpoint import first_non_finite, load_model, tokenizer_source
from move.training.trainer import read_metrics

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the `move` package

# project module -> file name in the export; imports between them are rewritten
MODEL_FILES = {
    "move.errors": "move_errors.py",
    "move.readers": "move_readers.py",  # config.py reads run configs with it
    "move.config": "move_config.py",
    "move.model.layers": "move_layers.py",
    "move.model.row_ids": "move_row_ids.py",
    "move.model.row_shard": "move_row_shard.py",
    "move.model.value_tables": "move_value_tables.py",
    "move.model.memory_designs": "move_memory_designs.py",
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
    tmp.chmod(0o755)  # a folder to share: the usual modes, not a private temporary's
    for module, file in MODEL_FILES.items():
        (tmp / file).write_text(_relative_source(module))
    shutil.copyfile(Path(__file__).parent / "hf_modeling_template.py", tmp / "modeling_move.py")
    save_file(
        {f"gpt.{k}": v.contiguous() for k, v in model.state_dict().items()},
        tmp / "model.safetensors",
        metadata={"format": "pt"},
    )
    bos = tokenizer.hf.id_to_token(tokenizer.bos_id)
    config = {
        "architectures": ["MoveForCausalLM"],
        "model_type": "move",
        "auto_map": {"AutoConfig": "modeling_move.MoveConfig", "AutoModelForCausalLM": "modeling_move.MoveForCausalLM"},
        "move_config": model.config.to_dict(),
        **model.config.standard_names(),
        "tie_word_embeddings": False,
        # every passage starts with BOS, so the model predicts it where a passage ends:
        # it is the end-of-text token too, as <|endoftext|> is GPT-2's
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.bos_id,
        "pad_token_id": tokenizer.bos_id,
        "use_cache": True,
        "torch_dtype": "float32",
        # the checkpoint's own name (a run's step_NNNNNN), never a path of this machine
        "source_checkpoint": Path(checkpoint).resolve().name,
        "source_sha256": header["sha256"],
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    # Every training passage starts with BOS, and `move sample` puts it before the prompt:
    # the exported tokenizer adds it too. Batches are padded on the left (with BOS, masked).
    with_bos = HFTokenizer.from_str(tokenizer.hf.to_str())
    with_bos.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.bos_id)]
    )
    with_bos.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": bos,
                "eos_token": bos,
                "pad_token": bos,
                "add_bos_token": True,
                "padding_side": "left",
                "model_max_length": model.config.seq_len,
            },
            indent=2,
        )
    )
    generation = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.bos_id,
        "pad_token_id": tokenizer.bos_id,
        "max_length": model.config.seq_len,  # the context it was trained on (prompt included)
        "use_cache": True,
    }
    (tmp / "generation_config.json").write_text(json.dumps(generation))
    (tmp / "README.md").write_text(model_card(model, header, checkpoint))
    for file in tmp.iterdir():
        file.chmod(0o644)
    replace_directory(tmp, out_dir)
    return out_dir


def model_card(model, header: dict, checkpoint) -> str:
    """README.md of the export: what the model is, its parameters by group, the data it
    saw and its metrics at this checkpoint (from the run's metrics.jsonl when the
    checkpoint sits in a run directory)."""
    c = model.config
    task = header.get("meta", {}).get("task", {})
    step = header.get("meta", {}).get("step")
    records = read_metrics(Path(checkpoint).parent.parent)  # [] outside a run directory
    metrics = next((r for r in reversed(records) if r.get("step") == step), {})
    variant = {
        "standard": "standard attention values",
        "lave": f"LaVE x{c.memory_density}: per-layer value embeddings on layers {c.lave_layers}",
        "move": f"MoVE: a global bank of M = {c.n_slots} value slot(s) per token, mixed into every layer",
        "bigram": f"hashed bigram embeddings: {c.bigram_rows:,} rows added before every block",
        "pkm": f"a product-key memory of {c.pkm_keys**2:,} rows in place of layer {c.pkm_layer}'s MLP",
        "value_residual": "value residual: every layer mixes the first layer's values into its own",
    }[c.value_memory]
    lines = [
        f"# MoVE-project GPT ({c.value_memory}, {c.attention.upper()})",
        "",
        "Exported by `move export-hf` (the `mixture-of-value-embeddings` package). Load it with",
        "`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` and",
        "`AutoTokenizer.from_pretrained(path, trust_remote_code=True)`: the flag lets transformers read",
        "this folder's config, which is custom code; the tokenizer itself is a plain",
        "`PreTrainedTokenizerFast` (`PreTrainedTokenizerFast.from_pretrained(path)` needs no flag). It adds",
        "the BOS token the model was trained with. Batched generation: pad on the left (the tokenizer",
        "does) and pass the attention mask; each row then generates what it would alone.",
        "",
        "## Architecture",
        "",
        f"- {c.n_layer} layers, width {c.n_embd}, {c.n_head} heads ({c.kv_heads} key/value heads), "
        f"{c.attention.upper()} attention, context {c.seq_len} tokens, vocabulary {c.vocab_size:,}",
        f"- value memory: {variant}",
        "",
        "## Parameters by group",
        "",
        "| group | parameters |",
        "|---|---|",
    ]
    lines += [f"| {group} | {count:,} |" for group, count in count_params(model).items()]
    lines += [
        "",
        "## Training",
        "",
        f"- data: {task.get('source', 'unknown')} ({task.get('train_tokens', 'unknown')} training tokens)",
        f"- checkpoint step: {step if step is not None else 'unknown'}",
    ]
    shown = {k: v for k, v in metrics.items() if k in ("val_bpb", "train_loss", "tokens", "val_nll_bits")}
    lines += [f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in shown.items()]
    if "val_bpb" in shown:
        lines += [
            "",
            "val_bpb is bits per byte on the held-out split of the training data, scored in disjoint windows",
            "of the context length, each passage after its BOS token (`move eval`'s default protocol). The",
            "sliding-window protocol of the transformers docs is `move eval --protocol sliding`.",
        ]
    lines += ["", f"Source checkpoint: `{Path(checkpoint).resolve().name}`", ""]
    return card_metadata(c, task) + "\n".join(lines)


def card_metadata(c, task: dict) -> str:
    """The model card's YAML front matter, which the Hugging Face Hub indexes."""
    tags = ["move", "value-memory", c.value_memory, c.attention]
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "pipeline_tag: text-generation",
            "license: mit",
            f"tags: [{', '.join(tags)}]",
            f"datasets: [{task.get('source', 'unknown')}]",
            "---",
            "",
        ]
    )
