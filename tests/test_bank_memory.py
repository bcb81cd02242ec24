"""Bank memory options: memory-mapped inference, bf16 storage with fp32 optimiser state."""

import json
import subprocess
import sys

import pytest
import torch

from move.config import ModelConfig
from move.errors import CheckpointError
from move.model.gpt import GPT
from move.model.sampling import generate
from move.training.checkpoint import load_model, save_checkpoint

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
    config = ModelConfig(
        vocab_size=16384, seq_len=32, n_layer=2, n_embd=64, n_head=2, value_memory="move", memory_slots=64
    )
    model = GPT(config)
    bank_mb = model.bank.weight.numel() * 4 / 2**20
    assert bank_mb > 200
    save_checkpoint(tmp_path / "ck", model)
    del model
    expected = generate(load_model(tmp_path / "ck")[0], torch.tensor([[1, 2, 3]]), 6, temperature=0).tolist()
    growth = {}
    for mode in ("mmap", "full"):
        proc = subprocess.run(
            [sys.executable, "-c", MMAP_PROBE, str(tmp_path / "ck"), mode], capture_output=True, text=True, check=True
        )
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
    # bf16 weights, fp32 moments
    bf16 = torch.nn.Parameter(start.to(torch.bfloat16))
    opt = TableAdamW([bf16], lr=0.1)
    bf16.grad = grads[0].to(torch.bfloat16)
    opt.step()
    assert opt.state[bf16]["exp_avg"].dtype == torch.float32 and bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), start - 0.1 * torch.sign(grads[0]), rtol=0, atol=0.05)


class RowsOf:
    """A stand-in for a ValueTable: the rows its gradient touched this step."""

    def __init__(self):
        self.rows = None
        self.shard = None

    def touched_rows(self):
        return self.rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_adam_is_sparse_adam_on_the_touched_rows(dtype):
    """RowAdam on a dense buffer at the touched rows == torch.optim.SparseAdam on the
    same rows as a sparse gradient (the lazy semantics: untouched rows and their
    moments stay as they are); a bf16 table keeps fp32 moments and rounds once."""
    from move.model.value_tables import RowSet
    from move.training.row_adam import RowAdam

    torch.manual_seed(0)
    start = torch.randn(50, 3, 4)
    ours, ref = torch.nn.Parameter(start.clone().to(dtype)), torch.nn.Parameter(start.clone())
    table = RowsOf()
    opt_ours = RowAdam([ours], {id(ours): table}, lr=0.1, betas=(0.8, 0.95), eps=1e-10)
    opt_ref = torch.optim.SparseAdam([ref], lr=0.1, betas=(0.8, 0.95), eps=1e-10)
    # rows come as a RowSet of the looked-up ids (repeats; padded); a step may touch nothing: it still counts
    for occurrences in ([2, 7, 9, 7], [11, 7, 9, 11, 11], [], [2, 30]):
        g = torch.randn(50, 3, 4)
        rows = torch.tensor(sorted(set(occurrences)), dtype=torch.long)
        ours.grad = torch.zeros_like(ours)
        ours.grad[rows] = g[rows].to(dtype)
        table.rows = RowSet.of(torch.tensor(occurrences, dtype=torch.long), num_rows=50)
        ref.grad = torch.sparse_coo_tensor(rows[None], g[rows].to(dtype).float(), start.shape)
        opt_ours.step()
        opt_ref.step()
        reference = ref.detach().to(dtype).float()  # SparseAdam in fp32, rounded like our one rounding
        torch.testing.assert_close(ours.float(), reference, rtol=0, atol=1e-6 if dtype == torch.float32 else 0.02)
    untouched = torch.tensor([0, 1, 40])
    assert torch.equal(ours[untouched], start[untouched].to(dtype))
    assert opt_ours.state[ours]["exp_avg"].dtype == torch.float32 and opt_ours.state[ours]["step"] == 4


def test_row_adam_moves_nothing_of_a_shard_that_no_rank_asked_for():
    """A shard with fixed exchanges gets a RowSet of padding only when no rank touched
    its rows: lazy Adam must then leave every row and moment as it is (the padding
    points at a real row); with one real row, only that row moves."""
    from move.model.row_shard import RowShard
    from move.model.value_tables import RowSet
    from move.training.row_adam import RowAdam

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(10, 2, 3))
    table = RowsOf()
    table.shard = RowShard(20, rank=0, world_size=2)  # its 10 rows of 20; no collective is called here
    optimizer = RowAdam([weight], {id(weight): table}, lr=0.1)
    weight.grad = torch.randn_like(weight)
    table.rows = RowSet.of(torch.tensor([0, 1, 2, 3]), num_rows=10)
    optimizer.step()  # moments now non-zero at rows 0..3
    before = weight.detach().clone(), optimizer.state[weight]["exp_avg"].clone()
    table.rows = RowSet.of(torch.tensor([10, 10, 10]), num_rows=10)  # padding only
    optimizer.step()
    assert torch.equal(weight, before[0]) and torch.equal(optimizer.state[weight]["exp_avg"], before[1])
    table.rows = RowSet.of(torch.tensor([10, 2, 10]), num_rows=10)
    optimizer.step()
    moved = (weight != before[0]).flatten(1).any(1)
    assert moved.tolist() == [False, False, True] + [False] * 7
    table.shard = None  # the guard is what keeps padding still: without it, padding at row 0 would move it
    table.rows = RowSet.of(torch.tensor([10, 10, 10]), num_rows=10)
    before = weight.detach().clone()
    optimizer.step()
    assert not torch.equal(weight[0], before[0])


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
        config = TrainConfig(
            steps=8,
            batch_size=4,
            eval_every=8,
            eval_tokens=1024,
            value_memory_dtype=dtype,
            optim=OptimConfig(value_memory_optimizer=mode),
        )
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
