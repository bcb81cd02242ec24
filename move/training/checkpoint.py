"""Checkpoints: a directory holding weights (safetensors), the full config and
metadata (JSON), and optionally the training state (optimiser, RNG, data position).
A torchrun job writes the sharded layout instead (weights and optimiser state through
torch.distributed.checkpoint, move/training/sharded_checkpoint.py); everything that
reads a checkpoint whole (sample, eval, export, load_model) reads either layout here.

Writes are crash-safe: everything goes into a temporary sibling directory, each
file is fsynced, and the directory is renamed into place in one atomic step, so a
half-written checkpoint never carries a checkpoint's name. config.json records a
SHA-256 of every other file; loading verifies them.
"""

import hashlib
import io
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from move.errors import CheckpointError, ConfigError, UserError
from move.model.classifier import ImageClassifier
from move.model.gpt import GPT
from move.model.vqvae import VQVAE
from move.readers import first_line, inner_file_name, parse_json, read_bytes

FORMAT = "move-checkpoint"
VERSION = 2  # 2: the header carries a checksum of itself (header_sha256)
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAIN_STATE = "train_state.pt"
TOKENIZER = "tokenizer.json"  # a text run's tokenizer, copied into each checkpoint
SHARDED_LAYOUT = "dcp"  # header["layout"] of a checkpoint written by torchrun ranks
DCP_DIR = "dcp"  # where such a checkpoint keeps what torch.distributed.checkpoint wrote


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def streamed_sha256(file: Path, block: int = 1 << 24) -> str:
    """SHA-256 of a file read in blocks: bounded memory for a bank larger than RAM."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def first_non_finite(state_dict: dict) -> str | None:
    """The name of the first floating-point tensor with a NaN or an infinity, or None."""
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def save_checkpoint(
    path,
    model,
    meta: dict | None = None,
    train_state: dict | None = None,
    state_dict: dict | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Atomically write checkpoint directory `path` (replacing an older one of that
    name). state_dict: the weights to write instead of model.state_dict() (a
    distributed job passes its gathered, unsharded one)."""
    state_dict = model.state_dict() if state_dict is None else state_dict
    path = Path(path)
    bad = first_non_finite(state_dict)
    if bad:
        raise CheckpointError(f"refusing to write {path}: {bad} holds NaN or infinite values")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        files = {WEIGHTS: save_safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in state_dict.items()})}
        if train_state is not None:
            buffer = io.BytesIO()
            torch.save(train_state, buffer)
            files[TRAIN_STATE] = buffer.getvalue()
        files.update(extra_files or {})  # what using the checkpoint needs (the tokenizer): checksummed too
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)  # e.g. a nested tokenizer checkpoint
            write_synced(tmp / name, data)
        write_header(
            tmp, model.kind, model.config.to_dict(), meta or {}, {name: sha256(data) for name, data in files.items()}
        )
        put_in_place(tmp, path)
    except OSError as e:  # disk full, quota, permissions: the previous checkpoints are untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"{path}: could not write the checkpoint ({e.strerror or e}); earlier checkpoints are intact"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_header(directory: Path, model_kind: str, model_config: dict, meta: dict, checksums: dict, **fields) -> None:
    """config.json of a checkpoint being written: what it holds, the SHA-256 of every
    other file, extra fields (a sharded layout's), and a checksum of itself."""
    header = {
        "format": FORMAT,
        "version": VERSION,
        **fields,
        "model_kind": model_kind,
        "model_config": model_config,
        "meta": meta,
        "sha256": checksums,
    }
    header["header_sha256"] = header_checksum(header)
    write_synced(directory / CONFIG, json.dumps(header, indent=2).encode())


def put_in_place(tmp: Path, path: Path) -> None:
    """Give a finished temporary checkpoint directory its name, durably: an older
    directory of that name is moved aside first and deleted after, so at every moment
    the name holds one complete checkpoint or none."""
    fsync_dir(tmp)
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    fsync_dir(path.parent)


def header_checksum(header: dict) -> str:
    """SHA-256 of the header's canonical JSON without this field: an edited model
    config (rope_base, say) would otherwise silently change what the weights mean."""
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    return sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def read_header(path) -> dict:
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise CheckpointError(f"{path}: not a checkpoint (no {CONFIG})")
    header = parse_json(read_bytes(path / CONFIG, what="checkpoint header"), path / CONFIG)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a {FORMAT} (format field is {header.get('format') if isinstance(header, dict) else None!r})"
        )
    version = header.get("version", 1)
    if not isinstance(version, int) or (version >= 2 and header.get("header_sha256") != header_checksum(header)):
        raise CheckpointError(f"{path}/{CONFIG}: checksum mismatch (the file was edited or damaged)")
    check_header_fields(header, path / CONFIG)
    return header


# The fields a header must have, with their types: a header whose checksum matches
# (someone who can write the directory can recompute it) may still be hostile.
HEADER_FIELDS = {"model_kind": str, "model_config": dict, "sha256": dict}
OPTIONAL_HEADER_FIELDS = {"meta": dict, "layout": str}


