"""Every bad input a user can give gets one line `error: ...`, exit status 2, and
leaves what was already written untouched (issue: reliability)."""

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from move.cli import main
from move.text.tokenizer import Tokenizer
from move.training.checkpoint import header_checksum

TINY = [
    "--preset",
    "tiny",
    "--steps",
    "2",
    "--batch-size",
    "2",
    "--eval-every",
    "2",
    "--eval-tokens",
    "256",
    "--checkpoint-every",
    "2",
]


def cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse exits by itself on a bad command line
        code = e.code
    return code, capsys.readouterr().err


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory, prepared_dir, digits_tokens, text_folder):
    """Real artefacts to damage: a text run, a VQ-VAE and a classifier on digits."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("world")
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet, contextlib.redirect_stderr(io.StringIO()):
        assert main(["train", "--data", str(prepared_dir), "--out", str(root / "run"), "--variant", "move", *TINY]) == 0
        conv = [
            "--dataset",
            "digits",
            "--steps",
            "1",
            "--batch-size",
            "8",
            "--eval-every",
            "1",
            "--checkpoint-every",
            "1",
            "--eval-images",
            "16",
        ]
        assert main(["image-tokenizer", *conv, "--downsample", "1", "--hidden", "8", "--out", str(root / "vq")]) == 0
        assert main(["image-classifier", *conv, "--hidden", "8", "--out", str(root / "cls")]) == 0
        assert main(["train", "--data", str(digits_tokens), "--out", str(root / "img_run"), *TINY]) == 0
    return {
        "data": prepared_dir,
        "text": text_folder,
        "run": root / "run",
        "ckpt": root / "run" / "checkpoints" / "step_000002",
        "vq": root / "vq",
        "cls": root / "cls",
        "img": digits_tokens,
        "img_run": root / "img_run",
    }


def copy_of(src: Path, tmp: Path) -> Path:
    dst = tmp / ("copy_" + src.name)
    shutil.copytree(src, dst)
    return dst


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


# Each case: (id, setup(world, tmp) -> extra placeholders, argv with {placeholders}, expected message)
def no_setup(w, tmp):
    return {}


def damaged_data(damage):
    def setup(w, tmp):
        d = copy_of(w["data"], tmp)
        damage(d)
        return {"bad": d}

    return setup


def damaged_checkpoint(damage):
    def setup(w, tmp):
        c = copy_of(w["ckpt"], tmp)
        damage(c)
        return {"bad": c}

    return setup


def nan_weights(checkpoint: Path) -> None:
    """A NaN in the weights with a matching checksum (as a diverged run could once write)."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(checkpoint / "model.safetensors")
    weights["lm_head.weight"][0, 0] = float("nan")
    save_file(weights, checkpoint / "model.safetensors")
    header = json.loads((checkpoint / "config.json").read_text())
    header["sha256"]["model.safetensors"] = hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    header["header_sha256"] = header_checksum(header)
    (checkpoint / "config.json").write_text(json.dumps(header))
    assert torch.isnan(load_file(checkpoint / "model.safetensors")["lm_head.weight"]).any()


def damaged_run(damage):
    def setup(w, tmp):
        r = copy_of(w["run"], tmp)
        damage(r)
        return {"bad": r}

    return setup


def text_folder_with(files: dict):
    def setup(w, tmp):
        folder = tmp / "corpus"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        return {"bad": folder}

    return setup


def image_folder(kind):
    def setup(w, tmp):
        root = tmp / "images"
        root.mkdir()
        if kind == "no-classes":
            (root / "readme.txt").write_text("no class folders here")
        else:
            (root / "cat").mkdir()
            for i in range(10):
                Image.fromarray(np.full((8, 8), 25 * i, np.uint8)).save(root / "cat" / f"{i}.png")
            if kind == "unreadable":
                (root / "cat" / "x.png").write_bytes(b"\x89PNG but not really")
            if kind == "empty-class":
                (root / "dog").mkdir()
        return {"bad": root}

    return setup


def config_file(text: str):
    def setup(w, tmp):
        path = tmp / "run.toml"
        path.write_text(text.replace("{data}", str(w["data"])))
        return {"config": path}

    return setup


