"""Runs killed at arbitrary moments resume to bit-identical results; a full disk
while checkpointing costs nothing already saved (issue: reliability)."""

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import torch

import move.training.checkpoint
from move.cli import main
from move.training.checkpoint import load_state_dict
from move.training.trainer import checkpoint_dirs

RUN_FLAGS = [
    "--preset",
    "tiny",
    "--variant",
    "move",
    "--density",
    "2",
    "--steps",
    "30",
    "--batch-size",
    "4",
    "--eval-every",
    "5",
    "--eval-tokens",
    "1024",
    "--checkpoint-every",
    "3",
    "--keep-checkpoints",
    "2",
]


def train_command(data, run, resume=False):
    return [
        sys.executable,
        "-m",
        "move",
        "train",
        "--data",
        str(data),
        "--out",
        str(run),
        *RUN_FLAGS,
        *(["--resume"] if resume else []),
    ]


def final_state(run):
    """Weights of the final checkpoint and the metrics without wall-clock fields."""
    weights, _ = load_state_dict(checkpoint_dirs(run)[-1])
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [{k: v for k, v in json.loads(line).items() if k != "tok_per_s"} for line in lines]
    return weights, records


def test_sigkill_at_random_moments_then_resume_is_bit_identical(prepared_dir, tmp_path):
    reference = tmp_path / "reference"
    proc = subprocess.Popen(
        train_command(prepared_dir, reference), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    while not (reference / "run.json").exists() and proc.poll() is None:
        time.sleep(0.01)
    started = time.time()
    assert proc.wait() == 0
    training_seconds = time.time() - started  # how long a run exists before it finishes, on this machine now
    run = tmp_path / "killed"
    rng = random.Random(1234)
    kills_mid_run = 0
    for _attempt in range(12):
        started = (run / "run.json").exists()
        proc = subprocess.Popen(
            train_command(prepared_dir, run, resume=started),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if rng.random() < 0.25:  # anywhere, imports and set-up included
            time.sleep(rng.uniform(0.0, 1.5))
        else:  # somewhere in training: wait for the run to exist, then a random moment
            deadline = time.time() + 120
            while not (run / "run.json").exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.5 * training_seconds))
        if proc.poll() is None:
            kills_mid_run += (run / "run.json").exists() and not (run / "summary.json").exists()
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (run / "summary.json").exists():
            break
    assert kills_mid_run >= 2, "the kills should land while the run is training"
    if not (run / "summary.json").exists():
        finish = subprocess.run(
            train_command(prepared_dir, run, resume=(run / "run.json").exists()), capture_output=True, text=True
        )
        assert finish.returncode == 0, finish.stderr[-2000:]
    weights, records = final_state(run)
    ref_weights, ref_records = final_state(reference)
    assert weights.keys() == ref_weights.keys()
    for name in weights:
        assert torch.equal(weights[name], ref_weights[name]), name
    assert records == ref_records
    assert not list((run / "checkpoints").glob(".*")), "temporary checkpoint directories were left behind"


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(prepared_dir, tmp_path, monkeypatch, capsys):
    real_write = move.training.checkpoint.write_synced

    def write_fails_at_step_6(path, data):
        if "step_000006" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(path, data)

    monkeypatch.setattr(move.training.checkpoint, "write_synced", write_fails_at_step_6)
    run = tmp_path / "run"
    flags = [f if f != "30" else "9" for f in RUN_FLAGS]
    assert main(["train", "--data", str(prepared_dir), "--out", str(run), *flags]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (the progress bar precedes it on stderr)
    assert last.startswith("error:") and "No space left on device" in last
    assert [c.name for c in checkpoint_dirs(run)] == ["step_000003"]
    load_state_dict(checkpoint_dirs(run)[-1])  # intact: checksums verify
    assert not list((run / "checkpoints").glob(".*"))
    monkeypatch.setattr(move.training.checkpoint, "write_synced", real_write)  # space freed: the run resumes
    assert main(["train", "--data", str(prepared_dir), "--out", str(run), *flags, "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().out


def test_sigterm_on_the_command_line_exits_0_with_a_checkpoint(prepared_dir, tmp_path):
    run = tmp_path / "run"
    flags = [f if f != "30" else "100000" for f in RUN_FLAGS]
    proc = subprocess.Popen(
        [sys.executable, "-m", "move", "train", "--data", str(prepared_dir), "--out", str(run), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not checkpoint_dirs(run) if (run / "checkpoints").exists() else True:
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "continue with --resume" in err
    stopped_at = int(re.search(r"stopped at step (\d+)", err).group(1))
    newest = checkpoint_dirs(run)[-1]
    load_state_dict(newest)
    # the checkpoint is the state it stopped in (step 3 itself when the signal came
    # between writing that checkpoint and starting step 4)
    assert int(newest.name.split("_")[1]) == stopped_at >= 3
