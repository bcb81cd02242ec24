"""Trackers and value-memory diagnostics (issue: ecosystem)."""

import json
import math

import pytest
import torch

from move.config import model_config_from_preset
from move.model.diagnostics import collect_gates, slot_cosine, value_memory_diagnostics
from move.model.gpt import GPT


def test_diagnostics_at_init_gates_are_one():
    torch.manual_seed(0)
    model = GPT(model_config_from_preset("tiny", value_memory="move", memory_density=2))
    idx = torch.randint(0, 512, (2, 16))
    gates = collect_gates(model, idx)
    assert set(gates) == set(model.config.memory_layers())
    assert all(torch.equal(g, torch.ones_like(g)) for g in gates.values())  # zero-init routers: 2*sigmoid(0)
    d = value_memory_diagnostics(model, idx)
    assert d["vm/layer0/g0_mean"] == 1.0 and d["vm/layer0/slot_gate_std"] == 0.0
    assert d["vm/rows_touched_frac"] == pytest.approx(torch.unique(idx).numel() / 512)
    rows = model.bank.weight[torch.unique(idx)].flatten(1).norm(dim=1)
    assert d["vm/row_norm_max"] == pytest.approx(rows.max().item())
    assert value_memory_diagnostics(GPT(model_config_from_preset("tiny")), idx) == {}


def test_at_init_the_layer_start_opens_each_layers_own_slots_only():
    """The layer-assigned start (b = 4): g0 and the slots of the layer's LaVE turn at
    2*sigmoid(0) = 1, every other slot at 2*sigmoid(-4)."""
    model = GPT(model_config_from_preset("tiny", value_memory="move", memory_density=2, layer_start_bias=4.0))
    gates = collect_gates(model, torch.randint(0, 512, (2, 16)))
    closed = 2 / (1 + math.exp(4))
    for layer, g in gates.items():
        own = set(model.config.own_slots(layer))
        expected = [1.0] + [1.0 if m in own else closed for m in range(model.config.n_slots)]
        torch.testing.assert_close(g, torch.tensor(expected).expand_as(g))


def test_slot_cosine_known_values():
    base = torch.randn(5, 2, 1, 8)
    assert slot_cosine(base.expand(5, 2, 4, 8)) == pytest.approx(1.0)  # every slot the same direction
    assert slot_cosine(torch.cat([base, -base], dim=2)) == pytest.approx(-1.0)
    eye = torch.eye(4).expand(3, 1, 4, 4)  # orthogonal slots
    assert slot_cosine(eye) == pytest.approx(0.0)
    g = torch.Generator().manual_seed(0)
    assert abs(slot_cosine(torch.randn(400, 2, 6, 256, generator=g))) < 0.01  # independent random slots


def test_memory_share_and_gate_spread_against_a_hand_computation():
    torch.manual_seed(0)
    model = GPT(model_config_from_preset("tiny", value_memory="move", memory_density=2))
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "router"):
                m.router.weight.normal_(0, 0.5)
    idx = torch.randint(0, 512, (2, 16))
    d = value_memory_diagnostics(model, idx)
    x = torch.nn.functional.rms_norm(model.wte(idx), (model.config.n_embd,))
    attn = model.blocks[0].attn
    v = attn.c_v(x).view(2, 16, attn.n_kv_head, attn.head_dim)
    g = attn.value_memory.gate_values(attn.value_memory.project(x, attn.c_v, None, 0)[1])
    slots = model.bank.weight[idx]  # (B, T, H, S, D)
    mixed = g[..., :1] * v + (g[..., 1:, None] * slots).sum(-2)
    assert d["vm/layer0/memory_share"] == pytest.approx(((mixed - v).norm() / v.norm()).item(), rel=1e-4)
    assert d["vm/layer0/gate_spread_across_slots"] == pytest.approx(g[..., 1:].std(-1).mean().item(), rel=1e-4)
    assert d["vm/slot_cosine"] == pytest.approx(slot_cosine(model.bank.weight[torch.unique(idx)]))
    assert abs(d["vm/slot_cosine"]) < 0.1  # independently drawn slots at init


def test_tensorboard_events_are_written_and_readable(tmp_path, prepared_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from move.cli import main

    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(prepared_dir),
                "--out",
                str(run),
                "--preset",
                "tiny",
                "--variant",
                "move",
                "--steps",
                "4",
                "--batch-size",
                "2",
                "--eval-every",
                "2",
                "--eval-tokens",
                "512",
                "--checkpoint-every",
                "4",
                "--loggers",
                "tensorboard",
                "--log-every",
                "1",
            ]
        )
        == 0
    )
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "val_bpb" in tags and "vm/layer1/g0_mean" in tags and "vm/rows_touched_frac" in tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]  # --log-every 1: every step
    assert next(e.value for e in events.Scalars("train/lr_multiplier")) == 1.0
    logged = [e.value for e in events.Scalars("val_bpb")]
    expected = [json.loads(line)["val_bpb"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx(expected)


def test_wandb_offline_run_is_written(tmp_path, prepared_dir, monkeypatch):
    pytest.importorskip("wandb")
    from move.cli import main

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(prepared_dir),
                "--out",
                str(run),
                "--preset",
                "tiny",
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--eval-every",
                "2",
                "--eval-tokens",
                "512",
                "--loggers",
                "wandb",
            ]
        )
        == 0
    )
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))


def test_gates_command_plots_and_reports_per_layer_and_head(tmp_path, prepared_dir):
    from move.cli import main
    from move.evaluation.gates import gate_summary

    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(prepared_dir),
                "--out",
                str(run),
                "--preset",
                "tiny",
                "--variant",
                "move",
                "--density",
                "3",
                "--steps",
                "6",
                "--batch-size",
                "2",
                "--eval-every",
                "6",
                "--eval-tokens",
                "512",
            ]
        )
        == 0
    )
    text = tmp_path / "t.txt"
    text.write_text("Fair is foul, and foul is fair: hover through the fog and filthy air.\n")
    assert main(["gates", str(run), "--text", str(text), "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 5000
    report = json.loads((tmp_path / "g.json").read_text())
    from move.api import load

    model, tokenizer = load(run)
    heads, slots = model.config.kv_heads, model.config.n_slots
    assert len(report["g0"]) == len(model.config.memory_layers()) and len(report["g0"][0]) == heads
    assert len(report["slots"][0]) == slots and report["tokens"][0] == "<bos>"
    idx = torch.tensor([[tokenizer.bos_id, *tokenizer.encode(text.read_text())]])
    gates = collect_gates(model, idx)[report["layers"][0]][0]  # recomputed independently
    assert report["memory"][0] == pytest.approx(gates[..., 1:].sum(-1).mean(0).tolist(), rel=1e-5)
    assert gate_summary(model, idx)["g0"] == report["g0"]
