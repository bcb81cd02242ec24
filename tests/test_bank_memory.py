"""Bank memory options: memory-mapped inference, bf16 storage with fp32 optimiser state."""

import json
import subprocess
import sys

import pytest
import torch

from move.training.checkpoint import load_model, save_checkpoint
from move.config import ModelConfig
from move.errors import CheckpointError
from move.model.gpt import GPT
from move.model.sampling import generate

MMAP_PROBE = """
import json, sys, torch
from move.training.checkpoint import load_model
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


def test_table_adamw_is_adamw_on_fp32_and_keeps_fp32_state_for_bf16():
    from move.training.table_adamw import TableAdamW

    torch.manual_seed(0)
    start = torch.randn(50, 3, 4)
    grads = [torch.randn(50, 3, 4) for _ in range(3)]
    ours, ref = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt_ours = TableAdamW([ours], lr=0.1, weight_decay=0.01)
    opt_ref = torch.optim.AdamW([ref], lr=0.1, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.01)
    for g in grads:
        ours.grad, ref.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_ref.step()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    # sparse gradients: the same as SparseAdam on the touched rows
    sparse_ours, sparse_ref = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt_ours = TableAdamW([sparse_ours], lr=0.1)
    opt_ref = torch.optim.SparseAdam([sparse_ref], lr=0.1, betas=(0.8, 0.95), eps=1e-10)
    rows = torch.tensor([[2, 7, 9]])
    for g in grads:
        sparse_ours.grad = torch.sparse_coo_tensor(rows, g[rows[0]], start.shape)
        sparse_ref.grad = torch.sparse_coo_tensor(rows, g[rows[0]], start.shape)
        opt_ours.step()
        opt_ref.step()
    torch.testing.assert_close(sparse_ours, sparse_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(sparse_ours[0], start[0])
    # bf16 weights, fp32 moments
    bf16 = torch.nn.Parameter(start.to(torch.bfloat16))
    opt = TableAdamW([bf16], lr=0.1)
    bf16.grad = grads[0].to(torch.bfloat16)
    opt.step()
    assert opt.state[bf16]["exp_avg"].dtype == torch.float32 and bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), start - 0.1 * torch.sign(grads[0]),
                               rtol=0, atol=0.05)


@pytest.mark.parametrize("mode", ["exact", "lazy"])
def test_bf16_bank_trains_with_half_the_bank_memory(prepared_dir, tmp_path, mode):
    from move.config import model_config_from_preset
    from move.text.prepare import load_prepared
    from move.text.task import TextTask
    from move.training.optim import OptimConfig
    from move.training.trainer import TrainConfig, Trainer, prepare_model

    data = load_prepared(prepared_dir)
    sizes, bpb = {}, {}
    for dtype in ("float32", "bfloat16"):
        torch.manual_seed(0)
        model = GPT(model_config_from_preset("tiny", vocab_size=data.tokenizer.vocab_size, value_memory="move"))
        config = TrainConfig(steps=8, batch_size=4, eval_every=8, eval_tokens=1024, value_memory_dtype=dtype,
                             optim=OptimConfig(value_memory_optimizer=mode))
        task = TextTask(data, model.config.seq_len, 4, 0, 1024)
        prepare_model(model, config)
        summary = Trainer(model, task, config, tmp_path / f"{dtype}-{mode}", quiet=True).run()
        bank = model.bank.weight
        sizes[dtype] = bank.numel() * bank.element_size()
        assert bank.dtype == getattr(torch, dtype)
        bpb[dtype] = summary["val_bpb"]
        reloaded, _ = load_model(summary["checkpoint"])
        assert reloaded.bank.weight.dtype == getattr(torch, dtype)
    assert sizes["bfloat16"] * 2 == sizes["float32"]
    assert abs(bpb["bfloat16"] - bpb["float32"]) < 0.02  # rounding the bank does not change what is learned
