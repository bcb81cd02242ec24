"""Sample-based metrics of a class-conditional image model: FID against the
test split, class accuracy of conditional samples under the project's own
classifier (its test accuracy reported alongside), and validation NLL."""

import os

import numpy as np
import torch

from move.evaluation.fid import InceptionFeatures, fid_from_features
from move.image.prepare import PreparedImages
from move.image.sampling import class_grid_labels, sample_image_tokens, save_grid
from move.image.tasks import image_nll_bits
from move.image.tokenizers import as_float
from move.progress import progress
from move.training.checkpoint import load_model

SAMPLE_BATCH = 250


def reference_features(
    data: PreparedImages, test_images: np.ndarray, n: int, inception: InceptionFeatures
) -> np.ndarray:
    """Inception features of the first n test images, cached in the data directory."""
    path = data.directory / f"fid_reference_test_{n}.npy"
    if path.is_file():
        return np.load(path)
    features = inception(test_images[:n])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, features)
    os.replace(tmp, path)
    return features


@torch.no_grad()
def generate_images(
    model,
    data: PreparedImages,
    labels: torch.Tensor,
    cfg_scale,
    temperature: float,
    top_k: int,
    seed: int,
    tokenizer=None,
) -> torch.Tensor:
    """Decoded uint8 samples for the given labels, in batches (seed + batch index)."""
    tokenizer = tokenizer or data.tokenizer()
    h, w = data.manifest["grid"]
    out = []
    for b, i in enumerate(progress(range(0, len(labels), SAMPLE_BATCH), "sampling images", unit="batch")):
        tokens = sample_image_tokens(
            model, labels[i : i + SAMPLE_BATCH], data.layout, h * w, cfg_scale, temperature, top_k, seed + b
        )
        out.append(tokenizer.decode(tokens.cpu().view(-1, h, w)))
    return torch.cat(out)


def evaluate_generator(
    model,
    data: PreparedImages,
    classifier_checkpoint,
    num_samples: int,
    cfg_scale: float,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    grid_path=None,
    grid_per_class: int = 10,
) -> dict:
    """FID (num_samples class-balanced samples vs num_samples test images), class
    accuracy and its classifier's test accuracy, NLL bits per token; optionally a
    grid with one row per class."""
    classifier, _ = load_model(classifier_checkpoint, "cpu", kind="classifier")  # fail before the slow part
    classifier.eval()
    tokenizer, dataset = data.tokenizer(), data.dataset()  # once: samples and grid share them
    C = data.layout.num_classes
    labels = torch.arange(num_samples) % C
    samples = generate_images(model, data, labels, cfg_scale, temperature, top_k, seed, tokenizer)
    inception = InceptionFeatures()
    fid = fid_from_features(
        inception(samples.numpy()), reference_features(data, dataset.test_images, num_samples, inception)
    )
    sample_accuracy = (classifier.predict(as_float(samples)) == labels).float().mean().item()
    test_accuracy = (
        (classifier.predict(as_float(dataset.test_images)) == torch.from_numpy(dataset.test_labels))
        .float()
        .mean()
        .item()
    )
    result = {
        "fid": fid,
        "fid_samples": num_samples,
        "class_accuracy": sample_accuracy,
        "classifier_test_accuracy": test_accuracy,
        "val_nll_bits": image_nll_bits(model, data, "test", len(data.labels("test"))),
        "cfg_scale": cfg_scale,
        "temperature": temperature,
        "top_k": top_k,
        "seed": seed,
    }
    if grid_path:
        grid_labels = class_grid_labels(C, grid_per_class)
        grid = generate_images(model, data, grid_labels, cfg_scale, temperature, top_k, seed + 10**6, tokenizer)
        save_grid(grid, grid_per_class, grid_path, row_labels=data.manifest["class_names"])
        result["grid"] = str(grid_path)
    return result
