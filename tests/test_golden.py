"""Golden losses: a fixed-seed tiny run per variant must log exactly the losses
committed in tests/golden/losses.json. A refactoring that changes numerics in any
way (initialisation order, optimiser arithmetic, data order) fails here.

Regenerate only for an intended numerical change:
    MOVE_WRITE_GOLDEN=1 python -m pytest tests/test_golden.py
Computed with one CPU thread (thread count changes reduction order)."""

import json
import os
from pathlib import Path

import pytest
import torch

from move import api
from move.training.trainer import read_metrics

GOLDEN = Path(__file__).parent / "golden" / "losses.json"
VARIANTS = {
    "standard": {},
    "lave_x1": dict(value_memory="lave"),
    "move_x2": dict(value_memory="move", memory_density=2),
    "move_x1_mla": dict(value_memory="move", attention="mla", kv_latent_dim=64),
}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_run_losses(tmp_path, data, fields) -> dict:
    model = api.build_model("tiny", seed=11, vocab_size=512, n_layer=3, **fields)
    summary = api.train(model, data, out=tmp_path, steps=6, batch_size=4, eval_every=3, eval_tokens=1024,
                        checkpoint_every=6, quiet=True)
    assert summary["steps"] == 6
    metrics = read_metrics(tmp_path)
    return {"train_loss": [m["train_loss"] for m in metrics], "val_bpb": [m["val_bpb"] for m in metrics]}


def test_fixed_seed_runs_log_the_committed_losses(tmp_path, prepared_dir, one_thread):
    got = {name: tiny_run_losses(tmp_path / name, prepared_dir, fields) for name, fields in VARIANTS.items()}
    if os.environ.get("MOVE_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    expected = json.loads(GOLDEN.read_text())
    assert got == expected  # exact: float equality, not a tolerance
