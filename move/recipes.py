"""Recipes: what a run is, and how it becomes a model, a task and a training config.

A `RunSpec` describes one GPT training run completely: the prepared data, the model
shape (a preset plus ModelConfig fields), the training config (with its optimiser
config) and, for class-conditional images, the label dropout. Every entry point -
`move train`, `move compare`, `move experiment` and `move.api` - builds a RunSpec and
hands it to `build_run`; no parsed command line crosses a module boundary.

One place decides what a modality needs: text data gets the TextTask, a knowledge
corpus the KnowledgeTask, image-token data the class-conditional GenerationTask,
with the vocabulary and sequence length taken from the data unless the spec says
otherwise. The variant names of experiments and comparisons ("move:4") live here too.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from move.config import DEFAULT_PRESET, LABEL_DROPOUT, ModelConfig, model_config_from_preset, run_config_text
from move.errors import ConfigError, UserError
from move.image.prepare import PreparedImages, is_prepared_images, load_prepared_images
from move.image.tasks import GenerationTask
from move.knowledge.task import KnowledgeTask
from move.model.gpt import GPT
from move.text.prepare import load_prepared
from move.text.task import TextTask
from move.training.checkpoint import load_model
from move.training.distributed import current, job_device, per_rank_batch
from move.training.init_from import initialise_from
from move.training.trainer import TrainConfig, Trainer, checkpoint_dirs, prepare_model

# name -> model-config fields; the ablations isolate g0 and global sharing; the
# other memory designs (move/model/memory_designs.py) compare against MoVE
VARIANT_FIELDS = {
    "standard": dict(value_memory="standard"),
    "lave": dict(value_memory="lave"),
    "move": dict(value_memory="move"),
    "move-nog0": dict(value_memory="move", move_gate_g0=False),
    "lave-full": dict(value_memory="lave", lave_full_gates=True),
    "bigram": dict(value_memory="bigram"),
    "pkm": dict(value_memory="pkm"),
    "value-residual": dict(value_memory="value_residual"),
}
UNSIZED_VARIANTS = {"standard": "standard", "value-residual": "value_residual"}  # name -> run name, no density


def parse_variant(spec: str) -> tuple[str, dict]:
    """'move:4' -> ('move_x4', {value_memory: move, memory_density: 4})."""
    name, _, density = spec.partition(":")
    if name not in VARIANT_FIELDS:
        raise ConfigError(f"unknown variant {name!r} in {spec!r}; choose from {', '.join(VARIANT_FIELDS)}")
    fields = dict(VARIANT_FIELDS[name])
    if name in UNSIZED_VARIANTS:
        if density:
            raise ConfigError(f"{name} has no memory table to size; drop the density in {spec!r}")
        return UNSIZED_VARIANTS[name], fields
    try:
        k = int(density or 1)
    except ValueError:
        raise ConfigError(f"memory density in {spec!r} must be an integer") from None
    if k < 1:
        raise ConfigError(f"memory density in {spec!r} must be >= 1")
    return f"{name}_x{k}", {**fields, "memory_density": k}


@dataclass
class RunSpec:
    data: str  # prepared text, knowledge corpus or image tokens
    preset: str = DEFAULT_PRESET
    model: dict = field(default_factory=dict)  # ModelConfig fields over the preset (vocab and seq_len: from the data)
    train: TrainConfig = field(default_factory=TrainConfig)
    label_dropout: float = LABEL_DROPOUT

    def with_model(self, **fields) -> "RunSpec":
        """The same run with other model fields (a variant, a size)."""
        return dataclasses.replace(self, model={**self.model, **fields})

    def with_train(self, **fields) -> "RunSpec":
        """The same run with other TrainConfig fields (e.g. another length)."""
        return dataclasses.replace(self, train=dataclasses.replace(self.train, **fields))


def load_data(data_dir):
    """Prepared text (move prepare, knowledge-prepare) or image-token data
    (image-encode), loaded and verified once."""
    return load_prepared_images(data_dir) if is_prepared_images(data_dir) else load_prepared(data_dir)


def model_config_for(spec: RunSpec, data) -> ModelConfig:
    """The model a spec gets on loaded data: the preset, the spec's fields over it, and
    the vocabulary (image data: also the sequence length) from the data unless given."""
    fields = dict(spec.model)
    if isinstance(data, PreparedImages):
        fields.setdefault("vocab_size", data.layout.vocab_size)
        fields.setdefault("seq_len", data.tokens_per_image)
    else:
        fields.setdefault("vocab_size", data.tokenizer.vocab_size)
    return model_config_from_preset(spec.preset, **fields)


def build_run(spec: RunSpec, resuming: bool = False):
    """-> (model prepared for training, task, train_config) for the spec's data. A run
    with init_from starts from that checkpoint, unless it resumes from its own."""
    train_config = spec.train.validate()
    data = load_data(spec.data)
    torch.manual_seed(train_config.seed)
    model = build_training_model(model_config_for(spec, data), train_config)
    if train_config.init_from and not resuming:
        checkpoint = resolve_checkpoint(train_config.init_from)
        source, _ = load_model(checkpoint, "cpu")
        initialise_from(model, source, train_config.init_new_memory, f"--init-from {checkpoint}")
    task = build_task(data, model, train_config, spec.label_dropout)
    return model, task, train_config


def build_training_model(config: ModelConfig, train_config: TrainConfig) -> GPT:
    """A GPT prepared for training on this job's device. Under torchrun it is built
    empty (meta device), its tables cut to this rank's rows, then allocated and
    initialised: no rank ever holds a whole table."""
    device = job_device(train_config.device)
    if not current().active:
        model = GPT(config).to(device)
        prepare_model(model, train_config)
        return model
    with torch.device("meta"):
        model = GPT(config)
    prepare_model(model, train_config)
    model.materialize(device)
    return model


def start_training(spec: RunSpec, run_dir, **trainer_options) -> Trainer:
    """A Trainer for the spec's run in run_dir, which records the run's effective
    config (config.toml) when it starts the directory."""
    resuming = bool(trainer_options.get("resume")) and bool(checkpoint_dirs(run_dir))
    model, task, train_config = build_run(spec, resuming)
    launch = run_config_text(spec.data, spec.preset, spec.label_dropout, model.config, train_config)
    return Trainer(model, task, train_config, run_dir, launch_config=launch, **trainer_options)


def build_task(data, model, train_config: TrainConfig, label_dropout: float = 0.1):
    """The task for loaded data (see load_data): text, knowledge corpus, or image
    tokens; checked against the model."""
    c = train_config
    batch, rank, world = per_rank_batch(c.batch_size), current().rank, current().world_size
    if isinstance(data, PreparedImages):
        eval_images = max(1, c.eval_tokens // data.tokens_per_image)
        task = GenerationTask(data, batch, c.loader_seed, eval_images, label_dropout, rank, world)
    else:
        task_class = KnowledgeTask if (Path(data.directory) / "knowledge.json").exists() else TextTask
        mixed_in = load_prepared(c.mix_data) if c.mix_data else None
        task = task_class(
            data, model.config.seq_len, batch, c.loader_seed, c.eval_tokens, rank, world, mixed_in, c.mix_fraction
        )
    task.check_model(model)
    return task


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory, or a run directory (-> its newest checkpoint)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    found = checkpoint_dirs(path) if (path / "checkpoints").is_dir() else []
    if not found:
        raise UserError(f"{path}: neither a checkpoint nor a run directory with checkpoints")
    return found[-1]