def check_header_fields(header: dict, where) -> None:
    for name, kind in HEADER_FIELDS.items():
        if not isinstance(header.get(name), kind):
            raise CheckpointError(f"{where}: damaged header ({name} missing or not a {kind.__name__})")
    for name, kind in OPTIONAL_HEADER_FIELDS.items():
        if name in header and not isinstance(header[name], kind):
            raise CheckpointError(f"{where}: damaged header ({name} is not a {kind.__name__})")
    for name, digest in header["sha256"].items():
        inner_file_name(name, where)
        if not isinstance(digest, str):
            raise CheckpointError(f"{where}: damaged header (the checksum of {name} is not text)")
    meta = header.get("meta", {})
    if not isinstance(meta.get("task", {}), dict) or not isinstance(meta.get("step", 0), int):
        raise CheckpointError(f"{where}: damaged header (meta.task or meta.step)")


def training_data(header: dict) -> str | None:
    """The data directory the checkpoint's run was trained on, if recorded."""
    return header.get("meta", {}).get("task", {}).get("data")


def tokenizer_source(checkpoint, header: dict, explicit: str | None = None) -> str:
    """Where the tokenizer of a checkpoint is: `explicit`, else the copy inside the
    checkpoint (so a run directory works wherever it is moved), else its training data."""
    if explicit:
        return explicit
    if TOKENIZER in header.get("sha256", {}):
        read_verified(Path(checkpoint), TOKENIZER, header)
        return str(Path(checkpoint) / TOKENIZER)
    return data_dir_for(checkpoint, header, None, "--tokenizer")


def data_dir_for(checkpoint, header: dict, explicit: str | None, flag: str) -> str:
    """`explicit` if given, else the checkpoint's training data; an error naming the
    command-line `flag` that supplies it when neither exists."""
    data = explicit or training_data(header)
    if not data:
        raise UserError(f"{checkpoint}: no data directory recorded; pass {flag}")
    return data


def read_verified(path: Path, name: str, header: dict) -> bytes:
    """A file of a checkpoint, checked against the checksum its header records."""
    file = path / name
    if not file.is_file():
        raise CheckpointError(f"{path}: missing {name}")
    data = file.read_bytes()
    expected = header.get("sha256", {}).get(name)
    if expected != sha256(data):
        raise CheckpointError(f"{file}: checksum mismatch (truncated or corrupted)")
    return data


def is_sharded(header: dict) -> bool:
    return header.get("layout") == SHARDED_LAYOUT


def verify_files(path: Path, header: dict) -> None:
    """Every file of a checkpoint against the header's checksums, read in blocks."""
    for name, digest in header.get("sha256", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: missing {name}")
        if streamed_sha256(file) != digest:
            raise CheckpointError(f"{file}: checksum mismatch (truncated or corrupted)")


def stored_tensors(path: Path) -> dict:
    """{state key: DCP's TensorStorageMetadata (global size, dtype, pieces)} of a
    sharded checkpoint."""
    metadata = FileSystemReader(path / DCP_DIR).read_metadata()
    return {k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def load_state_dict(path) -> tuple[dict, dict]:
    """Verified (state_dict, header) of a checkpoint directory: the whole model in this
    process's memory, from either layout."""
    path = Path(path)
    header = read_header(path)
    if is_sharded(header):
        verify_files(path, header)
        model_keys = {k: v for k, v in stored_tensors(path).items() if k.startswith("model.")}
        state = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in model_keys.items()}
        dcp.load(state, checkpoint_id=path / DCP_DIR, no_dist=True)
        return {k[len("model.") :]: v for k, v in state.items()}, header
    data = read_verified(path, WEIGHTS, header)
    try:
        return load_safetensors_bytes(data), header
    except SafetensorError as e:
        raise CheckpointError(f"{path}/{WEIGHTS}: unreadable safetensors ({e})") from None


def load_train_state(path) -> dict:
    """The optimiser, data and RNG state of a checkpoint. Read with
    weights_only=True: tensors and plain containers only, so a crafted file cannot
    run code (its checksum sits beside it and proves nothing against tampering)."""
    path = Path(path)
    header = read_header(path)
    data = read_verified(path, TRAIN_STATE, header)
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}/{TRAIN_STATE}: refused, it holds more than tensors and plain data ({first_line(e)[:200]})"
        ) from None


