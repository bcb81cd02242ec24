"""The main job: train several value-memory variants on identical data and report.

Every run uses the same seed, so it sees the same batches in the same order and
starts from the same shared weights (value memory is initialised last). Complete
runs are skipped, interrupted ones resume from their newest checkpoint. The
report is a markdown table (validation bpb, parameters by group, FLOPs per token,
measured tokens/s and peak memory) plus the validation curves in one PNG.
"""

import argparse
import json
from pathlib import Path

from move.errors import ConfigError

# name -> model-config fields; the ablations isolate g0 and global sharing
VARIANT_FIELDS = {
    "standard": dict(value_memory="standard"),
    "lave": dict(value_memory="lave"),
    "move": dict(value_memory="move"),
    "move-nog0": dict(value_memory="move", move_gate_g0=False),
    "lave-full": dict(value_memory="lave", lave_full_gates=True),
}


def parse_variant(spec: str) -> tuple[str, dict]:
    """'move:4' -> ('move_x4', {value_memory: move, memory_density: 4})."""
    name, _, density = spec.partition(":")
    if name not in VARIANT_FIELDS:
        raise ConfigError(f"unknown variant {name!r} in {spec!r}; choose from {', '.join(VARIANT_FIELDS)}")
    fields = dict(VARIANT_FIELDS[name])
    if name == "standard":
        return "standard", fields
    try:
        k = int(density or 1)
    except ValueError:
        raise ConfigError(f"memory density in {spec!r} must be an integer") from None
    if k < 1:
        raise ConfigError(f"memory density in {spec!r} must be >= 1")
    return f"{name}_x{k}", {**fields, "memory_density": k}


def run_comparison(args) -> dict:
    from move.cli import build_text_run
    from move.training.trainer import Trainer

    out = Path(args.out)
    variants = [parse_variant(s) for s in args.variants]  # validate all before training any
    summaries = {}
    for name, fields in variants:
        run_dir = out / name
        summary_path = run_dir / "summary.json"
        if summary_path.exists() and not args.force:
            print(f"{name}: complete, skipped ({summary_path})")
            summaries[name] = json.loads(summary_path.read_text())
            continue
        run_args = argparse.Namespace(**{**vars(args), **fields})
        model, task, train_config = build_text_run(run_args)
        resume = (run_dir / "run.json").exists() and not args.force
        trainer = Trainer(model, task, train_config, run_dir, resume=resume, force=args.force)
        summaries[name] = trainer.run()
        if "stopped_at" in summaries[name]:
            print(f"{name}: stopped early; rerun the same command to resume")
            return summaries
    write_report(out, summaries)
    return summaries


def format_table(summaries: dict[str, dict]) -> str:
    base = summaries.get("standard", {}).get("val_bpb")
    head = ("| run | val bpb | Δ vs standard | value-memory params | router params | total params "
            "| train FLOPs/token | tok/s | Δ tok/s | peak MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base_speed = summaries.get("standard", {}).get("tok_per_s")
    for name, s in summaries.items():
        p = s["accounting"]["params"]
        delta = f"{s['val_bpb'] - base:+.4f}" if base is not None else "n/a"
        speed = f"{s['tok_per_s'] / base_speed:.2f}x" if base_speed else "n/a"
        peak = "n/a" if s["peak_memory_mb"] is None else f"{s['peak_memory_mb']:.0f}"
        lines.append(
            f"| {name} | {s['val_bpb']:.4f} | {delta} | {p['value_memory']:,} | {p['routers']:,} | {p['total']:,} "
            f"| {s['accounting']['training_flops_per_token']:,} | {s['tok_per_s']:.0f} | {speed} | {peak} |"
        )
    return "\n".join(lines)


def write_report(out: Path, summaries: dict[str, dict]) -> None:
    from move.training.curves import plot_runs
    from move.training.trainer import read_metrics

    curves = {name: read_metrics(out / name) for name in summaries}
    plot_runs(curves, "val_bpb", out / "val_bpb.png", title="validation bits per byte")
    table = format_table(summaries)
    any_summary = next(iter(summaries.values()))
    report = "\n".join([
        "# Value-memory comparison",
        "",
        f"Identical data order and shared-weight initialisation for every run; {any_summary['steps']} steps, "
        f"{any_summary['tokens_seen']:,} training tokens each, device {any_summary['device']}.",
        "Tokens/s are measured in one process, one run after another, on the same machine; peak MB is the "
        "run's peak resident memory on CPU (allocator peak on CUDA). Speed ratios between separately timed runs "
        "are indicative only: `move bench` measures cost side by side.",
        "",
        table,
        "",
        "![validation bpb](val_bpb.png)",
        "",
    ])
    (out / "report.md").write_text(report)
    print(table)
    print(f"report: {out / 'report.md'}")
