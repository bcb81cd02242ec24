"""scripts/smollm2_study_table.py on synthetic runs: the paired differences against
scipy's t interval, the cost table against the accounting it reads, and the memory-use
summary against means taken by hand."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "smollm2_study_table.py"
spec = importlib.util.spec_from_file_location("smollm2_study_table", SCRIPT)
table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(table)

KEYS = ["recall_accuracy", "knowledge_bits", "general_bpb", "general_kl", "shakespeare_smol_bpb", "shakespeare_smol_kl"]
DENSE = {"params": 1000, "flops": 2000}


def run(seed: int, shift: float, memory: bool, lora_flops: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    after = {k: float(rng.uniform(0.1, 1.0) + shift) for k in KEYS}
    summary = {
        "trainable_params": 50,
        "total_params": DENSE["params"] + (60 if memory else 50),
        "before": {k: 0.5 for k in KEYS if not k.endswith("_kl")},
        "after": after,
        "cost": {"step_seconds": 1.0 + seed, "peak_rss_mb": 100.0, "decode_tok_s": 10.0, "decode_tok_s_untouched": 11.0,
                 "lora_flops_per_token": lora_flops},
    }  # fmt: skip
    if memory:
        summary["accounting"] = {
            "params": {"dense": DENSE["params"], "value_memory": 2**18, "routers": 4},
            "flops_per_token": {"dense": DENSE["flops"], "routers": 8, "mix": 2, "total": DENSE["flops"] + 10},
        }
        summary["cost"].update(rows_moved=7, rows=100)
        layer = lambda share: {"g0_mean": 1.0, "slot_gate_mean": 0.5 + seed / 10, "memory_share": share}
        summary["memory_use"] = {
            "val": {"0": layer(0.1 * (seed + 1)), "1": layer(0.4)},
            "general": {"0": layer(0.01), "1": layer(0.02)},
            "shakespeare_smol": {"0": layer(0.0), "1": layer(0.0)},
        }
    return summary


@pytest.fixture
def results(tmp_path):
    for seed in range(3):
        for arm, summary in (("bank1", run(seed, 0.0, True)), ("lora32", run(seed + 7, 0.2, False, lora_flops=40))):
            directory = tmp_path / "none" / arm / f"seed{seed}"
            directory.mkdir(parents=True)
            (directory / "retrofit.json").write_text(json.dumps(summary))
    return tmp_path


def test_the_paired_rows_are_the_t_interval_of_the_seed_differences(results):
    runs = table.load(results)
    text = table.tables(runs)
    bits = {arm: [runs["none"][arm][s]["after"]["knowledge_bits"] for s in range(3)] for arm in ("lora32", "bank1")}
    d = np.array(bits["lora32"]) - np.array(bits["bank1"])
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    row = next(line for line in text.splitlines() if line.startswith("| lora32 |") and "[" in line)
    stored_bits = row.split(" | ")[2]  # arm, recall, stored bits
    assert stored_bits.startswith(f"{d.mean():+.0f} [{d.mean() - half:+.0f}, {d.mean() + half:+.0f}]")


def test_decoding_speed_is_reported_as_a_ratio_to_the_untouched_model_of_the_same_run(results):
    row = next(line for line in table.tables(table.load(results)).splitlines() if line.startswith("| bank1 |"))
    assert row.endswith(f"| 10.0 ± 0.0 (11.0 ± 0.0) | {10 / 11:.3f} ± 0.000 |")


def test_the_cost_table_counts_flops_against_the_untouched_model(results):
    text = table.cost_table(table.load(results))
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert "| 2,000 | 1.000 |" in lines["| untouched"]
    assert f"| {DENSE['flops'] + 10:,} | {(DENSE['flops'] + 10) / DENSE['flops']:.3f} |" in lines["| bank1"]
    assert "| 1 | 7 / 100 |" in lines["| bank1"]  # 2^18 fp32 numbers are 1 MB
    assert f"| {DENSE['flops'] + 40:,} | 1.020 |" in lines["| lora32"]  # the unmerged adapter's FLOPs


def test_the_memory_use_summary_averages_layers_then_seeds(results, tmp_path):
    runs = table.load(results)
    text = table.memory_use_table(runs)
    row = next(line for line in text.splitlines() if line.startswith("| bank1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    facts_share = np.mean([(0.1 * (seed + 1) + 0.4) / 2 for seed in range(3)])
    assert cells[1] == f"{np.mean([0.5 + s / 10 for s in range(3)]):.3f}"
    assert cells[3] == f"{facts_share:.3f}" and cells[4] == f"{0.015:.3f}"
    assert cells[5] == "1 (0.400)"  # layer 1 moves its values most on the facts
    assert not any(line.startswith("| lora32 |") for line in text.splitlines())  # no memory, no row
    table.plot_memory_use(runs, tmp_path / "use.png")
    table.plot(runs, tmp_path / "facts.png")
    assert (tmp_path / "use.png").stat().st_size > 0 and (tmp_path / "facts.png").stat().st_size > 0


def test_a_post_hoc_arm_is_labelled_and_paired_with_the_arm_it_changes(results):
    for seed in range(2):  # two seeds of the post hoc arm: its differences pair on those
        for arm, shift in (("bank15", 0.0), ("bank15-layer", 1.0)):
            directory = results / "none" / arm / f"seed{seed}"
            directory.mkdir(parents=True)
            (directory / "retrofit.json").write_text(json.dumps(run(seed + 20, shift, True)))
    text = table.tables(table.load(results))
    assert "| bank15-layer (post hoc) | 50 | 2 |" in text
    row = next(line for line in text.splitlines() if line.startswith("| bank15-layer − bank15 |"))
    assert row.split(" | ")[2].startswith("+1 [")  # stored bits: every seed shifted by exactly 1.0
