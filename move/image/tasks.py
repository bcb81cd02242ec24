"""The image tasks for the shared training loop (see move/training/trainer.py):

    ReconstructionTask   trains the VQ-VAE tokenizer (targets = the images)
    ClassificationTask   trains the classifier that scores conditional samples
    GenerationTask       trains the class-conditional autoregressive GPT

Batches come from the shared EpochSampler, so every image run is exactly
resumable and sliceable across ranks like the text runs. Randomness inside a
batch (the class-label dropout) is drawn from (seed, epoch, cursor), so it is
reproduced on resume without storing a generator.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from move.device import evaluating
from move.errors import DataError
from move.image.datasets import ImageDataset
from move.image.prepare import PreparedImages
from move.image.tokenizers import as_float
from move.progress import progress
from move.training.distributed import all_reduce_sum, split_for_ranks
from move.training.sampler import EpochSampler

EVAL_BATCH = 256


class ExampleLoader:
    """next_batch() = make_batch(indices, uniforms) over a seeded EpochSampler.

    uniforms holds one U[0, 1) number per example of this rank's slice, drawn for
    the whole global batch from (seed, epoch, cursor) and then sliced, so an
    example gets the same number whatever the number of processes."""

    def __init__(self, n: int, make_batch, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.sampler = EpochSampler(n, batch_size, seed, rank, world_size)
        self.make_batch = make_batch

    def next_batch(self):
        s = self.sampler
        uniforms = np.random.default_rng([s.seed, s.epoch, s.cursor]).random(s.batch_size * s.world_size)
        return self.make_batch(s.next_indices(), uniforms[s.rank * s.batch_size : (s.rank + 1) * s.batch_size])

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def _dataset_description(dataset: ImageDataset, eval_images: int) -> dict:
    return {
        "dataset": dataset.name,
        "image_shape": list(dataset.shape),
        "num_classes": dataset.num_classes,
        "train_images": len(dataset.train_labels),
        "eval_images": min(eval_images, len(dataset.test_labels)),
    }


class ReconstructionTask:
    def __init__(self, dataset: ImageDataset, batch_size: int, seed: int, eval_images: int, rank=0, world_size=1):
        self.dataset, self.eval_images = dataset, eval_images
        self.tokens_per_example = int(np.prod(dataset.shape[1:]))  # pixels
        images = dataset.train_images

        def make_batch(indices, uniforms):
            x = as_float(images[indices])
            return x, x

        self.loader = ExampleLoader(len(images), make_batch, batch_size, seed, rank, world_size)

    def check_model(self, model) -> None:
        c = model.config
        if (c.channels, c.image_size, c.image_size) != tuple(self.dataset.shape):
            raise DataError(
                f"VQ-VAE for {c.channels}x{c.image_size}x{c.image_size} images, dataset has {self.dataset.shape}"
            )

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        """Reconstruction error and codebook usage on the test split."""
        with evaluating(model):
            device = next(model.parameters()).device
            images = self.dataset.test_images[: self.eval_images]
            squared_error, counts = 0.0, torch.zeros(model.config.codebook_size)
            for i in range(0, len(images), EVAL_BATCH):
                x = as_float(images[i : i + EVAL_BATCH]).to(device)
                ids = model.encode(x)
                squared_error += F.mse_loss(model.decode(ids), x, reduction="sum").item()
                counts += torch.bincount(ids.flatten().cpu(), minlength=model.config.codebook_size).float()
        mse = squared_error / images.size
        p = counts / counts.sum()
        entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
        return {
            "recon_mse": mse,
            "psnr_db": 10 * math.log10(1 / max(mse, 1e-12)),
            "codebook_usage": (counts > 0).float().mean().item(),
            "code_perplexity": math.exp(entropy),
        }

    def describe(self) -> dict:
        return {"modality": "image-tokenizer", **_dataset_description(self.dataset, self.eval_images)}


class ClassificationTask:
    def __init__(self, dataset: ImageDataset, batch_size: int, seed: int, eval_images: int, rank=0, world_size=1):
        self.dataset, self.eval_images = dataset, eval_images
        self.tokens_per_example = int(np.prod(dataset.shape[1:]))
        images, labels = dataset.train_images, dataset.train_labels

        def make_batch(indices, uniforms):
            return as_float(images[indices]), torch.from_numpy(labels[indices])

        self.loader = ExampleLoader(len(labels), make_batch, batch_size, seed, rank, world_size)

    def check_model(self, model) -> None:
        c = model.config
        if (c.channels, c.image_size, c.image_size) != tuple(
            self.dataset.shape
        ) or c.num_classes != self.dataset.num_classes:
            raise DataError(
                f"classifier for {c.num_classes} classes of {c.channels}x{c.image_size}x{c.image_size} "
                f"images; the dataset has {self.dataset.num_classes} classes of {self.dataset.shape}"
            )

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        with evaluating(model):
            device = next(model.parameters()).device
            images = as_float(self.dataset.test_images[: self.eval_images]).to(device)
            labels = torch.from_numpy(self.dataset.test_labels[: self.eval_images]).to(device)
            accuracy = (model.predict(images) == labels).float().mean().item()
        return {"test_accuracy": accuracy}

    def describe(self) -> dict:
        return {"modality": "image-classifier", **_dataset_description(self.dataset, self.eval_images)}


def conditional_sequences(tokens: np.ndarray, labels: np.ndarray, layout) -> tuple[torch.Tensor, torch.Tensor]:
    """LlamaGen layout: inputs = [class token, t0 .. t(n-2)], targets = [t0 .. t(n-1)]:
    position 0 (the class) predicts the first image token."""
    tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    classes = torch.as_tensor(layout.class_token(np.asarray(labels, dtype=np.int64)))[:, None]
    return torch.cat([classes, tokens[:, :-1]], dim=1), tokens


class GenerationTask:
    """Class-conditional image-token modelling; labels are replaced by the null
    class with probability label_dropout (classifier-free guidance)."""

    def __init__(
        self,
        data: PreparedImages,
        batch_size: int,
        seed: int,
        eval_images: int,
        label_dropout: float = 0.1,
        rank=0,
        world_size=1,
    ):
        if not 0 <= label_dropout < 1:
            raise DataError(f"label_dropout must be in [0, 1), got {label_dropout}")
        self.data, self.eval_images, self.batch_size = data, eval_images, batch_size
        self.layout, self.label_dropout = data.layout, label_dropout
        self.tokens_per_example = data.tokens_per_image
        tokens, labels = data.tokens("train"), data.labels("train")
        null = self.layout.null_token - self.layout.codebook_size  # the null "label"

        def make_batch(indices, uniforms):
            batch_labels = labels[indices].copy()
            batch_labels[uniforms < label_dropout] = null
            return conditional_sequences(tokens[indices], batch_labels, self.layout)

        self.loader = ExampleLoader(len(labels), make_batch, batch_size, seed, rank, world_size)

    def checkpoint_files(self) -> dict[str, bytes]:
        """Decoding goes into every checkpoint: samples need neither the data nor the
        tokenizer's run directory."""
        return self.data.decoding_files()

    def check_model(self, model) -> None:
        c = model.config
        if c.vocab_size != self.layout.vocab_size:
            raise DataError(
                f"model vocab_size {c.vocab_size}, the image data needs {self.layout.vocab_size} "
                f"({self.layout.codebook_size} codes + {self.layout.num_classes} classes + null)"
            )
        if c.seq_len < self.tokens_per_example:
            raise DataError(f"model seq_len {c.seq_len} is shorter than an image ({self.tokens_per_example} tokens)")

    @torch.no_grad()
    def evaluate(self, model) -> dict:
        return {"val_nll_bits": image_nll_bits(model, self.data, "test", self.eval_images, self.batch_size)}

    def describe(self) -> dict:
        m = self.data.manifest
        return {
            "modality": "image",
            "data": str(self.data.directory.resolve()),
            "dataset": m["dataset"]["name"],
            "tokenizer": m["tokenizer"],
            "codebook_size": m["codebook_size"],
            "grid": m["grid"],
            "num_classes": self.layout.num_classes,
            "label_dropout": self.label_dropout,
            "train_images": len(self.data.labels("train")),
            "eval_images": min(self.eval_images, len(self.data.labels("test"))),
        }


@torch.no_grad()
def image_nll_bits(model, data: PreparedImages, split: str, max_images: int, batch_size: int = EVAL_BATCH) -> float:
    """Mean negative log-likelihood of the image tokens given the true class, in
    bits per token. The softmax is taken over the image codes only: class tokens
    can never follow position 0, so they are not candidates."""
    with evaluating(model):
        device = next(model.parameters()).device
        tokens, labels = data.tokens(split)[:max_images], data.labels(split)[:max_images]
        total, count = 0.0, 0
        for i, counts in progress(split_for_ranks(range(0, len(labels), batch_size)), "image NLL", unit="batch"):
            x, y = conditional_sequences(tokens[i : i + batch_size], labels[i : i + batch_size], data.layout)
            logits = model(x.to(device))[..., : data.layout.codebook_size].float()
            if counts:
                total += F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
                count += y.numel()
    total, count = all_reduce_sum([total, count], device)
    return total / count / math.log(2)
