"""Image tokenizers behind one interface:

    encode(images uint8 (N, C, H, W)) -> token grid int64 (N, h, w)
    decode(tokens (N, h, w))          -> images uint8 (N, C, H, W)
    codebook_size, grid (h, w), spec() (a JSON description that rebuilds it)

PixelQuantizer maps each gray level to a token (digits: 17 levels, exact), for
fast tests; VQTokenizer wraps a trained VQ-VAE checkpoint.
"""

from pathlib import Path

import numpy as np
import torch

from move.errors import ConfigError, DataError
from move.progress import progress
from move.training.checkpoint import load_model

ENCODE_BATCH = 512


def as_float(images) -> torch.Tensor:
    """uint8 images (array or tensor) -> float32 tensor in [0, 1]."""
    return torch.as_tensor(np.asarray(images)).float() / 255


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images * 255).round().clamp(0, 255).to(torch.uint8)


class PixelQuantizer:
    """Token = gray level of a pixel, quantised to `levels` values (grayscale only)."""

    def __init__(self, levels: int, image_shape: tuple[int, int, int]):
        if not 2 <= levels <= 256:
            raise ConfigError(f"pixel quantizer levels must be in [2, 256], got {levels}")
        if image_shape[0] != 1:
            raise ConfigError("the pixel quantizer is for grayscale images; use a VQ-VAE for colour")
        self.levels, self.image_shape = levels, tuple(image_shape)
        self.codebook_size = levels
        self.grid = tuple(image_shape[1:])

    def encode(self, images) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images)).float()
        return torch.round(x[:, 0] * (self.levels - 1) / 255).long()

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.round(tokens.float() * 255 / (self.levels - 1)).to(torch.uint8)[:, None]

    def spec(self) -> dict:
        return {"kind": "pixel", "levels": self.levels, "image_shape": list(self.image_shape)}


class VQTokenizer:
    def __init__(self, checkpoint, device="cpu"):
        self.checkpoint = Path(checkpoint)
        self.model, header = load_model(self.checkpoint, device, kind="vqvae")
        self.model.eval()
        self.weights_sha256 = header["sha256"]["model.safetensors"]
        c = self.model.config
        self.codebook_size, self.grid = c.codebook_size, (c.grid, c.grid)
        self.image_shape = (c.channels, c.image_size, c.image_size)
        self.device = device

    def encode(self, images) -> torch.Tensor:
        images = np.asarray(images)
        if tuple(images.shape[1:]) != self.image_shape:
            raise DataError(
                f"images of shape {tuple(images.shape[1:])} do not fit a VQ-VAE trained on {self.image_shape}"
            )
        return torch.cat(
            [
                self.model.encode(as_float(images[i : i + ENCODE_BATCH]).to(self.device)).cpu()
                for i in progress(range(0, len(images), ENCODE_BATCH), "encoding images", unit="batch")
            ]
        )

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                as_uint8(self.model.decode(tokens[i : i + ENCODE_BATCH].to(self.device))).cpu()
                for i in range(0, len(tokens), ENCODE_BATCH)
            ]
        )

    def spec(self) -> dict:
        return {"kind": "vqvae", "checkpoint": str(self.checkpoint.resolve()), "weights_sha256": self.weights_sha256}


def tokenizer_from_spec(spec: dict, device="cpu"):
    """Rebuild the tokenizer a prepared image dataset was encoded with."""
    if spec.get("kind") == "pixel":
        return PixelQuantizer(spec["levels"], tuple(spec["image_shape"]))
    if spec.get("kind") == "vqvae":
        tokenizer = VQTokenizer(spec["checkpoint"], device)
        if tokenizer.weights_sha256 != spec["weights_sha256"]:
            raise DataError(f"{spec['checkpoint']}: VQ-VAE weights changed since the data was encoded; re-encode")
        return tokenizer
    raise DataError(f"unknown image tokenizer kind {spec.get('kind')!r}")
