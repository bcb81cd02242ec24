"""A small CNN classifier, trained by the shared Trainer on the same dataset as
the generator, that scores the class accuracy of conditional samples (its own
test accuracy is always reported next to that score)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from move.config import ClassifierConfig


class ImageClassifier(nn.Module):
    kind = "classifier"  # recorded in checkpoints (move.training.checkpoint.model_classes)
    config_class = ClassifierConfig

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = c = config.validate()
        self.features = nn.Sequential(
            nn.Conv2d(c.channels, c.hidden, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(c.hidden, 2 * c.hidden, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(2 * c.hidden, 2 * c.hidden, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(2 * c.hidden, c.num_classes)

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None):
        """images in [0, 1] -> logits, or the cross-entropy loss when targets are given."""
        logits = self.head(self.features(images * 2 - 1).flatten(1))
        return logits if targets is None else F.cross_entropy(logits, targets)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        return torch.cat([self(images[i : i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)])
