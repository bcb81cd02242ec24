"""A small VQ-VAE image tokenizer in the LlamaGen spirit.

Convolutional encoder (each stage halves the resolution: 28x28 -> 7x7 with two
stages), an l2-normalised codebook looked up by cosine similarity (LlamaGen:
normalising both sides keeps codes on the sphere, which keeps codebook usage
high with low-dimensional codes), straight-through gradients, and the usual
codebook + commitment losses. It is trained by the shared Trainer: forward
(images, targets) returns the loss, with targets = the images themselves.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from move.config import VQConfig


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class VQVAE(nn.Module):
    kind = "vqvae"  # recorded in checkpoints (move.training.checkpoint.model_classes)
    config_class = VQConfig

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = c = config.validate()
        down = [nn.Conv2d(c.channels, c.hidden, 3, padding=1)]
        for _ in range(c.downsample):
            down += [nn.ReLU(), nn.Conv2d(c.hidden, c.hidden, 4, stride=2, padding=1)]
        self.encoder = nn.Sequential(*down, ResBlock(c.hidden), nn.ReLU(), nn.Conv2d(c.hidden, c.code_dim, 1))
        up = [nn.Conv2d(c.code_dim, c.hidden, 3, padding=1), ResBlock(c.hidden)]
        for _ in range(c.downsample):
            up += [nn.ReLU(), nn.ConvTranspose2d(c.hidden, c.hidden, 4, stride=2, padding=1)]
        self.decoder = nn.Sequential(*up, nn.ReLU(), nn.Conv2d(c.hidden, c.channels, 3, padding=1))
        self.codebook = nn.Embedding(c.codebook_size, c.code_dim)

    def _normalised_codebook(self) -> torch.Tensor:
        return F.normalize(self.codebook.weight, dim=-1)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (N, D, h, w) -> (normalised z, its nearest normalised code, code ids (N, h, w))."""
        z = F.normalize(z, dim=1)
        codes = self._normalised_codebook()
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.size(1))
        ids = (flat @ codes.t()).argmax(dim=-1)  # max cosine = min l2 distance on the sphere
        zq = codes[ids].view(z.size(0), z.size(2), z.size(3), -1).permute(0, 3, 1, 2)
        return z, zq, ids.view(z.size(0), z.size(2), z.size(3))

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None):
        """images in [0, 1] -> loss (reconstruction + codebook + beta * commitment)."""
        z, zq, _ = self.quantize(self.encoder(images * 2 - 1))
        codebook_loss = F.mse_loss(zq, z.detach())
        commitment_loss = F.mse_loss(z, zq.detach())
        recon = self.decoder(z + (zq - z).detach())  # straight-through estimator
        target = images if targets is None else targets
        return F.mse_loss(recon, target * 2 - 1) + codebook_loss + self.config.commitment * commitment_loss

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, C, H, W) in [0, 1] -> code ids (N, h, w)."""
        return self.quantize(self.encoder(images * 2 - 1))[2]

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """code ids (N, h, w) -> images (N, C, H, W) in [0, 1]."""
        zq = self._normalised_codebook()[ids].permute(0, 3, 1, 2)
        return ((self.decoder(zq) + 1) / 2).clamp(0, 1)