def knowledge_data(w, tmp):
    from move.knowledge.corpus import KnowledgeConfig, prepare_knowledge

    prepare_knowledge(KnowledgeConfig(individuals=20), tmp / "knowledge")
    return {"bad": tmp / "knowledge"}


def bigger_tokenizer(w, tmp):
    """A tokenizer with more entries than the model has: its ids overflow the model."""
    folder = tmp / "corpus"
    folder.mkdir()
    sample = "".join(f"word{i} token{i * 7} " for i in range(3000))
    (folder / "a.txt").write_text(sample)
    (folder / "b.txt").write_text(sample[::-1])
    main(
        [
            "prepare",
            "--corpus",
            "txt",
            "--path",
            str(folder),
            "--vocab-size",
            "1200",
            "--val-fraction",
            "0.5",
            "--out",
            str(tmp / "big"),
        ]
    )
    return {"bad": tmp / "big" / "tokenizer.json", "text": folder / "a.txt"}


def users_folder(w, tmp):
    """A directory move did not create: --force must never delete it."""
    mine = tmp / "thesis"
    mine.mkdir()
    (mine / "thesis.tex").write_text("\\documentclass{article} years of work")
    (tmp / "notes.txt").write_text("a file where a directory would go")
    return {"mine": mine, "file": tmp / "notes.txt"}


