"""`move plan`: what a run needs, without allocating. The memory estimate is checked
against the peak measured while training the same shape here (each in a fresh
process, so its resident high-water mark is its own); the paper-scale answers against
sizes known independently (the presets' parameter counts, tested in test_presets.py)."""

import json
import math
import os
import subprocess
import sys

import pytest

from move.cli import main
from move.config import OptimConfig, TrainConfig, model_config_from_preset
from move.device import PEAK_BF16_FLOPS
from move.training.plan import GPU_MARGIN, advice, fits, plan_run

GIB = 2**30


def measured_plan(*argv) -> dict:
    """`move plan --measure --json` in a fresh process: the resident high-water mark is its own."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "move", "plan", *argv, "--device", "cpu", "--measure", "2", "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def move_plan(capsys, *argv) -> tuple[int, str, str]:
    """`move plan` in this process -> (exit status, stdout, stderr)."""
    try:
        status = main(["plan", *argv])
    except SystemExit as e:  # argparse's usage errors
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


SMALL = ["--preset", "small", "--n-embd", "256", "--vocab-size", "4096", "--seq-len", "256", "--batch-size", "8"]


@pytest.mark.parametrize(
    "shape",
    [
        ["--variant", "move", "--density", "4"],  # the bank, exact optimiser
        ["--attention", "mla", "--variant", "lave", "--density", "2", "--optimizer", "adamw"],
        pytest.param(
            [
                "--n-kv-head",
                "2",
                "--variant",
                "move",
                "--density",
                "2",
                "--value-memory-optimizer",
                "lazy",
                "--grad-accum",
                "2",
            ],
            marks=pytest.mark.slow,
        ),
        pytest.param(["--variant", "pkm", "--density", "4"], marks=pytest.mark.slow),  # the other memory designs
        pytest.param(["--variant", "bigram", "--density", "4"], marks=pytest.mark.slow),
    ],
    ids=["move-x4", "mla-lave-x2-adamw", "gqa-move-x2-lazy-accum", "pkm-x4", "bigram-x4"],
)
def test_the_memory_estimate_is_within_20_percent_of_the_measured_peak(shape):
    out = measured_plan(*SMALL, *shape)
    measured, planned = out["measured_peak_bytes"], out["memory_total_bytes"]
    assert planned > 0.3 * GIB  # large enough that the process's own overhead does not decide the ratio
    assert 0.8 <= measured / planned <= 1.2, (measured / GIB, planned / GIB)


def test_paper_scale_answers_for_move_x4_on_8_h100(capsys):
    """d12 / d20 / d32 MoVE x4 at nanochat's batch (256 x 2,048 tokens per step) on 8 x 80 GB."""
    bank_params = {"d12": 65536 * 24 * 768, "d20": 65536 * 40 * 1280, "d32": 65536 * 64 * 2048}  # V x M x width
    for preset, bank in bank_params.items():
        argv = [
            "--preset",
            preset,
            "--variant",
            "move",
            "--density",
            "4",
            "--processes",
            "8",
            "--gpu-memory",
            "80GB",
            "--card",
            "H100",
            "--batch-size",
            "256",
            "--steps",
            "5000",
        ]
        out = json.loads(move_plan(capsys, *argv, "--json")[1])
        assert out["params"]["value_memory"] == bank
        assert out["micro_batch"] == 32 and out["bf16"] is True
        assert out["tokens"] == 5000 * 256 * 2048
        # each process holds an eighth of the bank's rows: weights, gradient, two moments, all fp32
        dense = out["params"]["total"] - bank
        assert out["memory_bytes"]["weights"] == 4 * dense + 4 * bank // 8
        expected_hours = out["tokens"] * out["flops_per_token"] / (989e12 * 0.4 * 8) / 3600
        assert out["hours"] == pytest.approx(expected_hours)
        assert out["fits"] == (out["memory_total_bytes"] <= (1 - GPU_MARGIN) * 80 * GIB)
        text = move_plan(capsys, *argv)[1]
        assert ("WILL NOT FIT" in text) == (not out["fits"])
        assert f"{out['params']['total']:,}" in text and "H100" in text


def test_every_suggested_change_makes_the_plan_fit():
    """Advice is checked by planning again with each suggested command line."""
    config = model_config_from_preset("d20", value_memory="move", memory_density=8)
    train = TrainConfig(batch_size=64, steps=10)
    plan = plan_run(config, train, processes=2, bf16=True)
    device = 80 * GIB
    assert not fits(plan, device)
    lines = advice(plan, device)
    assert any("--grad-accum" in line for line in lines) and any("--processes" in line for line in lines)
    for line in lines:
        flags = line.split(" (")[0].split()
        changes = dict(zip(flags[::2], flags[1::2]))
        t, processes = train, plan.processes
        if "--batch-size" in changes:
            t = TrainConfig(batch_size=int(changes["--batch-size"]), grad_accum=int(changes["--grad-accum"]), steps=10)
            assert t.batch_size * t.grad_accum == train.batch_size * train.grad_accum  # same tokens per step
        if "--processes" in changes:
            processes = int(changes["--processes"])
        if "--value-memory-dtype" in changes:
            t = TrainConfig(batch_size=64, steps=10, value_memory_dtype="bfloat16")
        assert fits(plan_run(config, t, processes, bf16=True), device), line


def test_sharding_divides_the_bank_state_and_nothing_else():
    config = model_config_from_preset("d12", value_memory="move", memory_density=4)
    one, eight = (plan_run(config, TrainConfig(batch_size=8), processes=n) for n in (1, 8))
    bank = one.params["value_memory"]
    assert one.memory["optimizer"] - eight.memory["optimizer"] == 8 * bank - 8 * math.ceil(bank / 8)
    assert one.memory["weights"] - eight.memory["weights"] == 4 * bank - 4 * math.ceil(bank / 8)
    # activations follow the micro-batch: 8 sequences on one process, 1 on each of eight
    assert one.memory["activations"] == pytest.approx(8 * eight.memory["activations"], rel=1e-6)


def test_muon_keeps_one_moment_per_matrix_and_adamw_two():
    config = model_config_from_preset("small", vocab_size=512)
    muon, adamw = (plan_run(config, TrainConfig(optim=OptimConfig(optimizer=o))) for o in ("muon", "adamw"))
    matrices = muon.params["transformer_matrices"] + muon.params["routers"]
    assert adamw.memory["optimizer"] - muon.memory["optimizer"] == 4 * matrices


def test_known_cards_give_their_data_sheet_peak(capsys):
    sheet = dict(PEAK_BF16_FLOPS)
    out = json.loads(
        move_plan(capsys, "--preset", "small", "--vocab-size", "512", "--card", "a100", "--mfu", "0.5", "--json")[1]
    )
    assert out["hours"] == pytest.approx(out["tokens"] * out["flops_per_token"] / (sheet["A100"] * 0.5) / 3600)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gpu-memory", "eighty"], "not a memory size"),
        (["--mfu", "1.5"], "must be in (0, 1]"),
        (["--card", "TPU"], "unknown card 'TPU'"),
        (["--processes", "3", "--batch-size", "16"], "must divide evenly over 3 processes"),
        (["--processes", "2", "--measure", "1"], "--measure trains in this one process"),
    ],
)
def test_bad_plan_requests_get_one_line(capsys, argv, message):
    status, out, err = move_plan(capsys, "--preset", "small", "--vocab-size", "512", *argv)
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1 and not out
