"""Prepare a corpus once: split by document, train (or load) the tokenizer,
tokenise into flat token files with a manifest, verified on every load.

Layout of a prepared directory:
    manifest.json    source, split rule, tokenizer fingerprint, counts, checksums
    tokenizer.json   the tokenizer
    train.bin        token ids (uint16 when the vocabulary fits, else uint32)
    val.bin

Documents are cut at line boundaries into passages of at most `passage_tokens`
tokens, each starting with BOS, so every training sequence can start at a
meaningful BOS position and every token of a long work is still seen.
"""

import contextlib
import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from move.config import option
from move.errors import ConfigError, DataError
from move.files import existing_data, read_manifest, replace_directory, temporary_sibling
from move.progress import progress
from move.readers import fields_of, inner_file_name
from move.text.corpora import iter_documents
from move.text.tokenizer import Tokenizer

FORMAT = "move-text-data"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Deterministic split by document: a hash of the id, not the order of reading."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64
    return h < val_fraction


def split_documents(doc_ids: list[str], val_fraction: float) -> set[str]:
    """Validation ids; at least one document on each side when there are two."""
    val = {d for d in doc_ids if is_validation(d, val_fraction)}
    if len(doc_ids) >= 2:
        by_hash = sorted(doc_ids, key=lambda d: hashlib.sha256(d.encode()).digest())
        if not val:
            val = {by_hash[0]}
        if len(val) == len(doc_ids):
            val.discard(by_hash[-1])
    return val


# A longer line is cut (at a space where one is near) before tokenisation, so that
# one huge line costs bounded memory, and lines are tokenised in batches of about
# this many characters: a document of any size is prepared in linear time.
MAX_LINE_CHARS = 1 << 16
BATCH_CHARS = 1 << 22


def passages(line_tokens, passage_tokens: int) -> list[list[int]]:
    """Group consecutive lines' tokens into passages of at most passage_tokens
    (a single longer line is cut into passage_tokens pieces)."""
    grouper = PassageGrouper(passage_tokens)
    out = [p for tokens in line_tokens for p in grouper.add(tokens)]
    return out + grouper.finish()


class PassageGrouper:
    """Streaming form of `passages`: add() one line's tokens, get the passages it
    completed; each token is copied a bounded number of times (linear time)."""

    def __init__(self, passage_tokens: int):
        self.size, self.current = passage_tokens, []

    def add(self, tokens: list[int]) -> list[list[int]]:
        out, start = [], 0
        if len(tokens) > self.size:  # a long line: flush, then whole pieces of it
            if self.current:
                out.append(self.current)
                self.current = []
            while len(tokens) - start > self.size:
                out.append(tokens[start : start + self.size])
                start += self.size
        rest = len(tokens) - start
        if len(self.current) + rest > self.size:
            out.append(self.current)
            self.current = []
        self.current.extend(tokens[start:])
        return out

    def finish(self) -> list[list[int]]:
        out = [self.current] if self.current else []
        self.current = []
        return out


