"""Building a training run (model, task, train config) from parsed command-line
flags; shared by `move train`, `move compare` and the image commands. One place
decides what a modality needs: text data gets the TextTask, image-token data the
class-conditional GenerationTask, with the vocabulary and sequence length taken
from the data unless the flags say otherwise."""

import dataclasses
from pathlib import Path

import torch

from move.config import ModelConfig, model_config_from_preset
from move.errors import UserError
from move.training.distributed import current, job_device, per_rank_batch
from move.training.optim import OptimConfig
from move.training.trainer import TrainConfig, checkpoint_dirs


def config_overrides(args, cls) -> dict:
    """The flags of `args` that set fields of dataclass `cls` (None = not given)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def train_config_from(args) -> TrainConfig:
    return TrainConfig(**config_overrides(args, TrainConfig), optim=OptimConfig(**config_overrides(args, OptimConfig))).validate()


def load_data(data_dir):
    """Prepared text (move prepare, knowledge-prepare) or image-token data
    (image-encode), loaded and verified once."""
    from move.image.prepare import is_prepared_images, load_prepared_images
    from move.text.prepare import load_prepared

    return load_prepared_images(data_dir) if is_prepared_images(data_dir) else load_prepared(data_dir)


def build_run(args):
    """-> (model, task, train_config) for `args.data`, text or image tokens."""
    from move.image.prepare import PreparedImages
    from move.model.gpt import GPT

    train_config = train_config_from(args)
    overrides = config_overrides(args, ModelConfig)
    data = load_data(args.data)
    if isinstance(data, PreparedImages):
        overrides.setdefault("vocab_size", data.layout.vocab_size)
        overrides.setdefault("seq_len", data.tokens_per_image)
    else:
        overrides.setdefault("vocab_size", data.tokenizer.vocab_size)
    model_config = model_config_from_preset(args.preset, **overrides)
    torch.manual_seed(train_config.seed)
    model = GPT(model_config).to(job_device(train_config.device))
    return model, build_task(data, model, train_config, getattr(args, "label_dropout", 0.1)), train_config


def build_task(data, model, train_config: TrainConfig, label_dropout: float = 0.1):
    """The task for loaded data (see load_data): text, knowledge corpus, or image
    tokens; checked against the model."""
    from move.image.prepare import PreparedImages
    from move.image.tasks import GenerationTask
    from move.text.task import KnowledgeTask, TextTask

    c = train_config
    batch, rank, world = per_rank_batch(c.batch_size), current().rank, current().world_size
    if isinstance(data, PreparedImages):
        eval_images = max(1, c.eval_tokens // data.tokens_per_image)
        task = GenerationTask(data, batch, c.loader_seed, eval_images, label_dropout, rank, world)
    else:
        task_class = KnowledgeTask if (Path(data.directory) / "knowledge.json").exists() else TextTask
        task = task_class(data, model.config.seq_len, batch, c.loader_seed, c.eval_tokens, rank, world)
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