CASES = [
    # --force replaces only what move created
    (
        "force-train-over-a-users-folder",
        users_folder,
        ["train", "--data", "{data}", "--out", "{mine}", *TINY, "--force"],
        "not a training run written by move",
    ),
    (
        "force-prepare-over-a-users-folder",
        users_folder,
        ["prepare", "--corpus", "shakespeare", "--out", "{mine}", "--force"],
        "not prepared data written by move",
    ),
    (
        "force-knowledge-over-a-users-folder",
        users_folder,
        ["knowledge-prepare", "--individuals", "10", "--out", "{mine}", "--force"],
        "not prepared data written by move",
    ),
    (
        "force-encode-over-a-users-folder",
        users_folder,
        ["image-encode", "--dataset", "digits", "--tokenizer", "pixel", "--out", "{mine}", "--force"],
        "not prepared data written by move",
    ),
    (
        "force-export-over-a-users-folder",
        users_folder,
        ["export-hf", "{ckpt}", "{mine}", "--force"],
        "not a Hugging Face export written by move",
    ),
    (
        "force-export-over-prepared-data",
        no_setup,
        ["export-hf", "{ckpt}", "{data}", "--force"],
        "not a Hugging Face export written by move",
    ),
    (
        "force-train-over-prepared-data",
        no_setup,
        ["train", "--data", "{data}", "--out", "{data}", *TINY, "--force"],
        "not a training run written by move",
    ),
    (
        "force-prepare-over-a-run",
        no_setup,
        ["prepare", "--corpus", "shakespeare", "--out", "{run}", "--force"],
        "not prepared data written by move",
    ),
    (
        "train-out-under-a-file",
        users_folder,
        ["train", "--data", "{data}", "--out", "{file}/run", *TINY],
        "the file system refused",
    ),
    (
        "prepare-out-under-a-file",
        users_folder,
        ["prepare", "--corpus", "shakespeare", "--out", "{file}/p"],
        "the file system refused",
    ),
    ("export-out-under-a-file", users_folder, ["export-hf", "{ckpt}", "{file}/hf"], "the file system refused"),
    (
        "encode-out-under-a-file",
        users_folder,
        ["image-encode", "--dataset", "digits", "--tokenizer", "pixel", "--out", "{file}/e"],
        "the file system refused",
    ),
    (
        "train-out-is-a-file",
        users_folder,
        ["train", "--data", "{data}", "--out", "{file}", *TINY, "--force"],
        "is a file",
    ),
    (
        "prepare-out-is-a-file",
        users_folder,
        ["prepare", "--corpus", "shakespeare", "--out", "{file}", "--force"],
        "is a file",
    ),
    # non-finite and out-of-range numbers
    (
        "grad-clip-nan",
        no_setup,
        ["train", "--data", "{data}", "--out", "{tmp}/r", *TINY, "--grad-clip", "nan"],
        "grad_clip must be a finite number",
    ),
    (
        "softcap-nan",
        no_setup,
        ["train", "--data", "{data}", "--out", "{tmp}/r", *TINY, "--logit-softcap", "nan"],
        "logit_softcap must be a finite number",
    ),
    (
        "rope-base-nan",
        no_setup,
        ["train", "--data", "{data}", "--out", "{tmp}/r", *TINY, "--rope-base", "nan"],
        "rope_base must be a finite number",
    ),
    (
        "rope-base-below-one",
        no_setup,
        ["train", "--data", "{data}", "--out", "{tmp}/r", *TINY, "--rope-base", "0.5"],
        "rope_base must be > 1",
    ),
    (
        "weight-decay-huge",
        no_setup,
        ["train", "--data", "{data}", "--out", "{tmp}/r", *TINY, "--weight-decay", "1e30"],
        "weight_decay must be in [0, 1]",
    ),
    (
        "config-missing",
        no_setup,
        ["train", "--config", "{tmp}/nowhere.toml", "--out", "{tmp}/r"],
        "cannot read the config file",
    ),
    (
        "config-not-toml",
        config_file("steps = = 3"),
        ["train", "--config", "{config}", "--out", "{tmp}/r"],
        "not valid TOML",
    ),
    (
        "config-unknown-key",
        config_file('data = "{data}"\n[train]\nstepz = 3'),
        ["train", "--config", "{config}", "--out", "{tmp}/r"],
        "unknown key(s) in [train]: stepz",
    ),
    (
        "config-unknown-top",
        config_file('data = "{data}"\nvariant = "move"'),
        ["train", "--config", "{config}", "--out", "{tmp}/r"],
        "unknown key(s) in the top level: variant",
    ),
    (
        "config-model-not-table",
        config_file('data = "{data}"\nmodel = 3'),
        ["train", "--config", "{config}", "--out", "{tmp}/r"],
        "[model] must be a table",
    ),
    (
        "config-without-data",
        config_file("[train]\nsteps = 3"),
        ["train", "--config", "{config}", "--out", "{tmp}/r"],
        "no training data",
    ),
    (
        "config-bad-value",
        config_file('data = "{data}"\npreset = "tiny"\n[train]\nsteps = -3'),
        ["train", "--config", "{config}", "--out", "{tmp}/r"],
        "steps must be positive",
    ),
    (
        "lr-inf",
        no_setup,
        ["train", "--data", "{data}", "--out", "{tmp}/r", *TINY, "--lr-value-memory", "inf"],
        "lr_value_memory must be a finite number",
    ),
    (
        "peak-tflops-inf",
        no_setup,
        ["train", "--data", "{data}", "--out", "{tmp}/r", *TINY, "--peak-tflops", "inf"],
        "peak_tflops must be a finite number",
    ),
    (
        "warmdown-nan",
        no_setup,
        ["train", "--data", "{data}", "--out", "{tmp}/r", *TINY, "--warmdown-frac", "nan"],
        "warmdown_frac must be a finite number",
    ),
    (
        "vq-commitment-nan",
        no_setup,
        ["image-tokenizer", "--dataset", "digits", "--out", "{tmp}/v", "--commitment", "nan"],
        "commitment must be a finite number",
    ),
    (
        "export-nan-checkpoint",
        damaged_checkpoint(nan_weights),
        ["export-hf", "{bad}", "{tmp}/hf"],
        "lm_head.weight holds NaN or infinite values",
    ),
    # impossible configs
    (
        "heads-not-dividing-width",
        no_setup,
        ["train", "--data", "{data}", "--out", "{tmp}/r", *TINY, "--n-head", "3"],
        "does not divide n_embd",
    ),
    (
        "mla-move-latent-not-divisible",
        no_setup,
        [
            "train",
            "--data",
            "{data}",
            "--out",
            "{tmp}/r",
            *TINY,
            "--attention",
            "mla",
            "--variant",
            "move",
            "--kv-latent-dim",
            "31",
        ],
        "divisible by n_head",
    ),
    (
        "move-density-zero",
        no_setup,
        ["train", "--data", "{data}", "--out", "{tmp}/r", *TINY, "--variant", "move", "--density", "0"],
        "argument --density: must be >= 1, got 0",
    ),
    (
        "move-slots-negative",
        no_setup,
        ["train", "--data", "{data}", "--out", "{tmp}/r", *TINY, "--variant", "move", "--memory-slots", "-2"],
        "memory_slots must be >= 0",
    ),
    (
        "unknown-variant",
        no_setup,
        ["train", "--data", "{data}", "--out", "{tmp}/r", *TINY, "--variant", "moe"],
        "argument --variant: invalid choice: 'moe'",
    ),
    (
        "unknown-compare-variant",
        no_setup,
        ["compare", "--data", "{data}", "--out", "{tmp}/c", *TINY, "--variants", "move:x"],
        "must be an integer",
    ),
    (
        "unknown-preset",
        no_setup,
        ["train", "--data", "{data}", "--out", "{tmp}/r", "--preset", "huge"],
        "argument --preset: invalid choice: 'huge'",
    ),
    (
        "zero-layers",
        no_setup,
        ["train", "--data", "{data}", "--out", "{tmp}/r", *TINY, "--n-layer", "0"],
        "n_layer must be positive",
    ),
    (
        "negative-width",
        no_setup,
        ["train", "--data", "{data}", "--out", "{tmp}/r", *TINY, "--n-embd", "-64"],
        "n_embd must be positive",
    ),
    (
        "zero-steps",
        no_setup,
        ["train", "--data", "{data}", "--out", "{tmp}/r", *TINY, "--steps", "0"],
        "steps must be positive",
    ),
    (
        "negative-batch",
        no_setup,
        ["train", "--data", "{data}", "--out", "{tmp}/r", *TINY, "--batch-size", "-1"],
        "batch_size must be positive",
    ),
    (
        "lr-too-large",
        no_setup,
        ["train", "--data", "{data}", "--out", "{tmp}/r", *TINY, "--lr-embedding", "100"],
        "lr_embedding must be in",
    ),
    (
        "lr-negative",
        no_setup,
        ["train", "--data", "{data}", "--out", "{tmp}/r", *TINY, "--lr-matrix", "-0.1"],
        "lr_matrix must be in",
    ),
    (
        "warmdown-out-of-range",
        no_setup,
        ["train", "--data", "{data}", "--out", "{tmp}/r", *TINY, "--warmdown-frac", "2"],
        "warmdown_frac",
    ),
    (
        "unknown-optimizer",
        no_setup,
        ["train", "--data", "{data}", "--out", "{tmp}/r", *TINY, "--optimizer", "sgd"],
        "unknown optimizer 'sgd'",
    ),
    (
        "lazy-on-reference-path",
        no_setup,
        [
            "train",
            "--data",
            "{data}",
            "--out",
            "{tmp}/r",
            *TINY,
            "--variant",
            "move",
            "--value-memory-optimizer",
            "lazy",
            "--value-memory-path",
            "reference",
        ],
        "needs the fast path",
    ),
    # command line
    (
        "unknown-flag",
        no_setup,
        ["train", "--data", "{data}", "--out", "{tmp}/r", "--bogus"],
        "unrecognized arguments: --bogus",
    ),
    (
        "flag-of-wrong-type",
        no_setup,
        ["train", "--data", "{data}", "--out", "{tmp}/r", "--steps", "many"],
        "invalid int value",
    ),
    ("eval-without-data", no_setup, ["eval", "{ckpt}"], "eval needs --data or --text"),
    (
        "bad-temperature",
        no_setup,
        ["sample", "{ckpt}", "--temperature", "-1"],
        "temperature must be a finite number >= 0",
    ),
    ("bad-top-p", no_setup, ["sample", "{ckpt}", "--top-p", "0"], "top_p must be in (0, 1]"),
    ("temperature-nan", no_setup, ["sample", "{ckpt}", "--temperature", "nan"], "temperature must be a finite number"),
    ("temperature-inf", no_setup, ["sample", "{ckpt}", "--temperature", "inf"], "temperature must be a finite number"),
    ("zero-samples", no_setup, ["sample", "{ckpt}", "--num-samples", "0"], "--num-samples: must be >= 1"),
    ("negative-max-tokens", no_setup, ["sample", "{ckpt}", "--max-tokens", "-5"], "max_new_tokens must be in"),
    ("huge-max-tokens", no_setup, ["sample", "{ckpt}", "--max-tokens", "1000000000"], "max_new_tokens must be in"),
    (
        "seed-beyond-64-bits",
        no_setup,
        ["sample", "{ckpt}", "--max-tokens", "2", "--seed", str(2**64)],
        "seed must be in",
    ),
    ("negative-seed", no_setup, ["sample", "{ckpt}", "--max-tokens", "2", "--seed", "-1"], "seed must be in"),
    (
        "eval-batch-zero",
        no_setup,
        ["eval", "{ckpt}", "--data", "{data}", "--batch-size", "0"],
        "--batch-size: must be >= 1",
    ),
    (
        "eval-max-tokens-zero",
        no_setup,
        ["eval", "{ckpt}", "--data", "{data}", "--max-tokens", "0"],
        "--max-tokens: must be >= 1",
    ),
    (
        "eval-empty-text",
        text_folder_with({"empty.txt": b""}),
        ["eval", "{ckpt}", "--text", "{bad}/empty.txt"],
        "no text to evaluate",
    ),
    (
        "cfg-scale-nan",
        no_setup,
        ["image-sample", "{img_run}", "--cfg-scale", "nan", "--out", "{tmp}/g.png"],
        "cfg_scale must be a finite number",
    ),
    (
        "per-class-zero",
        no_setup,
        ["image-sample", "{img_run}", "--per-class", "0", "--out", "{tmp}/g.png"],
        "--per-class: must be >= 1",
    ),
    (
        "image-eval-one-sample",
        no_setup,
        ["image-eval", "{img_run}", "--classifier", "{cls}", "--num-samples", "1"],
        "--num-samples: must be >= 2",
    ),
    (
        "knowledge-one-person",
        no_setup,
        ["knowledge-prepare", "--individuals", "1", "--out", "{tmp}/k"],
        "--individuals: must be >= 2",
    ),
    # corpora
    (
        "missing-corpus-path",
        no_setup,
        ["prepare", "--corpus", "txt", "--path", "{tmp}/nowhere", "--out", "{tmp}/p"],
        "nowhere",
    ),
    ("corpus-path-not-given", no_setup, ["prepare", "--corpus", "txt", "--out", "{tmp}/p"], "needs --path"),
    (
        "empty-corpus",
        text_folder_with({"a.txt": b"", "b.txt": b"  \n"}),
        ["prepare", "--corpus", "txt", "--path", "{bad}", "--out", "{tmp}/p"],
        "no non-empty documents",
    ),
    (
        "only-non-utf8-files",
        text_folder_with({"a.txt": "caf\xe9 cr\xe8me".encode("latin-1") * 50}),
        ["prepare", "--corpus", "txt", "--path", "{bad}", "--out", "{tmp}/p"],
        "no non-empty documents",
    ),
    (
        "unreadable-jsonl",
        text_folder_with({"a.jsonl": b"{not json\n"}),
        ["prepare", "--corpus", "jsonl", "--path", "{bad}/a.jsonl", "--out", "{tmp}/p"],
        "a.jsonl",
    ),
    # prepared data
    ("no-prepared-data", no_setup, ["train", "--data", "{tmp}/nowhere", "--out", "{tmp}/r"], "no prepared data"),
    (
        "truncated-shard",
        damaged_data(lambda d: truncate(d / "train.bin")),
        ["train", "--data", "{bad}", "--out", "{tmp}/r", *TINY],
        "manifest says",
    ),
    (
        "corrupted-shard",
        damaged_data(lambda d: flip_byte(d / "val.bin")),
        ["train", "--data", "{bad}", "--out", "{tmp}/r", *TINY],
        "checksum does not match",
    ),
    (
        "manifest-missing-keys",
        damaged_data(lambda d: (d / "manifest.json").write_text('{"format": "move-text-data", "splits": {}}')),
        ["train", "--data", "{bad}", "--out", "{tmp}/r"],
        "damaged manifest, missing tokenizer_sha256",
    ),
    (
        "manifest-not-json",
        damaged_data(lambda d: (d / "manifest.json").write_text("{")),
        ["train", "--data", "{bad}", "--out", "{tmp}/r"],
        "not a move-text-data manifest",
    ),
    (
        "foreign-tokenizer",
        damaged_data(lambda d: Tokenizer.gpt2().save(d)),
        ["train", "--data", "{bad}", "--out", "{tmp}/r"],
        "does not match the tokenizer",
    ),
    # token ids
    (
        "token-ids-beyond-the-model",
        bigger_tokenizer,
        ["eval", "{ckpt}", "--text", "{text}", "--tokenizer", "{bad}"],
        "token ids must lie in [0, 512)",
    ),
    # checkpoints
    ("not-a-checkpoint", no_setup, ["eval", "{tmp}", "--text", "x"], "neither a checkpoint nor a run directory"),
    (
        "truncated-weights",
        damaged_checkpoint(lambda c: truncate(c / "model.safetensors")),
        ["sample", "{bad}"],
        "checksum mismatch",
    ),
    (
        "corrupted-weights",
        damaged_checkpoint(lambda c: flip_byte(c / "model.safetensors")),
        ["sample", "{bad}"],
        "checksum mismatch",
    ),
    (
        "corrupted-bank-under-mmap",
        damaged_checkpoint(lambda c: flip_byte(c / "model.safetensors")),
        ["sample", "{bad}", "--mmap-bank"],
        "checksum mismatch",
    ),
    (
        "edited-checkpoint-config",
        damaged_checkpoint(
            lambda c: (c / "config.json").write_text(
                (c / "config.json").read_text().replace('"rope_base": 10000.0', '"rope_base": 500.0')
            )
        ),
        ["sample", "{bad}"],
        "config.json: checksum mismatch",
    ),
    (
        "corrupt-checkpoint-config",
        damaged_checkpoint(lambda c: (c / "config.json").write_text('{"format": ')),
        ["sample", "{bad}"],
        "config.json: not valid JSON",
    ),
    (
        "checkpoint-of-another-kind",
        no_setup,
        ["sample", "{vq}/checkpoints/step_000001"],
        "holds a vqvae checkpoint, expected a gpt",
    ),
    (
        "classifier-is-a-gpt",
        no_setup,
        ["image-eval", "{img_run}", "--classifier", "{ckpt}"],
        "holds a gpt checkpoint, expected a classifier",
    ),
    (
        "image-eval-of-a-text-model",
        no_setup,
        ["image-eval", "{ckpt}", "--classifier", "{cls}"],
        "not a move-image-data manifest",
    ),
    (
        "resume-with-another-variant",
        no_setup,
        ["train", "--data", "{data}", "--out", "{run}", *TINY, "--variant", "lave", "--resume"],
        "another model config",
    ),
    (
        "resume-with-another-shape",
        no_setup,
        ["train", "--data", "{data}", "--out", "{run}", *TINY, "--variant", "move", "--n-embd", "128", "--resume"],
        "another model config",
    ),
    (
        "resume-with-a-damaged-run-record",
        damaged_run(lambda r: (r / "run.json").write_text('{"model_config": ')),
        ["train", "--data", "{data}", "--out", "{bad}", *TINY, "--variant", "move", "--resume"],
        "damaged run record",
    ),
    (
        "resume-with-a-malformed-metrics-line",
        damaged_run(lambda r: (r / "metrics.jsonl").write_text("{oops\n" + (r / "metrics.jsonl").read_text())),
        ["train", "--data", "{data}", "--out", "{bad}", *TINY, "--variant", "move", "--resume"],
        "line 1 is not JSON",
    ),
    (
        "gates-text-missing",
        no_setup,
        ["gates", "{run}", "--text", "{tmp}/nowhere.txt", "--out", "{tmp}/g.png"],
        "nowhere.txt: cannot read the text file",
    ),
    ("report-of-a-non-results-dir", no_setup, ["report", "{tmp}"], "not an experiment results directory"),
    ("experiment-file-missing", no_setup, ["experiment", "{tmp}/none.toml"], "cannot read the experiment file"),
    ("knowledge-eval-on-text-data", no_setup, ["knowledge-eval", "{ckpt}"], "missing or unreadable knowledge file"),
    ("compile-with-mmap-bank", no_setup, ["sample", "{ckpt}", "--compile", "--mmap-bank"], "do not combine"),
    ("sample-of-an-empty-dir", no_setup, ["sample", "{tmp}"], "neither a checkpoint nor a run directory"),
    (
        "resume-nothing",
        no_setup,
        ["train", "--data", "{data}", "--out", "{tmp}/fresh", *TINY, "--resume"],
        "nothing to resume",
    ),
    (
        "run-dir-holds-a-run",
        no_setup,
        ["train", "--data", "{data}", "--out", "{run}", *TINY, "--variant", "move"],
        "already holds a run",
    ),
    (
        "prepare-over-other-data",
        no_setup,
        ["prepare", "--corpus", "shakespeare", "--out", "{data}"],
        "source: 'txt', not 'shakespeare'",
    ),
    (
        "prepare-over-other-vocab",
        no_setup,
        [
            "prepare",
            "--corpus",
            "txt",
            "--path",
            "{text}",
            "--vocab-size",
            "600",
            "--val-fraction",
            "0.25",
            "--passage-tokens",
            "64",
            "--out",
            "{data}",
        ],
        "other options (vocab_size: 512, not 600)",
    ),
    (
        "knowledge-over-other",
        knowledge_data,
        ["knowledge-prepare", "--individuals", "30", "--out", "{bad}"],
        "other options (individuals: 20, not 30)",
    ),
    # images
    (
        "image-folder-without-classes",
        image_folder("no-classes"),
        ["image-encode", "--dataset", "folder", "--root", "{bad}", "--tokenizer", "pixel", "--out", "{tmp}/e"],
        "no class sub-folders",
    ),
    (
        "unreadable-image",
        image_folder("unreadable"),
        [
            "image-encode",
            "--dataset",
            "folder",
            "--root",
            "{bad}",
            "--channels",
            "1",
            "--tokenizer",
            "pixel",
            "--out",
            "{tmp}/e",
        ],
        "unreadable image",
    ),
    (
        "class-without-images",
        image_folder("empty-class"),
        ["image-encode", "--dataset", "folder", "--root", "{bad}", "--tokenizer", "pixel", "--out", "{tmp}/e"],
        "has no training images",
    ),
    (
        "folder-without-root",
        no_setup,
        ["image-encode", "--dataset", "folder", "--tokenizer", "pixel", "--out", "{tmp}/e"],
        "needs --root",
    ),
    (
        "pixel-quantizer-on-colour",
        image_folder("ok"),
        ["image-encode", "--dataset", "folder", "--root", "{bad}", "--tokenizer", "pixel", "--out", "{tmp}/e"],
        "grayscale",
    ),
    (
        "tokenizer-not-a-checkpoint",
        no_setup,
        ["image-encode", "--dataset", "digits", "--tokenizer", "{tmp}", "--out", "{tmp}/e"],
        "neither a checkpoint nor a run",
    ),
    (
        "image-encode-over-existing",
        no_setup,
        ["image-encode", "--dataset", "digits", "--tokenizer", "pixel", "--out", "{img}"],
        "already holds data prepared with other options (dataset: ",
    ),
    (
        "vq-on-wrong-image-size",
        no_setup,
        ["image-encode", "--dataset", "mnist", "--tokenizer", "{vq}", "--out", "{tmp}/e"],
        "expects images of shape",
    ),
    (
        "image-data-on-text-model",
        no_setup,
        ["image-sample", "{ckpt}", "--data", "{img}", "--out", "{tmp}/g.png"],
        "does not fit the image data",
    ),
    (
        "unknown-image-dataset",
        no_setup,
        ["image-encode", "--dataset", "cifar", "--tokenizer", "pixel", "--out", "{tmp}/e"],
        "invalid choice: 'cifar'",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, world, tmp_path, capsys):
    _name, setup, argv, message = case
    places = {k: str(v) for k, v in {**world, "tmp": tmp_path, **setup(world, tmp_path)}.items()}
    guarded = {k: tree_digest(Path(places[k])) for k in ("data", "run", "img", "mine") if k in places}
    code, err = cli([a.format(**places) for a in argv], capsys)
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert message in lines[0], lines[0]
    for k, digest in guarded.items():  # nothing already written was touched
        assert tree_digest(Path(places[k])) == digest, f"{k} changed"
    if "file" in places:
        assert Path(places["file"]).read_text() == "a file where a directory would go"


def test_there_are_at_least_a_hundred_distinct_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 100


def test_a_non_utf8_file_is_skipped_with_a_warning(tmp_path, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "good.txt").write_text("To be, or not to be, that is the question.\n" * 200)
    (folder / "bad.txt").write_bytes("caf\xe9".encode("latin-1") * 100)
    code, err = cli(
        ["prepare", "--corpus", "txt", "--path", folder, "--vocab-size", "300", "--out", tmp_path / "p"], capsys
    )
    assert code == 0
    assert "warning: skipping" in err and "bad.txt" in err


def test_data_dir_for_a_checkpoint_without_recorded_data():
    """eval, sample, image-*, knowledge-eval and export-hf find the training data in
    the checkpoint's header; without it the error names the flag that supplies it."""
    from move.errors import UserError
    from move.training.checkpoint import data_dir_for

    recorded = {"meta": {"task": {"data": "data/recorded"}}}
    assert data_dir_for("ckpt", recorded, None, "--data") == "data/recorded"
    assert data_dir_for("ckpt", recorded, "data/given", "--data") == "data/given"
    with pytest.raises(UserError, match=r"^ckpt: no data directory recorded; pass --tokenizer$"):
        data_dir_for("ckpt", {"meta": {}}, None, "--tokenizer")


def test_force_replaces_moves_own_output_atomically(world, text_folder, tmp_path, capsys):
    """What move made, --force does replace: prepared data and an export."""
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    (data / "train.bin").write_bytes(b"stale")  # proves the directory was rebuilt
    assert (
        cli(
            ["prepare", "--corpus", "txt", "--path", text_folder, "--vocab-size", "300", "--out", data, "--force"],
            capsys,
        )[0]
        == 0
    )
    assert (data / "train.bin").read_bytes() != b"stale" and (data / "manifest.json").is_file()
    export = tmp_path / "hf"
    assert cli(["export-hf", world["ckpt"], export], capsys)[0] == 0
    (export / "stale.txt").write_text("old")
    assert cli(["export-hf", world["ckpt"], export, "--force"], capsys)[0] == 0
    assert not (export / "stale.txt").exists() and (export / "modeling_move.py").is_file()
    assert not list(tmp_path.glob(".hf.*"))  # no temporary or old directory left behind


def test_replace_directory_swaps_in_one_step_or_falls_back(tmp_path, monkeypatch):
    from move import files

    def fresh(name, content):
        d = tmp_path / name
        d.mkdir()
        (d / "f").write_text(content)
        return d

    target, built = fresh("target", "old"), fresh(".built", "new")
    assert files._exchange(built, target)  # renameat2 works here: one atomic swap
    assert (target / "f").read_text() == "new" and (built / "f").read_text() == "old"
    files.replace_directory(fresh(".built2", "newer"), target)
    assert (target / "f").read_text() == "newer" and sorted(p.name for p in tmp_path.iterdir()) == [".built", "target"]
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)  # a system without renameat2
    files.replace_directory(fresh(".built3", "newest"), target)
    assert (target / "f").read_text() == "newest" and sorted(p.name for p in tmp_path.iterdir()) == [".built", "target"]


def test_leftovers_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    import subprocess

    from move.files import temporary_sibling

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f".data.tmp-{dead.pid}").mkdir()  # a killed prepare's half-written output
    alive = tmp_path / ".data.tmp-1"  # pid 1 always runs
    alive.mkdir()
    mine = temporary_sibling(tmp_path / "data")
    assert mine.is_dir() and not (tmp_path / f".data.tmp-{dead.pid}").exists() and alive.exists()
