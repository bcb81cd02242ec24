"""Every reader of user files against hostile input, class by class: JSON and JSONL
(nesting, huge numbers, byte-order marks, huge lines, wrong structure), TOML, text
encodings, parquet, images (decompression bombs, truncated files, odd modes),
tokenizer files, checkpoint headers and data manifests. Each reader either reads
the file as a user would expect or raises the project's one-line error: a known
hostile example per class, then a bounded hypothesis fuzz of the reader."""

import json
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import move.readers
from move.config import read_run_config
from move.errors import UserError
from move.experiments.runner import Experiment
from move.files import read_manifest
from move.image.datasets import load_folder
from move.image.prepare import load_prepared_images
from move.knowledge.recall import load_knowledge
from move.readers import parse_json, parse_toml, read_text
from move.text.corpora import iter_documents
from move.text.prepare import load_prepared
from move.text.tokenizer import Tokenizer
from move.training.checkpoint import header_checksum, load_model, read_header
from move.training.trainer import read_metrics

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DEEP = "[" * 100_000 + "]" * 100_000
HUGE_INT = "9" * 5_000


def refused(read, *args) -> str:
    """The one-line message of the project's error that `read` raises."""
    with pytest.raises(UserError) as caught:
        read(*args)
    message = str(caught.value)
    assert message and "\n" not in message, message
    return message


def accepted_or_refused(read, *args):
    try:
        return read(*args)
    except UserError as e:
        assert "\n" not in str(e), str(e)
        return None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_subnormal=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)


# ---- JSON: the parser shared by every JSON reader ----


@pytest.mark.parametrize(
    "text, expected",
    [(DEEP, "nested too deeply"), (f"[{HUGE_INT}]", "too many digits"), ("{", "not valid JSON"), ("", "not valid")],
)
def test_json_parser_refuses_hostile_text_in_one_line(text, expected):
    assert expected in refused(parse_json, text, "f.json")


def test_json_parser_reads_a_byte_order_mark_as_editors_write_it():
    assert parse_json('\ufeff{"a": 1}', "f.json") == {"a": 1}
    assert parse_json(b'\xef\xbb\xbf{"a": 1}', "f.json") == {"a": 1}
    assert "not UTF-8" in refused(parse_json, b'{"a": "\xff"}', "f.json")


# ---- JSONL corpora ----


def jsonl_documents(path):
    return [text for _, text in iter_documents("jsonl", str(path))]


def test_jsonl_corpus_with_bom_deep_nesting_huge_numbers_and_long_lines(tmp_path, monkeypatch):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "one"}\n{"text": "two"}\n')
    assert jsonl_documents(path) == ["one", "two"]
    path.write_text('{"text": "one"}\n' + DEEP + "\n")
    assert refused(jsonl_documents, path).startswith(f"{path}:2: ")
    path.write_text(f'{{"text": "one", "n": {HUGE_INT}}}\n')
    assert "too many digits" in refused(jsonl_documents, path)
    monkeypatch.setattr(move.readers, "MAX_JSONL_LINE_BYTES", 64)
    path.write_text('{"text": "short"}\n{"text": "' + "x" * 200 + '"}\n')
    assert f"{path}:2: line longer than 64 bytes" in refused(jsonl_documents, path)


@FUZZ
@given(st.lists(json_values.map(json.dumps), min_size=1, max_size=4), st.booleans())
def test_jsonl_corpus_fuzz(lines, bom):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.jsonl"
        path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + "\n".join(lines).encode())
        docs = accepted_or_refused(jsonl_documents, path)
        assert docs is None or all(isinstance(d, str) for d in docs)


def test_text_files_drop_a_byte_order_mark_and_refuse_other_bytes(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfhello\n")
    assert [t for _, t in iter_documents("txt", str(tmp_path))] == ["hello\n"]
    assert read_text(tmp_path / "a.txt") == "hello\n"
    (tmp_path / "b.txt").write_bytes(b"caf\xe9\n")  # latin-1
    assert "not UTF-8 text (byte 3)" in refused(read_text, tmp_path / "b.txt")
    assert "No such file" in refused(read_text, tmp_path / "none.txt")
    assert "a directory" in refused(read_text, tmp_path)


# ---- TOML: run configs and experiment files ----


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a = " + "[" * 50_000 + "]" * 50_000, "nested too deeply"),
        (f"steps = {HUGE_INT}", "too many digits"),
        ("steps = = 3", "not valid TOML"),
    ],
)
def test_toml_parser_refuses_hostile_text_in_one_line(text, expected):
    assert expected in refused(parse_toml, text, "f.toml")


