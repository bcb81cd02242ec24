"""Nothing the project reads from disk may run code: a crafted pickle in a
checkpoint, with a matching checksum, is refused and never executed."""

import hashlib
import io
import json
import pickle
import subprocess
import sys

import pytest
import torch

from move.errors import CheckpointError
from move.training.checkpoint import header_checksum, load_train_state
from move.training.trainer import checkpoint_dirs


class Payload:
    """Unpickling this runs `touch <marker>` (what an attacker would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


def plant(checkpoint, marker) -> None:
    """Replace train_state.pt by a malicious pickle and fix the recorded checksum,
    as someone who can write the directory can."""
    state = torch.load(io.BytesIO((checkpoint / "train_state.pt").read_bytes()), weights_only=True)
    state["evil"] = Payload(marker)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    (checkpoint / "train_state.pt").write_bytes(data)
    header = json.loads((checkpoint / "config.json").read_text())
    header["sha256"]["train_state.pt"] = hashlib.sha256(data).hexdigest()
    header["header_sha256"] = header_checksum(header)
    (checkpoint / "config.json").write_text(json.dumps(header))


def train(*args):
    return subprocess.run([sys.executable, "-m", "move", "train", *map(str, args)], capture_output=True, text=True)


def test_crafted_train_state_is_refused_and_never_runs(tmp_path, prepared_dir):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    common = [
        "--data",
        prepared_dir,
        "--out",
        run,
        "--preset",
        "tiny",
        "--variant",
        "move",
        "--batch-size",
        "2",
        "--eval-every",
        "2",
        "--eval-tokens",
        "256",
        "--checkpoint-every",
        "2",
    ]
    assert train(*common, "--steps", "4").returncode == 0
    newest = checkpoint_dirs(run)[-1]
    plant(newest, marker)
    with pytest.raises(CheckpointError, match="refused"):
        load_train_state(newest)
    assert not marker.exists()
    # resume skips the planted checkpoint (a warning naming it) and continues from the older one
    result = train(*common, "--steps", "6", "--resume")
    assert result.returncode == 0, result.stderr
    assert f"skipping checkpoint {newest.name}" in result.stderr
    assert "resuming from" in result.stdout and "step 2" in result.stdout
    assert not marker.exists()


def test_the_planted_payload_is_real(tmp_path):
    """Control: unpickled without restrictions, the payload does run."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_mnist_archive_reader_accepts_arrays_and_refuses_code(tmp_path):
    import numpy as np

    from move.image.datasets import ArraysOnlyUnpickler

    arrays = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2])),)
    loaded = ArraysOnlyUnpickler(io.BytesIO(pickle.dumps(arrays))).load()
    assert np.array_equal(loaded[0][0], arrays[0][0]) and np.array_equal(loaded[0][1], arrays[0][1])
    marker = tmp_path / "ran"
    with pytest.raises(pickle.UnpicklingError, match="refused global"):
        ArraysOnlyUnpickler(io.BytesIO(pickle.dumps(Payload(marker)))).load()
    assert not marker.exists()
