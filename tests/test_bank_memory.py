"""Bank memory options: inference with the bank memory-mapped from the checkpoint."""

import json
import subprocess
import sys

import torch

from move.checkpoint import load_model, save_checkpoint
from move.config import ModelConfig
from move.errors import CheckpointError
from move.model.gpt import GPT
from move.model.sampling import generate

import pytest

MMAP_PROBE = """
import json, sys, torch
from move.checkpoint import load_model
from move.device import resident_memory_mb
from move.model.sampling import generate
before = resident_memory_mb()
model, _ = load_model(sys.argv[1], mmap_bank=sys.argv[2] == "mmap")
out = generate(model, torch.tensor([[1, 2, 3]]), 6, temperature=0)
print(json.dumps({"rss_growth_mb": resident_memory_mb() - before, "tokens": out.tolist()}))
"""


def test_mmap_bank_generates_identically_with_resident_memory_below_the_bank(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=16384, seq_len=32, n_layer=2, n_embd=64, n_head=2, value_memory="move",
                         memory_slots=64)
    model = GPT(config)
    bank_mb = model.bank.weight.numel() * 4 / 2**20
    assert bank_mb > 200
    save_checkpoint(tmp_path / "ck", model)
    del model
    expected = generate(load_model(tmp_path / "ck")[0], torch.tensor([[1, 2, 3]]), 6, temperature=0).tolist()
    growth = {}
    for mode in ("mmap", "full"):
        proc = subprocess.run([sys.executable, "-c", MMAP_PROBE, str(tmp_path / "ck"), mode], capture_output=True,
                              text=True, check=True)
        result = json.loads(proc.stdout)
        assert result["tokens"] == expected
        growth[mode] = result["rss_growth_mb"]
    # both pay the same fixed costs (allocator, kernels' first use); only the full load holds the bank
    assert growth["mmap"] < bank_mb, growth  # the target: resident memory below the bank size
    assert growth["full"] - growth["mmap"] > 0.75 * bank_mb, growth


def test_mmap_bank_is_refused_for_a_model_without_bank(tmp_path):
    save_checkpoint(tmp_path / "ck", GPT(ModelConfig(vocab_size=64, n_embd=32, n_head=2, n_layer=1)))
    with pytest.raises(CheckpointError, match="needs a MoVE checkpoint"):
        load_model(tmp_path / "ck", mmap_bank=True)
