"""Class-conditional sampling with classifier-free guidance, and image grids.

With guidance the batch is doubled: rows [0, B) carry the class tokens, rows
[B, 2B) the null class; both halves go through one KV-cached forward per
position, and the next token is drawn from the mixed logits
    u + s * (c - u), computed as s * c + (1 - s) * u
(the second form is exactly c at s = 1 and exactly u at s = 0, so guidance
reduces bit for bit to plain conditional / unconditional sampling). The sampled
token is fed to both halves. Only image codes are candidates.
"""

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from move.device import evaluating
from move.errors import ConfigError
from move.image.prepare import ClassTokens
from move.model.sampling import check_sampling_args, pick_next


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * cond + (1 - scale) * uncond


@torch.no_grad()
def sample_image_tokens(
    model,
    labels: torch.Tensor,
    layout: ClassTokens,
    n_tokens: int,
    cfg_scale: float | None = 1.5,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
) -> torch.Tensor:
    """labels (B,) class indices, or layout.num_classes for the null class ->
    image tokens (B, n_tokens). cfg_scale None: no unconditional half (plain
    conditional sampling)."""
    check_sampling_args(temperature, top_k, 1.0, n_tokens, seed)
    if cfg_scale is not None and not math.isfinite(cfg_scale):
        raise ConfigError(f"cfg_scale must be a finite number, got {cfg_scale}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > layout.num_classes):
        raise ConfigError(f"class labels must lie in [0, {layout.num_classes}] ({layout.num_classes} = null)")
    if n_tokens > model.config.seq_len:
        raise ConfigError(f"{n_tokens} image tokens do not fit the model's seq_len {model.config.seq_len}")
    with evaluating(model):
        device = next(model.parameters()).device
        B, codes = labels.numel(), layout.codebook_size
        prefix = layout.class_token(labels.to(device).view(B, 1))
        guided = cfg_scale is not None
        if guided:
            prefix = torch.cat([prefix, torch.full_like(prefix, layout.null_token)])
        generator = torch.Generator(device=device).manual_seed(seed)
        cache = model.new_cache(prefix.size(0), n_tokens)
        logits = model(prefix, cache=cache)[:, -1, :codes]
        out = []
        for i in range(n_tokens):
            if guided:
                logits = guided_logits(logits[:B], logits[B:], cfg_scale)
            nxt = pick_next(logits, temperature, top_k, 1.0, generator)
            out.append(nxt)
            if i + 1 < n_tokens:
                logits = model(torch.cat([nxt, nxt]) if guided else nxt, cache=cache)[:, -1, :codes]
    return torch.cat(out, dim=1)


def class_grid_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """0,0,..,1,1,..: one grid row per class."""
    return torch.arange(num_classes).repeat_interleave(per_class)


GRID_CELL_PIXELS = 96  # images are enlarged (nearest neighbour) to about this size, so 8x8 digits can be judged


def grid_scale(height: int) -> int:
    return max(1, math.ceil(GRID_CELL_PIXELS / height))


def save_grid(
    images: torch.Tensor,
    columns: int,
    path,
    scale: int | None = None,
    pad: int = 1,
    row_labels: list[str] | None = None,
) -> None:
    """uint8 images (N, C, H, W) -> one PNG, `columns` per row, with a padding line
    between cells, each pixel enlarged `scale` times (default: cells of about
    GRID_CELL_PIXELS), and row_labels (class names) written in a left margin.
    Hand-written: torchvision's make_grid would pull a second torch build onto a CPU
    machine; this is a reshape."""
    n, c, h, w = images.shape
    rows = -(-n // columns)
    canvas = np.full((c, rows * (h + pad) + pad, columns * (w + pad) + pad), 255, dtype=np.uint8)
    for i, image in enumerate(images.cpu().numpy()):
        r, k = divmod(i, columns)
        canvas[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = image
    picture = Image.fromarray(canvas[0] if c == 1 else canvas.transpose(1, 2, 0)).convert("RGB")
    scale = scale or grid_scale(h)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    if row_labels:
        font = ImageFont.load_default(size=max(10, min(18, (h + pad) * scale // 3)))
        margin = max(int(font.getlength(label)) for label in row_labels) + 12
        labelled = Image.new("RGB", (picture.width + margin, picture.height), "white")
        labelled.paste(picture, (margin, 0))
        draw = ImageDraw.Draw(labelled)
        for r, label in enumerate(row_labels[:rows]):
            draw.text((6, (pad + r * (h + pad) + h / 2) * scale), label, fill="black", font=font, anchor="lm")
        picture = labelled
    picture.save(path)