def test_toml_files_with_a_byte_order_mark_read(tmp_path):
    path = tmp_path / "run.toml"
    path.write_bytes(b'\xef\xbb\xbfpreset = "tiny"\n[train]\nsteps = 3\n')
    assert read_run_config(path)["train"] == {"steps": 3}


toml_documents = st.dictionaries(
    st.sampled_from(["data", "preset", "model", "train", "seeds", "variants", "sizes", "name", "setup", "image"]),
    st.recursive(
        st.booleans()
        | st.integers(-5, 10**6)
        | st.text(max_size=6)
        | st.floats(allow_nan=False, allow_subnormal=False),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text("abcnstep_", max_size=6), inner, max_size=3)
        ),
        max_leaves=8,
    ),
    max_size=6,
)


@FUZZ
@given(toml_documents)
def test_run_config_and_experiment_files_fuzz(document):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "f.toml"
        path.write_text(tomli_w.dumps(document))
        accepted_or_refused(read_run_config, path)
        accepted_or_refused(Experiment.load, path)


# ---- parquet ----


def test_parquet_truncated_wrong_typed_and_garbage_files_are_refused(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": ["alpha", "beta"] * 500}), good, row_group_size=100)
    assert len(list(iter_documents("parquet", str(good)))) == 1000
    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), ints)
    assert "row 0 of column 'text' is int" in refused(lambda: list(iter_documents("parquet", str(ints)))).lower()
    data = good.read_bytes()
    for name, damaged in (("cut", data[: len(data) // 2]), ("garbage", bytes(range(256)) * 4)):
        (tmp_path / "bad").mkdir(exist_ok=True)
        (tmp_path / "bad" / f"{name}.parquet").write_bytes(damaged)
        refused(lambda n=name: list(iter_documents("parquet", str(tmp_path / "bad" / f"{n}.parquet"))))


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 2000))
def test_parquet_fuzz(noise, where):
    """A real parquet file with bytes overwritten somewhere: read or refused."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.parquet"
        pq.write_table(pa.table({"text": [f"document {i}" for i in range(200)]}), path, row_group_size=50)
        data = bytearray(path.read_bytes())
        where = min(where, len(data))
        data[where : where + len(noise)] = noise
        path.write_bytes(bytes(data))
        docs = accepted_or_refused(lambda: list(iter_documents("parquet", str(path))))
        assert docs is None or all(isinstance(t, str) for _, t in docs)


# ---- images ----


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 grey PNG whose header says width x height (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b"")
    )


def image_folder(root: Path, extra: dict[str, bytes]) -> Path:
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for k in range(12):
            Image.fromarray(np.full((5, 5), 20 * k, np.uint8)).save(root / cls / f"{k}.png")
    for name, data in extra.items():
        (root / "a" / name).write_bytes(data)
    return root


def test_image_bombs_and_truncated_files_are_refused_naming_the_file(tmp_path):
    bomb = image_folder(tmp_path / "bomb", {"bomb.png": png_claiming(40_000, 40_000)})
    assert "bomb.png: more than" in refused(load_folder, bomb, 8, 1)
    whole = (tmp_path / "bomb" / "a" / "0.png").read_bytes()
    cut = image_folder(tmp_path / "cut", {"cut.png": whole[: len(whole) - 20]})
    assert "cut.png: unreadable image" in refused(load_folder, cut, 8, 1)


@pytest.mark.parametrize("mode", ["1", "L", "P", "I;16", "I", "F", "LA", "RGBA", "CMYK", "YCbCr"])
def test_images_of_every_common_mode_are_read(tmp_path, mode):
    odd = Image.new(mode, (6, 6))
    suffix = ".tiff" if mode in ("I;16", "I", "F", "CMYK", "YCbCr") else ".png"
    root = image_folder(tmp_path / "odd", {})
    odd.save(root / "a" / f"odd{suffix}")
    assert load_folder(root, image_size=8, channels=3).shape == (3, 8, 8)


# ---- tokenizer files ----


def test_tokenizer_file_with_bom_reads_and_garbage_is_refused(tmp_path, prepared_dir):
    text = (prepared_dir / "tokenizer.json").read_bytes()
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + text)
    assert Tokenizer.load(tmp_path / "bom.json").vocab_size == Tokenizer.load(prepared_dir).vocab_size
    (tmp_path / "deep.json").write_text(DEEP)
    refused(Tokenizer.load, tmp_path / "deep.json")


@FUZZ
@given(json_values.map(json.dumps))
def test_tokenizer_file_fuzz(text):
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "tokenizer.json").write_text(text)
        accepted_or_refused(Tokenizer.load, folder)


# ---- checkpoint headers and data manifests whose checksums or format fields match ----


def write_header(folder: Path, header: dict) -> None:
    header = {**header, "format": "move-checkpoint", "version": 2}
    header["header_sha256"] = header_checksum(header)
    (folder / "config.json").write_text(json.dumps(header))


header_fields = st.fixed_dictionaries(
    {},
    optional={
        "model_kind": st.sampled_from(["gpt", "vqvae", 3]),
        "model_config": st.dictionaries(st.sampled_from(["vocab_size", "n_layer", "n_embd"]), json_values, max_size=3),
        "sha256": st.dictionaries(st.sampled_from(["model.safetensors", "../x", ".h", "a/b"]), json_values, max_size=2),
        "meta": st.dictionaries(st.sampled_from(["task", "step"]), json_values, max_size=2),
        "layout": json_values,
    },
)


@FUZZ
@given(header_fields)
def test_checkpoint_header_fuzz_with_a_matching_checksum(fields):
    with tempfile.TemporaryDirectory() as folder:
        write_header(Path(folder), fields)
        accepted_or_refused(read_header, folder)
        accepted_or_refused(load_model, folder)


def test_checkpoint_header_naming_a_file_outside_its_folder_is_refused(tmp_path):
    write_header(tmp_path, {"model_kind": "gpt", "model_config": {}, "sha256": {"../../etc/passwd": "0"}})
    assert "is not the name of a file inside the folder" in refused(read_header, tmp_path)


@FUZZ
@given(json_values, st.sampled_from(["move-text-data", "move-image-data"]))
def test_data_manifest_fuzz_with_the_right_format(splits, fmt):
    with tempfile.TemporaryDirectory() as folder:
        manifest = {"format": fmt, "splits": splits, "dtype": "uint16", "tokenizer_sha256": "x", "codebook_size": 4}
        (Path(folder) / "manifest.json").write_text(json.dumps(manifest))
        for reader in (load_prepared, load_prepared_images):
            accepted_or_refused(reader, folder)


def test_manifest_listing_a_shard_outside_its_folder_is_refused(tmp_path, prepared_copy):
    manifest = json.loads((prepared_copy / "manifest.json").read_text())
    manifest["splits"]["train"]["file"] = "../../secret.bin"
    (prepared_copy / "manifest.json").write_text(json.dumps(manifest))
    assert "is not the name of a file inside the folder" in refused(load_prepared, prepared_copy)


def test_metadata_files_with_hostile_json_are_refused_in_one_line(tmp_path):
    """Manifests, knowledge files and metrics logs share the JSON reader."""
    for text in (DEEP, f"[{HUGE_INT}]", "\ufeff[1]"):
        (tmp_path / "manifest.json").write_text(text)
        refused(read_manifest, tmp_path, "manifest.json", "move-text-data", "no data")
        (tmp_path / "knowledge.json").write_text(text)
        refused(load_knowledge, tmp_path)
        (tmp_path / "metrics.jsonl").write_text(text + "\n{}\n")
        refused(read_metrics, tmp_path)
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "manifest.json", "wb") as f:
        f.truncate(move.readers.MAX_METADATA_BYTES + 1)  # sparse: nothing is written or read
    assert "bytes; a move-text-data manifest has at most" in refused(
        read_manifest, big, "manifest.json", "move-text-data", "no data"
    )