def bounded_lines(text: str):
    """The lines of text (ends kept), each cut into pieces of at most MAX_LINE_CHARS."""
    for line in text.splitlines(keepends=True):
        while len(line) > MAX_LINE_CHARS:
            cut = line.rfind(" ", MAX_LINE_CHARS // 2, MAX_LINE_CHARS) + 1 or MAX_LINE_CHARS
            yield line[:cut]
            line = line[cut:]
        yield line


def document_passages(tokenizer: Tokenizer, text: str, passage_tokens: int):
    """The passages of one document, in order, tokenised batch by batch."""
    grouper, batch, chars = PassageGrouper(passage_tokens), [], 0
    for line in bounded_lines(text):
        batch.append(line)
        chars += len(line)
        if chars >= BATCH_CHARS:
            for tokens in tokenizer.encode_batch(batch):
                yield from grouper.add(tokens)
            batch, chars = [], 0
    for tokens in tokenizer.encode_batch(batch) if batch else []:
        yield from grouper.add(tokens)
    yield from grouper.finish()


def encode_document(tokenizer: Tokenizer, text: str, passage_tokens: int) -> list[int]:
    """BOS-prefixed passages of one document, flattened."""
    ids = []
    for passage in document_passages(tokenizer, text, passage_tokens):
        ids.append(tokenizer.bos_id)
        ids.extend(passage)
    return ids


TOKEN_DTYPES = ("uint16", "uint32")


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


@dataclass
class PrepareOptions:
    source: str = option("shakespeare", "corpus")
    path: str | None = option(None, "file or folder of the corpus (local sources: text, jsonl, parquet)")
    field: str = option("text", "the text field of jsonl/parquet records")
    vocab_size: int = option(2048, "tokenizer vocabulary (bpe)")
    tokenizer: str = option(
        "bpe",
        "bpe (trained here), gpt2, or a pretrained model's: its tokenizer.json, its transformers folder, "
        "or its .gguf file",
    )
    val_fraction: float = option(0.1, "fraction of the documents held out for validation")
    passage_tokens: int = option(256, "documents are cut into passages of about this many tokens")
    # nanochat caps the text its tokenizer trains on the same way
    tokenizer_chars: int = option(50_000_000, "cap on the characters used to train the BPE")

    def validate(self) -> "PrepareOptions":
        if not 0 < self.val_fraction < 1:  # (also false for NaN)
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.passage_tokens < 1:
            raise ConfigError(f"passage_tokens must be positive, got {self.passage_tokens}")
        if self.tokenizer not in ("bpe", "gpt2") and not Path(self.tokenizer).exists():
            raise ConfigError(f"unknown tokenizer {self.tokenizer!r}; choose bpe, gpt2 or the path of a pretrained one")
        return self


def prepare(options: PrepareOptions, out_dir, force: bool = False, pretrained: Tokenizer | None = None) -> dict:
    """Write a prepared data directory; returns its manifest. Nothing existing is
    touched unless force: the result is built in a temporary sibling and renamed.
    pretrained: the tokenizer options.tokenizer names, read by the caller (a .gguf
    file is read through transformers, which this layer does not import)."""
    o = options.validate()
    out_dir = Path(out_dir)
    kept = existing_data(out_dir, force, asdict(o), lambda manifest: manifest["options"], asdict(PrepareOptions()))
    if kept is not None:
        return kept
    docs = lambda: iter_documents(o.source, o.path, o.field)
    doc_ids = [d for d, _ in docs()]
    if len(set(doc_ids)) != len(doc_ids):
        raise DataError(f"corpus {o.source!r} has duplicate document ids")
    val_ids = split_documents(doc_ids, o.val_fraction)
    single = len(doc_ids) == 1  # one big file: its last passages are the validation split

    if pretrained is not None:
        tokenizer = pretrained
    elif o.tokenizer == "gpt2":
        tokenizer = Tokenizer.gpt2()
    elif o.tokenizer != "bpe":
        tokenizer = Tokenizer.load(o.tokenizer)  # a tokenizer.json, or a folder holding one
    else:

        def training_text():
            budget = o.tokenizer_chars
            for doc_id, text in docs():
                if doc_id not in val_ids and budget > 0:
                    budget -= len(text)
                    yield text

        tokenizer = Tokenizer.train(training_text(), o.vocab_size)

    split_of = lambda doc_id: "tail" if single else "val" if doc_id in val_ids else "train"
    rule = (
        "a single document: its last ceil(val_fraction x passages) passages are validation, the rest training"
        if single
        else "sha256(document id) < val_fraction, at least one document per side"
    )
    return write_prepared(
        docs,
        split_of,
        tokenizer,
        o.passage_tokens,
        out_dir,
        {"options": asdict(o), "split_rule": rule, "val_documents": sorted(val_ids), "val_fraction": o.val_fraction},
    )


def write_prepared(
    docs,
    split_of,
    tokenizer: Tokenizer,
    passage_tokens: int,
    out_dir: Path,
    record: dict,
    extra_files: dict[str, str] | None = None,
) -> dict:
    """Tokenise documents (a re-readable stream of (id, text)) into a prepared
    directory, built in a temporary sibling and swapped into place atomically.
    `split_of` maps a document id to "train" or "val"; `record` is merged into the
    manifest; extra_files {name: text} are written beside it."""
    tmp = temporary_sibling(out_dir)
    try:
        manifest = _write_into(tmp, docs, split_of, tokenizer, passage_tokens, record)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        replace_directory(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_into(tmp: Path, docs, split_of, tokenizer: Tokenizer, passage_tokens: int, record: dict) -> dict:
    dtype = token_dtype(tokenizer.vocab_size)
    stats = {s: dict(file=f"{s}.bin", tokens=0, documents=0, text_bytes=0) for s in SPLITS}
    token_bytes = tokenizer.token_bytes()
    hashes = {s: hashlib.sha256() for s in SPLITS}
    with contextlib.ExitStack() as stack:
        files = {s: stack.enter_context(open(tmp / f"{s}.bin", "wb")) for s in SPLITS}
        for doc_id, text in progress(docs(), "tokenising", unit="doc"):
            split = split_of(doc_id)
            if split == "tail":
                total = sum(1 for _ in document_passages(tokenizer, text, passage_tokens))
                if total < 2:
                    raise DataError(
                        f"document {doc_id!r} is too short to give both a training and a validation "
                        f"passage; add text or documents"
                    )
                first_val = total - max(1, math.ceil(record.get("val_fraction", 0.1) * total))
            else:
                first_val = None
            val_bytes = 0
            for i, passage in enumerate(document_passages(tokenizer, text, passage_tokens)):
                where = split if first_val is None else ("val" if i >= first_val else "train")
                if where == "val" and first_val is not None:
                    val_bytes += int(token_bytes[passage].sum())
                data = np.asarray([tokenizer.bos_id, *passage], dtype=dtype).tobytes()
                files[where].write(data)
                hashes[where].update(data)
                stats[where]["tokens"] += len(data) // np.dtype(dtype).itemsize
            for where in (split,) if first_val is None else SPLITS:
                stats[where]["documents"] += 1
            if first_val is None:
                stats[split]["text_bytes"] += len(text.encode("utf-8"))
            else:  # the byte count of the validation passages, from the (lossless) tokens
                stats["val"]["text_bytes"] += val_bytes
                stats["train"]["text_bytes"] += len(text.encode("utf-8")) - val_bytes
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    for s in SPLITS:
        stats[s]["sha256"] = hashes[s].hexdigest()
    tokenizer.save(tmp)
    manifest = {
        "format": FORMAT,
        "version": 1,
        "tokenizer_sha256": tokenizer.fingerprint(),
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "dtype": np.dtype(dtype).name,
        "splits": stats,
        **record,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


@dataclass
class PreparedData:
    directory: Path
    manifest: dict
    tokenizer: Tokenizer

    def tokens(self, split: str) -> np.memmap:
        info = self.manifest["splits"][split]
        return np.memmap(self.directory / info["file"], dtype=self.manifest["dtype"], mode="r")


def load_prepared(directory) -> PreparedData:
    """Open a prepared directory, checking manifest, shard sizes and checksums,
    and that the tokenizer on disk is the one the tokens were made with."""
    directory = Path(directory)
    manifest = read_manifest(directory, MANIFEST, FORMAT, "no prepared data; run `move prepare` first")
    with fields_of(directory / MANIFEST):  # the right format field, yet damaged
        missing = [k for k in ("tokenizer_sha256", "dtype", "splits") if k not in manifest]
        missing += [
            f"splits.{s}.{k}"
            for s in SPLITS
            for k in ("file", "tokens", "sha256")
            if k not in manifest.get("splits", {}).get(s, {})
        ]
        if missing:
            raise DataError(f"{directory}/{MANIFEST}: damaged manifest, missing {', '.join(missing)}")
        tokenizer = Tokenizer.load(directory)
        if tokenizer.fingerprint() != manifest["tokenizer_sha256"]:
            raise DataError(f"{directory}: tokenizer.json does not match the tokenizer the data was prepared with")
        if manifest["dtype"] not in TOKEN_DTYPES:
            raise DataError(f"{directory}/{MANIFEST}: token dtype {manifest['dtype']!r} is not one of {TOKEN_DTYPES}")
        itemsize = np.dtype(manifest["dtype"]).itemsize
        for split in SPLITS:
            info = manifest["splits"][split]
            if not isinstance(info["tokens"], int) or not isinstance(info["sha256"], str):
                raise DataError(f"{directory}/{MANIFEST}: damaged manifest (splits.{split})")
            file = directory / inner_file_name(info["file"], f"{directory}/{MANIFEST}")
            if not file.is_file():
                raise DataError(f"{file}: missing shard")
            if file.stat().st_size != info["tokens"] * itemsize:
                raise DataError(
                    f"{file}: size {file.stat().st_size} bytes, manifest says {info['tokens']} tokens x {itemsize}"
                )
            data = file.read_bytes()
            if hashlib.sha256(data).hexdigest() != info["sha256"]:
                raise DataError(f"{file}: checksum does not match the manifest (corrupted shard)")
            # the one range check of training ids: the model's forward does not repeat it per step
            tokens = np.frombuffer(data, dtype=manifest["dtype"])
            if tokens.size and int(tokens.max()) >= tokenizer.vocab_size:
                raise DataError(
                    f"{file}: token id {int(tokens.max())} is outside the tokenizer's vocabulary "
                    f"of {tokenizer.vocab_size}"
                )
    return PreparedData(directory, manifest, tokenizer)
