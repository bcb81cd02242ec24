"""Every command end to end on `tiny`, and one-line errors with exit status 2."""

import io
import json
import subprocess
import sys

import pytest

from move.cli import main

TINY = [
    "--preset",
    "tiny",
    "--steps",
    "6",
    "--batch-size",
    "4",
    "--eval-every",
    "3",
    "--eval-tokens",
    "1024",
    "--checkpoint-every",
    "3",
]


def test_prepare_train_eval_sample(tmp_path, text_folder, capsys):
    data = tmp_path / "data"
    assert (
        main(
            [
                "prepare",
                "--corpus",
                "txt",
                "--path",
                str(text_folder),
                "--vocab-size",
                "400",
                "--passage-tokens",
                "64",
                "--out",
                str(data),
            ]
        )
        == 0
    )
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--variant", "move", "--density", "2", *TINY]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["accounting"]["params"]["value_memory"] > 0
    checkpoint = summary["checkpoint"]
    capsys.readouterr()
    assert main(["eval", checkpoint, "--data", str(data), "--max-tokens", "1024", "--batch-size", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bpb"] == pytest.approx(summary["val_bpb"], rel=1e-6)  # the same held-out tokens
    text = tmp_path / "t.txt"
    text.write_text("Is this a dagger which I see before me?\n" * 20)
    assert main(["eval", checkpoint, "--text", str(text)]) == 0
    assert json.loads(capsys.readouterr().out)["bpb"] > 0
    assert (
        main(["sample", checkpoint, "--prompt", "KING", "--max-tokens", "12", "--num-samples", "2", "--seed", "3"]) == 0
    )
    first = capsys.readouterr().out
    assert first.startswith("KING")
    main(["sample", checkpoint, "--prompt", "KING", "--max-tokens", "12", "--num-samples", "2", "--seed", "3"])
    assert capsys.readouterr().out == first  # seeded


@pytest.mark.slow
def test_compiled_sampling_writes_what_eager_sampling_writes(tmp_path, prepared_dir, capsys):
    checkpoint = str(tmp_path / "run")
    main(["train", "--data", str(prepared_dir), "--out", checkpoint, *TINY, "--variant", "move"])
    capsys.readouterr()
    argv = ["sample", checkpoint, "--prompt", "KING", "--max-tokens", "12", "--num-samples", "2", "--temperature", "0"]
    assert main(argv) == 0
    eager = capsys.readouterr().out
    assert main([*argv, "--compile"]) == 0
    assert capsys.readouterr().out == eager


def test_compare_trains_each_variant_once_and_reports(tmp_path, prepared_dir, capsys):
    args = [
        "compare",
        "--data",
        str(prepared_dir),
        "--out",
        str(tmp_path / "cmp"),
        *TINY,
        "--variants",
        "standard",
        "lave:1",
        "move:2",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    for name in ("standard", "lave_x1", "move_x2"):
        assert f"| {name} |" in out
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| move_x2 |" in report and (tmp_path / "cmp" / "val_bpb.png").stat().st_size > 0
    assert main(args) == 0
    assert capsys.readouterr().out.count("complete, skipped") == 3


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--data", "nowhere", "--out", "x"], "no prepared data"),
        (["train", "--data", "d", "--out", "x", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
        (["prepare", "--corpus", "txt", "--out", "x"], "needs --path"),
        (["train", "--data", "{data}", "--out", "x", "--preset", "huge"], "invalid choice: 'huge'"),
        (["train", "--data", "{data}", "--out", "x", "--preset", "tiny", "--n-head", "3"], "does not divide n_embd"),
        (["train", "--data", "{data}", "--out", "x", "--preset", "tiny", "--lr-matrix", "-1"], "lr_matrix must be in"),
        (["compare", "--data", "{data}", "--out", "x", "--variants", "moe"], "unknown variant 'moe'"),
        (["eval", "no-such-checkpoint", "--text", "t.txt"], "neither a checkpoint nor a run directory"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, prepared_dir, argv, message):
    argv = [a.replace("{data}", str(prepared_dir)) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "move", *argv], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_bench_quick_writes_a_table_of_ratios(tmp_path, capsys):
    assert (
        main(
            [
                "bench",
                "--quick",
                "--out",
                str(tmp_path),
                "--configs",
                "standard",
                "move_x1",
                "move_x4_ref",
                "--rounds",
                "1",
            ]
        )
        == 0
    )
    report = (tmp_path / "cpu_bench.md").read_text()
    assert "| move_x1 |" in report and "| move_x4_ref |" in report
    assert "train move_x1/standard" in report  # targets are checked
    assert "decode_b1_compiled move_x1/standard" in report  # the compiled step is measured too
    results = json.loads((tmp_path / "cpu_bench.json").read_text())
    assert results["512"]["standard"]["value_memory_params"] == 0
    assert results["512"]["move_x1"]["persistent_mb"] > results["512"]["standard"]["persistent_mb"]


def test_importing_the_cli_and_building_its_parser_loads_no_torch():
    """`move --help` must answer at once: the parser needs only the configs."""
    code = (
        "import sys, move.cli; move.cli.build_parser(); "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
    help_text = subprocess.run([sys.executable, "-m", "move", "train", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "--lr-value-memory" in help_text.stdout


def test_a_run_directory_works_after_its_data_is_moved_away(tmp_path, prepared_dir):
    """Checkpoints carry their tokenizer (checksummed): sample, eval --text, export and
    api.load need nothing outside the run directory."""
    import shutil

    from move import api
    from move.cli import main

    data = tmp_path / "data"
    shutil.copytree(prepared_dir, data)
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(run),
                "--preset",
                "tiny",
                "--variant",
                "move",
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--eval-every",
                "2",
                "--eval-tokens",
                "256",
            ]
        )
        == 0
    )
    shutil.move(str(data), str(tmp_path / "elsewhere"))
    moved = tmp_path / "moved_run"
    shutil.move(str(run), str(moved))
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be: that is the question.\n" * 20)
    for argv in (
        ["sample", str(moved), "--prompt", "KING", "--max-tokens", "4"],
        ["eval", str(moved), "--text", str(text)],
        ["export-hf", str(moved), str(tmp_path / "hf")],
    ):
        result = subprocess.run([sys.executable, "-m", "move", *argv], capture_output=True, text=True)
        assert result.returncode == 0, (argv, result.stderr)
    model, tokenizer = api.load(moved)
    assert tokenizer is not None and tokenizer.vocab_size <= model.config.vocab_size


def subcommand_parsers():
    import argparse

    from move.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, commands.choices


def test_every_flag_of_every_command_says_what_it_does_and_its_default():
    import argparse

    parser, commands = subcommand_parsers()
    for name, sub in [("move", parser), *commands.items()]:
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            where = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and len(action.help) > 3, f"{where}: no help text"
            takes_value = action.option_strings and action.nargs != 0 and not action.required
            if takes_value:
                shown = sub._get_formatter()._get_help_string(action)
                assert "(default " in shown, f"{where}: no default shown"


def shown_defaults(sub) -> dict:
    """dest -> the first word of the default a command's help shows."""
    import re

    defaults = {}
    for action in sub._actions:
        match = re.search(r"\(default ([^,)]+)", sub._get_formatter()._get_help_string(action) or "")
        if match and action.option_strings:
            defaults[action.dest] = match.group(1)
    return defaults


def as_shown(value) -> str:
    from move.cli import format_default

    return format_default(value)


def test_train_help_shows_the_defaults_a_run_really_gets(prepared_dir):
    """Parse `move train` with only --data and --out, resolve it the way a run does (the
    preset, the data, the dataclasses) and compare with what --help promised."""
    from move.cli import run_spec_from
    from move.config import TrainConfig
    from move.recipes import load_data, model_config_for

    parser, commands = subcommand_parsers()
    shown = shown_defaults(commands["train"])
    spec = run_spec_from(parser.parse_args(["train", "--data", str(prepared_dir), "--out", "unused"]))
    data = load_data(spec.data)
    effective = {
        **model_config_for(spec, data).to_dict(),
        **spec.train.to_flat(),
        "preset": spec.preset,
        "label_dropout": spec.label_dropout,
    }
    assert shown.pop("vocab_size") == "the data's vocabulary"
    assert effective["vocab_size"] == data.tokenizer.vocab_size
    assert set(shown) >= set(TrainConfig.flat_keys()) | {"n_embd", "seq_len", "value_memory", "memory_density"}
    for dest, text in shown.items():
        if dest in effective:
            assert text == as_shown(effective[dest]), f"--{dest}: help says {text}, a run gets {effective[dest]}"
    assert (shown["n_embd"], shown["seq_len"]) == ("128", "128")  # the small preset, not the dataclass's 256


@pytest.mark.parametrize("command", ["image-tokenizer", "image-classifier"])
def test_image_net_help_shows_the_defaults_a_run_really_gets(command):
    from move.cli import config_overrides, given_flags
    from move.config import ClassifierConfig, TrainConfig, VQConfig

    parser, commands = subcommand_parsers()
    shown = shown_defaults(commands[command])
    args = parser.parse_args([command, "--dataset", "digits", "--out", "unused"])
    net = {"image-tokenizer": VQConfig, "image-classifier": ClassifierConfig}[command]
    effective = {
        **given_flags(args),
        **net(**config_overrides(args, net)).to_dict(),
        **TrainConfig.from_flat(given_flags(args)).to_flat(),
    }
    checked = 0
    for dest, text in shown.items():
        if dest in effective and effective[dest] is not None:
            assert text == as_shown(effective[dest]), (
                f"{command} --{dest}: help says {text}, a run gets {effective[dest]}"
            )
            checked += 1
    assert checked > 15 and shown["steps"] == {"image-tokenizer": "1500", "image-classifier": "1000"}[command]


def test_a_run_writes_its_effective_config_and_relaunches_from_it(tmp_path, prepared_dir):
    """config.toml of a run launches the same run again (identical configs and losses);
    flags given with --config override the file."""
    first = tmp_path / "first"
    assert (
        main(
            [
                "train",
                "--data",
                str(prepared_dir),
                "--out",
                str(first),
                "--variant",
                "move",
                "--density",
                "2",
                "--lr-value-memory",
                "0.05",
                *TINY,
                "--steps",
                "3",
            ]
        )
        == 0
    )
    config = first / "config.toml"
    assert config.is_file()
    again = tmp_path / "again"
    assert main(["train", "--config", str(config), "--out", str(again)]) == 0
    record = lambda run: json.loads((run / "run.json").read_text())
    losses = lambda run: [
        r.get("train_loss") for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    ]
    assert record(again)["model_config"] == record(first)["model_config"]
    assert record(again)["train_config"] == record(first)["train_config"]
    assert losses(again) == losses(first)
    assert (again / "config.toml").read_text() == config.read_text()
    longer = tmp_path / "longer"
    assert main(["train", "--config", str(config), "--out", str(longer), "--steps", "4", "--n-layer", "3"]) == 0
    assert record(longer)["train_config"]["steps"] == 4 and record(longer)["model_config"]["n_layer"] == 3
    assert record(longer)["model_config"]["memory_density"] == 2  # the rest from the file
    assert record(longer)["train_config"]["optim"]["lr_value_memory"] == 0.05


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_long_commands_show_progress_on_a_terminal_and_training_loops_do_not(
    tmp_path, prepared_dir, monkeypatch, capsys
):
    """eval shows its bits-per-byte bar on a terminal (stderr); the same function run
    by the trainer's evaluation shows none (only the trainer's own bar)."""
    from move import progress

    run = tmp_path / "run"
    assert main(["train", "--data", str(prepared_dir), "--out", str(run), *TINY, "--steps", "2"]) == 0
    asked = []  # (description, whether the bar was disabled when made)
    real = progress.tqdm
    monkeypatch.setattr(progress, "tqdm", lambda *a, **k: asked.append((k["desc"], k["disable"])) or real(*a, **k))
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["train", "--data", str(prepared_dir), "--out", str(tmp_path / "again"), *TINY, "--steps", "2"]) == 0
    assert asked and all(disabled for _, disabled in asked)  # evaluations inside training: no bar of their own
    assert "bits per byte" not in terminal.getvalue()
    asked.clear()
    assert main(["eval", str(run), "--data", str(prepared_dir), "--max-tokens", "512", "--batch-size", "2"]) == 0
    assert asked == [("bits per byte", None)]  # None: tqdm shows it on a terminal
    assert "bits per byte" in terminal.getvalue()


def test_an_image_run_samples_after_its_data_and_tokenizer_are_moved_away(tmp_path):
    """Checkpoints of a model trained on VQ tokens carry the data's manifest and the
    VQ-VAE's checkpoint (checksummed): image-sample needs only the run directory."""
    import shutil

    from PIL import Image

    quick = ["--steps", "2", "--batch-size", "8", "--eval-every", "2", "--checkpoint-every", "2"]
    assert (
        main(
            [
                "image-tokenizer",
                "--dataset",
                "digits",
                *quick,
                "--eval-images",
                "16",
                "--downsample",
                "1",
                "--hidden",
                "8",
                "--codebook-size",
                "16",
                "--out",
                str(tmp_path / "vq"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "image-encode",
                "--dataset",
                "digits",
                "--tokenizer",
                str(tmp_path / "vq"),
                "--out",
                str(tmp_path / "tokens"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--data",
                str(tmp_path / "tokens"),
                "--out",
                str(tmp_path / "run"),
                *TINY,
                "--steps",
                "2",
                "--variant",
                "move",
            ]
        )
        == 0
    )
    away = tmp_path / "away"
    away.mkdir()
    for name in ("vq", "tokens", "run"):
        shutil.move(str(tmp_path / name), str(away / name))
    moved = tmp_path / "moved_run"
    shutil.move(str(away / "run"), str(moved))
    shutil.rmtree(away)  # the data and the tokenizer's run are gone
    grid = tmp_path / "grid.png"
    result = subprocess.run(
        [sys.executable, "-m", "move", "image-sample", str(moved), "--per-class", "2", "--out", str(grid)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    with Image.open(grid) as im:
        assert im.height == (10 * (8 + 1) + 1) * 12  # ten classes of 8x8 digits, one row each, enlarged 12x
