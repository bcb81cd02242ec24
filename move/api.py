"""One-line entry points for notebooks and scripts (no CLI needed).

Build, train, save and load a model, generate text, and measure bits per byte:

>>> from move import api
>>> model = api.build_model("tiny", value_memory="move", memory_density=2, vocab_size=512)
>>> model.config.n_slots, api.parameter_counts(model)["value_memory"] > 0
(2, True)
>>> summary = api.train(model, text_data, out=f"{tmp}/run", steps=4, batch_size=2, eval_every=4,
...                     eval_tokens=512, quiet=True)
>>> round(summary["val_bpb"], 1) > 0
True
>>> model, tokenizer = api.load(summary["checkpoint"])
>>> text = api.generate_text(model, tokenizer, "KING", max_tokens=8, seed=0)
>>> text.startswith("KING")
True
>>> api.bits_per_byte(model, text_data, max_tokens=1024) > 0
True

Class-conditional images with classifier-free guidance, and FID:

>>> image_model = api.build_model("tiny", value_memory="lave", vocab_size=28, seq_len=64)
>>> images = api.sample_images(image_model, image_data, labels=[0, 1, 2], cfg_scale=1.5, seed=0)
>>> tuple(images.shape), images.dtype
((3, 1, 8, 8), torch.uint8)
>>> api.fid(images.numpy(), images.numpy()) < 1e-3
True
"""

import torch

from move.config import DEFAULT_PRESET, model_config_from_preset
from move.config import RetrofitRun as RetrofitRun
from move.device import pick_device
from move.evaluation.bpb import bits_per_byte as bpb
from move.evaluation.fid import InceptionFeatures, fid_from_features
from move.export.retrofit import (  # a Hugging Face causal LM with a MoVE bank: see docs/retrofit.md
    load_retrofitted as load_retrofitted,
)
from move.export.retrofit import (
    memory_parameters as memory_parameters,
)
from move.export.retrofit import (
    retrofit as retrofit,
)
from move.export.retrofit import (
    retrofit_accounting as retrofit_accounting,
)
from move.export.retrofit_training import (  # `move retrofit` in one call (docs/retrofit.md)
    train_retrofit as train_retrofit,
)
from move.image.evaluate import generate_images
from move.image.prepare import load_prepared_images
from move.model.accounting import count_params
from move.model.gpt import GPT
from move.model.sampling import generate
from move.recipes import RunSpec, build_task, load_data, resolve_checkpoint, start_training
from move.text.loader import eval_windows
from move.text.prepare import load_prepared
from move.text.tokenizer import Tokenizer
from move.training.checkpoint import load_model, tokenizer_source
from move.training.trainer import TrainConfig, Trainer, prepare_model


def build_model(preset: str = DEFAULT_PRESET, seed: int = 0, **fields) -> GPT:
    """A GPT from a preset, any ModelConfig field overridden (value_memory,
    memory_density, attention, n_layer, ...)."""
    torch.manual_seed(seed)
    return GPT(model_config_from_preset(preset, **fields))


def parameter_counts(model) -> dict:
    """Parameters by group: token_embedding, lm_head, transformer_matrices, routers, value_memory, total."""
    return count_params(model)


def train(model, data, out, quiet: bool = False, **train_fields) -> dict:
    """Train `model` on prepared text or image-token data (`move prepare` /
    `move image-encode`) with the shared Trainer; returns the run summary."""
    config = TrainConfig(**train_fields).validate()
    task = build_task(load_data(data), model, config)
    prepare_model(model, config)
    return Trainer(model, task, config, out, quiet=quiet).run()


def run(spec: RunSpec, out, resume: bool = False, quiet: bool = False) -> dict:
    """Build and train the run a RunSpec describes (what `move train` does); returns
    the run summary."""
    return start_training(spec, out, resume=resume, quiet=quiet).run()


def load(checkpoint, device: str = "auto"):
    """(model, tokenizer) from a checkpoint or run directory; the tokenizer is that
    of the data the model was trained on (None for image models)."""
    checkpoint = resolve_checkpoint(checkpoint)
    model, header = load_model(checkpoint, pick_device(device))
    if header.get("meta", {}).get("task", {}).get("modality") == "image":
        return model, None
    return model, Tokenizer.load(tokenizer_source(checkpoint, header))


def generate_text(
    model,
    tokenizer,
    prompt: str,
    max_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 1.0,
    seed: int = 0,
) -> str:
    """Continue `prompt` with the KV-cache sampler."""
    ids = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(prompt)]], device=next(model.parameters()).device)
    out = generate(model, ids, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return tokenizer.decode(out[0].tolist())


def bits_per_byte(model, data, split: str = "val", max_tokens: int = 10**9, batch_size: int = 8) -> float:
    """Bits per byte of `model` on a prepared text split."""
    prepared = load_prepared(data)
    windows = eval_windows(prepared.tokens(split), model.config.seq_len, max_tokens, batch_size)
    return bpb(model, windows, torch.from_numpy(prepared.tokenizer.token_bytes()))


def sample_images(
    model, data, labels, cfg_scale: float | None = 1.5, temperature: float = 1.0, top_k: int = 0, seed: int = 0
) -> torch.Tensor:
    """uint8 images (N, C, H, W) of the given classes, with classifier-free guidance."""
    return generate_images(
        model, load_prepared_images(data), torch.as_tensor(labels), cfg_scale, temperature, top_k, seed
    )


def fid(images, reference_images) -> float:
    """FID between two sets of uint8 images (N, C, H, W) with the Inception-v3 FID
    network (biased upwards at small N: compare at equal sample counts)."""
    inception = InceptionFeatures()
    return fid_from_features(inception(images), inception(reference_images))