def check_compatible(model, state_dict: dict, source) -> None:
    """Refuse, with the first mismatch named, weights that do not fit `model`."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing:
        raise CheckpointError(f"{source}: tensor {missing[0]} missing from checkpoint ({len(missing)} missing)")
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected tensor {unexpected[0]} in checkpoint ({len(unexpected)} unexpected)"
        )
    for name, tensor in own.items():
        if tuple(state_dict[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source}: shape mismatch for {name}: checkpoint {tuple(state_dict[name].shape)} "
                f"vs model {tuple(tensor.shape)}"
            )


def config_mismatch(a, b) -> str | None:
    """'field: x vs y' for the first differing config field, or None."""
    da, db = a.to_dict(), b.to_dict()
    for key in da:
        if da[key] != db[key]:
            return f"{key}: {da[key]!r} vs {db[key]!r}"
    return None


SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16}  # BF16 is handled on its own
SAFETENSORS_MAX_HEADER = 100 * 2**20  # the limit the safetensors library itself sets


def _valid_tensor_entry(info, data_bytes: int) -> bool:
    """A safetensors header entry {dtype, shape, data_offsets} whose range lies in the file."""
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        return False
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(n, int) and 0 <= n < 2**40 for n in shape):
        return False
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(n, int) for n in offsets):
        return False
    return 0 <= offsets[0] <= offsets[1] <= data_bytes


def mapped_tensor(file: Path, name: str) -> torch.Tensor:
    """A read-only tensor backed by the safetensors file itself (numpy memmap):
    indexing it reads only the pages of the rows asked for.

    safetensors layout: 8-byte little-endian header length, JSON header giving each
    tensor's dtype, shape and byte range, then the data."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if not 0 < header_len <= min(SAFETENSORS_MAX_HEADER, size - 8):
            raise CheckpointError(f"{file}: not a safetensors file (header length {header_len:,})")
        header = parse_json(f.read(header_len), f"{file} (header)")
    if not isinstance(header, dict) or name not in header:
        raise CheckpointError(f"{file}: no tensor {name}")
    info = header[name]
    if not _valid_tensor_entry(info, size - 8 - header_len):
        raise CheckpointError(f"{file}: the header's entry for {name} is malformed")
    start, end = info["data_offsets"]
    itemsize = 2 if info["dtype"] == "BF16" else np.dtype(SAFETENSORS_DTYPES.get(info["dtype"], np.uint8)).itemsize
    if end - start != itemsize * int(np.prod(info["shape"])):
        raise CheckpointError(f"{file}: byte range of {name} does not match its shape and dtype")
    if info["dtype"] == "BF16":  # numpy has no bfloat16: map the raw 16-bit words and reinterpret
        words = np.memmap(file, dtype=np.int16, mode="r", offset=8 + header_len + start, shape=tuple(info["shape"]))
        return torch.from_numpy(words).view(torch.bfloat16)
    if info["dtype"] not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{file}: cannot memory-map {name} of dtype {info['dtype']}")
    array = np.memmap(
        file,
        dtype=SAFETENSORS_DTYPES[info["dtype"]],
        mode="r",
        offset=8 + header_len + start,
        shape=tuple(info["shape"]),
    )
    return torch.from_numpy(array)


def model_classes() -> dict:
    """Every model a checkpoint can hold, by the kind its header records."""
    return {cls.kind: cls for cls in (GPT, VQVAE, ImageClassifier)}


def load_model(path, device="cpu", mmap_bank: bool = False, kind: str = "gpt"):
    """Rebuild the model from a checkpoint directory alone -> (model, header).

    kind: which model the caller expects ("gpt", "vqvae", "classifier"); another
    kind is refused. mmap_bank: leave the MoVE bank in the file and gather its
    rows on demand (CPU inference only), so a bank larger than RAM can still
    generate. The weights file is still verified against its checksum, by
    streaming it through SHA-256 in blocks (one read, no copy held in memory)."""
    path = Path(path)
    header = read_header(path)
    found = header.get("model_kind", "gpt")
    if found != kind:
        raise CheckpointError(f"{path}: holds a {found} checkpoint, expected a {kind}")
    model_class = model_classes()[kind]
    try:
        config = model_class.config_class.from_dict(header["model_config"])
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path}: invalid model config in {CONFIG} ({e})") from None
    if not mmap_bank:
        state_dict, _ = load_state_dict(path)
    else:
        if config.value_memory != "move":
            raise CheckpointError(f"{path}: --mmap-bank needs a MoVE checkpoint, this one is {config.value_memory}")
        if is_sharded(header):
            raise CheckpointError(
                f"{path}: a sharded (torchrun) checkpoint; --mmap-bank maps one file: "
                f"`move consolidate {path} --out DIR` writes it"
            )
        if streamed_sha256(path / WEIGHTS) != header.get("sha256", {}).get(WEIGHTS):
            raise CheckpointError(f"{path / WEIGHTS}: checksum mismatch (truncated or corrupted)")
        with warnings.catch_warnings():  # read-only memmap: torch warns it is not writable; we never write it
            warnings.simplefilter("ignore", UserWarning)
            bank = mapped_tensor(path / WEIGHTS, "bank.weight")
        with safe_open(path / WEIGHTS, framework="pt") as f:
            state_dict = {k: f.get_tensor(k) for k in f.keys() if k != "bank.weight"}  # noqa: SIM118 - safe_open is not iterable
        state_dict["bank.weight"] = bank
    with torch.device("meta"):  # no memory for weights that are about to be replaced
        model = model_class(config)
    check_compatible(model, state_dict, path)
    model.load_state_dict(state_dict, assign=True)
    if mmap_bank:
        model.bank.weight.requires_grad_(False)
        return model, header
    return model.to(device), header
