"""Encode an image dataset once into token grids, with a manifest verified on load.

Layout of a prepared image directory:
    manifest.json                  dataset, tokenizer spec, vocabulary layout, counts, checksums
    {train,test}_tokens.npy        uint16 (N, h*w): image tokens in raster order
    {train,test}_labels.npy        int64 (N,)

Vocabulary of the class-conditional model (LlamaGen layout), see ClassTokens:
    0 .. K-1          image codes
    K .. K+C-1        one token per class, only ever at position 0
    K+C               the null class (classifier-free guidance)
"""

import hashlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from move.errors import DataError
from move.files import existing_data, read_manifest, replace_directory, temporary_sibling
from move.image.datasets import ImageDataset, load_image_dataset
from move.image.tokenizers import tokenizer_from_spec
from move.readers import fields_of, inner_file_name, parse_json
from move.training.checkpoint import read_verified

FORMAT = "move-image-data"
MANIFEST = "manifest.json"
# In the checkpoints of a model trained on image data: what decoding its tokens needs
DECODING = "image_decoding.json"  # the data's manifest: layout, grid, class names, tokenizer spec
VQ_COPY = "image_tokenizer"  # a VQ-VAE tokenizer's own checkpoint, copied whole
SPLITS = ("train", "test")


@dataclass(frozen=True)
class ClassTokens:
    """Where class and null-class tokens sit in the vocabulary."""

    codebook_size: int
    num_classes: int

    def class_token(self, labels):
        return self.codebook_size + labels

    @property
    def null_token(self) -> int:
        return self.codebook_size + self.num_classes

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.num_classes + 1


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encode_dataset(dataset: ImageDataset, tokenizer, source: dict, out_dir, force: bool = False) -> dict:
    """Tokenise both splits into `out_dir` (built in a temporary sibling, renamed
    into place; an existing directory is replaced only with force)."""
    out_dir = Path(out_dir)
    recipe = {"dataset": {"name": dataset.name, **source}, "tokenizer": tokenizer.spec()}
    kept = existing_data(out_dir, force, recipe, lambda m: {"dataset": m["dataset"], "tokenizer": m["tokenizer"]})
    if kept is not None:
        return kept
    if tuple(dataset.shape) != tuple(getattr(tokenizer, "image_shape", dataset.shape)):
        raise DataError(
            f"the tokenizer expects images of shape {tokenizer.image_shape}, the dataset has {dataset.shape}"
        )
    tmp = temporary_sibling(out_dir)
    splits = {}
    try:
        for split in SPLITS:
            images, labels = dataset.split(split)
            tokens = tokenizer.encode(images).reshape(len(images), -1).numpy().astype(np.uint16)
            files = {f"{split}_tokens.npy": _npy_bytes(tokens), f"{split}_labels.npy": _npy_bytes(labels)}
            for name, data in files.items():
                (tmp / name).write_bytes(data)
            splits[split] = {
                "examples": len(labels),
                "sha256": {n: hashlib.sha256(d).hexdigest() for n, d in files.items()},
            }
        manifest = {
            "format": FORMAT,
            "dataset": {"name": dataset.name, **source},
            "image_shape": list(dataset.shape),
            "class_names": dataset.class_names,
            "tokenizer": tokenizer.spec(),
            "codebook_size": tokenizer.codebook_size,
            "grid": list(tokenizer.grid),
            "splits": splits,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        replace_directory(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


@dataclass
class PreparedImages:
    directory: Path
    manifest: dict
    arrays: dict[str, np.ndarray]

    @property
    def layout(self) -> ClassTokens:
        return ClassTokens(self.manifest["codebook_size"], len(self.manifest["class_names"]))

    @property
    def tokens_per_image(self) -> int:
        return int(np.prod(self.manifest["grid"]))

    def tokens(self, split: str) -> np.ndarray:
        return self.arrays[f"{split}_tokens.npy"]

    def labels(self, split: str) -> np.ndarray:
        return self.arrays[f"{split}_labels.npy"]

    def tokenizer(self, device="cpu"):
        spec = self.manifest["tokenizer"]
        if spec.get("kind") == "vqvae":  # a copy inside a checkpoint is named relative to it
            spec = {**spec, "checkpoint": str(self.directory / spec["checkpoint"])}
        return tokenizer_from_spec(spec, device)

    def decoding_files(self) -> dict[str, bytes]:
        """What a checkpoint of a model trained on this data carries so that its samples
        can be decoded with nothing else: the manifest and, for a VQ-VAE, its checkpoint
        (read back by decoding_from_checkpoint)."""
        manifest = {k: v for k, v in self.manifest.items() if k != "splits"}
        files = {}
        if manifest["tokenizer"]["kind"] == "vqvae":
            source = Path(self.directory) / manifest["tokenizer"]["checkpoint"]
            for name in ("config.json", "model.safetensors"):
                files[f"{VQ_COPY}/{name}"] = (source / name).read_bytes()
            manifest["tokenizer"] = {**manifest["tokenizer"], "checkpoint": VQ_COPY}
        return {**files, DECODING: json.dumps(manifest, indent=2).encode()}

    def dataset(self) -> ImageDataset:
        """The source images (FID reference, classifier training)."""
        d = self.manifest["dataset"]
        return load_image_dataset(d["source"], d.get("root"), d.get("image_size", 32), d.get("channels", 3))


def decoding_from_checkpoint(checkpoint, header: dict) -> PreparedImages | None:
    """The decoding half of the image data a checkpoint's model was trained on (no
    token arrays), from the checkpoint's own copy; None for checkpoints without one."""
    if DECODING not in header.get("sha256", {}):
        return None
    manifest = parse_json(read_verified(Path(checkpoint), DECODING, header), Path(checkpoint) / DECODING)
    return PreparedImages(directory=Path(checkpoint), manifest=manifest, arrays={})


def is_prepared_images(directory) -> bool:
    try:
        read_manifest(directory, MANIFEST, FORMAT, "")
        return True
    except DataError:
        return False


def load_prepared_images(directory) -> PreparedImages:
    directory = Path(directory)
    manifest = read_manifest(directory, MANIFEST, FORMAT, "no prepared image data; run `move image-encode` first")
    arrays = {}
    where = directory / MANIFEST
    with fields_of(where):  # a manifest with the right format field can still be damaged
        for split in SPLITS:
            for name, digest in manifest["splits"][split]["sha256"].items():
                file = directory / inner_file_name(name, where)
                if not file.is_file():
                    raise DataError(f"{file}: missing shard")
                data = file.read_bytes()
                if hashlib.sha256(data).hexdigest() != digest:
                    raise DataError(f"{file}: checksum does not match the manifest (corrupted shard)")
                arrays[name] = np.load(io.BytesIO(data), allow_pickle=False)
            tokens, labels = arrays[f"{split}_tokens.npy"], arrays[f"{split}_labels.npy"]
            if len(tokens) != len(labels) or len(labels) != manifest["splits"][split]["examples"]:
                raise DataError(f"{directory}: {split} tokens, labels and manifest disagree in count")
            if tokens.size and tokens.max() >= manifest["codebook_size"]:
                raise DataError(f"{directory}: {split} tokens exceed the codebook size {manifest['codebook_size']}")
    return PreparedImages(directory, manifest, arrays)
