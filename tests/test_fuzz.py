"""Property-based fuzzing of everything that parses user input: model configs,
the command line, text corpora, image folders, data manifests and checkpoint
headers. Each must either accept the input or raise the project's one-line
error type - never crash with another exception."""

import contextlib
import json
import string
import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from move.cli import build_parser, config_overrides, given_flags
from move.config import ModelConfig, TrainConfig, model_config_from_preset
from move.errors import UserError
from move.image.datasets import load_folder
from move.image.prepare import load_prepared_images
from move.model.gpt import GPT
from move.text.corpora import iter_documents
from move.text.prepare import load_prepared
from move.training.checkpoint import read_header

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
small_ints = st.integers(min_value=-3, max_value=12)
config_values = {
    "vocab_size": st.integers(-2, 40),
    "seq_len": small_ints,
    "n_layer": st.integers(-1, 3),
    "n_embd": st.integers(-8, 48),
    "n_head": small_ints,
    "n_kv_head": small_ints,
    "attention": st.sampled_from(["mha", "mla", "gqa", ""]),
    "kv_latent_dim": st.integers(-2, 40),
    "rope_head_dim": small_ints,
    "value_memory": st.sampled_from(["standard", "lave", "move", "moe"]),
    "memory_density": small_ints,
    "memory_slots": small_ints,
    "move_gate_g0": st.booleans(),
    "lave_full_gates": st.booleans(),
    "logit_softcap": st.floats(-5, 30, allow_nan=False, allow_subnormal=False),  # training flushes denormals
}


@FUZZ
@given(st.fixed_dictionaries({}, optional=config_values))
def test_model_config_is_valid_or_refused(fields):
    base = model_config_from_preset("tiny").to_dict()
    try:
        config = ModelConfig.from_dict({**base, **fields})
    except UserError:
        return
    model = GPT(config)  # a validated config always builds and runs
    logits = model(torch.zeros(1, min(2, config.seq_len), dtype=torch.long))
    assert logits.shape[-1] == config.vocab_size and torch.isfinite(logits).all()


flag_tokens = st.sampled_from(
    [
        "--steps",
        "--n-head",
        "--density",
        "--variant",
        "--lr-matrix",
        "--batch-size",
        "--attention",
        "--optimizer",
        "--warmdown-frac",
        "--bogus",
        "-1",
        "0",
        "3",
        "1e9",
        "move",
        "lave",
        "mla",
        "nan",
        "abc",
        "--move-gate-g0",
        "maybe",
        "true",
    ]
)


@FUZZ
@given(st.lists(flag_tokens, max_size=8))
def test_command_line_is_parsed_or_refused(tokens):
    try:
        args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--preset", "tiny", *tokens])
    except SystemExit as e:
        assert e.code == 2
        return
    try:
        model_config_from_preset(args.preset, **config_overrides(args, ModelConfig))
        TrainConfig.from_flat(given_flags(args))
    except UserError:
        pass


@FUZZ
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=4))
def test_text_folder_reader_accepts_or_refuses(files):
    with tempfile.TemporaryDirectory() as folder:
        for i, data in enumerate(files):
            (Path(folder) / f"{i}.txt").write_bytes(data)
        try:
            docs = list(iter_documents("txt", folder))
        except UserError:
            return
        assert all(isinstance(text, str) and text.strip() for _, text in docs)


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=80),
            st.text(max_size=40).map(str.encode),
            st.dictionaries(st.sampled_from(["text", "body"]), st.text(max_size=20)).map(
                lambda d: json.dumps(d).encode()
            ),
        ),
        max_size=5,
    )
)
def test_jsonl_reader_accepts_or_refuses(lines):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.jsonl"
        path.write_bytes(b"\n".join(lines))
        try:
            docs = list(iter_documents("jsonl", str(path)))
        except UserError:
            return
        assert all(isinstance(text, str) for _, text in docs)


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b"]), st.sampled_from([".png", ".jpg", ".txt"]), st.binary(max_size=64)),
        max_size=6,
    )
)
def test_image_folder_reader_accepts_or_refuses(files):
    with tempfile.TemporaryDirectory() as root:
        for i, (cls, suffix, data) in enumerate(files):
            (Path(root) / cls).mkdir(exist_ok=True)
            (Path(root) / cls / f"{i}{suffix}").write_bytes(data)
        try:
            dataset = load_folder(root, image_size=8, channels=1)
        except UserError:
            return
        assert dataset.train_images.dtype.name == "uint8"


manifest_text = st.one_of(
    st.binary(max_size=100).map(lambda b: b.decode("latin-1")),
    st.recursive(
        st.none() | st.integers() | st.text(string.ascii_letters, max_size=8),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(
                st.sampled_from(["format", "splits", "sha256", "model_config", "train"]), inner, max_size=4
            )
        ),
        max_leaves=8,
    ).map(json.dumps),
)


@FUZZ
@given(manifest_text)
def test_data_manifests_and_checkpoint_headers_accept_or_refuse(text):
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "manifest.json").write_text(text)
        (Path(folder) / "config.json").write_text(text)
        for reader in (load_prepared, load_prepared_images, read_header):
            with contextlib.suppress(UserError):
                reader(folder)


def test_readers_accept_well_formed_input(tmp_path):
    """The accepting branch of the fuzzed readers, with inputs known to be valid."""
    (tmp_path / "a.txt").write_text("hello world\n")
    assert [t for _, t in iter_documents("txt", str(tmp_path))] == ["hello world\n"]
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    assert [t for _, t in iter_documents("jsonl", str(tmp_path / "c.jsonl"))] == ["one", "two"]
    for cls in ("a", "b"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for k in range(12):
            Image.fromarray(np.full((5, 5), 20 * k, np.uint8)).save(tmp_path / "img" / cls / f"{k}.png")
    assert load_folder(tmp_path / "img", image_size=8, channels=1).shape == (1, 8, 8)
