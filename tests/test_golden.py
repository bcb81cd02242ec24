"""Golden losses: a fixed-seed tiny run per variant must log the losses committed
in tests/golden/losses.json, within a relative tolerance. A refactoring that changes
numerics (initialisation, the mix, optimiser arithmetic, data order) fails here.

Why a tolerance and not float equality: the same code on another CPU (AVX-512 vs
AVX2, another BLAS kernel) sums in another order, and these numbers then differ in
the 8th-9th significant digit. The tolerance sits between that noise and the
smallest regression we measured (6 steps, one thread, relative to the value; the
largest over every logged number of a variant):

    same code, two x86-64 machines (AMD EPYC / Intel Xeon AVX-512)  <= 5.2e-8
    TOLERANCE                                                           1e-6
    one table's init scale x 1.01 (LaVE / MoVE x2 / MLA)               9.1e-6 / 2.0e-5 / 3.3e-5
    g0 left ungated in the mix (MoVE x2 / MLA; LaVE has no g0)         1.1e-4 / 1.4e-4
    one table drawn from another seed                                  8.6e-5 / 7.8e-4 / 3.0e-4
    the mix drops its last slot term                                   5.2e-3 / 1.1e-3 / 3.0e-3

Bit-for-bit checks belong to "this machine twice" (determinism, resume, 2 ranks
vs 1), where they hold on any CPU; see test_training.py and test_distributed.py.

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
TOLERANCE = 1e-6  # relative; see the table above
VARIANTS = {
    "standard": {},
    "lave_x1": dict(value_memory="lave"),
    "move_x2": dict(value_memory="move", memory_density=2),
    "move_x1_mla": dict(value_memory="move", attention="mla", kv_latent_dim=64),
    "move_x2_layer_start": dict(value_memory="move", memory_density=2, layer_start_bias=4.0),
}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_run_losses(tmp_path, data, fields) -> dict:
    model = api.build_model("tiny", seed=11, vocab_size=512, n_layer=3, **fields)
    summary = api.train(
        model, data, out=tmp_path, steps=6, batch_size=4, eval_every=3, eval_tokens=1024, checkpoint_every=6, quiet=True
    )
    assert summary["steps"] == 6
    metrics = read_metrics(tmp_path)
    return {"train_loss": [m["train_loss"] for m in metrics], "val_bpb": [m["val_bpb"] for m in metrics]}


def test_fixed_seed_runs_log_the_committed_losses(tmp_path, prepared_dir, one_thread):
    got = {name: tiny_run_losses(tmp_path / name, prepared_dir, fields) for name, fields in VARIANTS.items()}
    if os.environ.get("MOVE_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    expected = json.loads(GOLDEN.read_text())
    assert got.keys() == expected.keys()
    for name in expected:
        for metric in ("train_loss", "val_bpb"):
            assert got[name][metric] == pytest.approx(expected[name][metric], rel=TOLERANCE, abs=0), (name, metric)
