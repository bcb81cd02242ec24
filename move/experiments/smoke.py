"""GPU smoke test and throughput: the paper-scale presets (d12 by default; d20,
d32, gpt-b, gpt-l with --presets) trained for a short while with standard /
LaVE x1 / MoVE x1 / MoVE x4, one `move train` each (under torchrun when
--nproc > 1), then one table of tokens/s, MFU, peak GPU memory and the memory
`move plan` predicted for the same run.

    python -m move.experiments.smoke --out runs/gpu_smoke          (scripts/gpu_smoke.sh)

The data is the bundled Shakespeare with an 8192-token BPE; the models keep each
preset's vocabulary (65,536 rows for d12-d32, 17,385 for the image presets; the
image presets train on text tokens here: a shape and throughput check), so tables,
lm_head and FLOPs have the paper's shapes. A run the plan says will not fit the
card is skipped and listed as such. The table goes to stdout and to <out>/smoke.md
with the card's name; runs already finished are not repeated. Without CUDA it
refuses to run unless --allow-cpu (the test suite runs it that way on the tiny preset).
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

from move.config import TrainConfig, model_config_from_preset
from move.errors import UserError
from move.readers import read_json_object
from move.training.plan import fits, plan_run

VARIANTS = {
    "standard": ["--variant", "standard"],
    "lave_x1": ["--variant", "lave", "--density", "1"],
    "move_x1": ["--variant", "move", "--density", "1"],
    "move_x4": ["--variant", "move", "--density", "4"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu_smoke")
    p.add_argument("--data", default="data/shakespeare_8k", help="prepared text (made from Shakespeare if missing)")
    p.add_argument("--presets", nargs="+", default=["d12"], help="model presets, each with every variant")
    p.add_argument("--vocab-size", type=int, help="vocabulary of the models (default each preset's)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run, via torchrun")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--allow-cpu", action="store_true", help="run without CUDA (for testing this script)")
    p.add_argument("train_flags", nargs=argparse.REMAINDER, help="after --: extra `move train` flags")
    return p.parse_args(argv)


def train_command(args, preset: str, variant: str, run_dir: Path) -> list[str]:
    launcher = [sys.executable, "-m", "move"]
    if args.nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "-m", "move"]
    extra = [f for f in args.train_flags if f != "--"]
    vocab = ["--vocab-size", str(args.vocab_size)] if args.vocab_size else []
    return [
        *launcher,
        "train",
        "--data",
        args.data,
        "--preset",
        preset,
        *vocab,
        *VARIANTS[variant],
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--eval-every",
        str(args.steps),
        "--eval-tokens",
        "65536",
        "--checkpoint-every",
        str(args.steps),
        "--keep-checkpoints",
        "1",
        "--out",
        str(run_dir),
        "--force",
        *extra,
    ]


def planned_bytes(args, preset: str, variant: str, on_gpu: bool):
    """What `move plan` says one process of this run needs (bytes)."""
    flags = dict(zip(VARIANTS[variant][::2], VARIANTS[variant][1::2]))
    fields = dict(value_memory=flags["--variant"], memory_density=int(flags.get("--density", 1)))
    if args.vocab_size:
        fields["vocab_size"] = args.vocab_size
    config = model_config_from_preset(preset, **fields)
    return plan_run(config, TrainConfig(steps=args.steps, batch_size=args.batch_size), args.nproc, bf16=on_gpu)


def table(device_name: str, args, rows: dict) -> str:
    lines = [
        f"# GPU smoke: {', '.join(args.presets)}, {args.steps} steps, global batch {args.batch_size}, "
        f"{args.nproc} process(es)",
        "",
        f"device: {device_name}; torch {torch.__version__}",
        "",
        "| preset | variant | params (M) | value memory (M) | tok/s | tok/s vs standard | MFU | "
        "peak memory (GiB) | planned (GiB) | measured / planned | val bpb |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (preset, name), (plan, s) in rows.items():
        planned = f"{plan.memory_total / 2**30:.2f}"
        if s is None:
            lines.append(
                f"| {preset} | {name} | {plan.params['total'] / 1e6:.1f} | "
                f"{plan.params['value_memory'] / 1e6:.1f} | skipped: the plan does not fit the card | "
                f"| | | {planned} | | |"
            )
            continue
        base = (rows.get((preset, "standard")) or (None, None))[1]
        params = s["accounting"]["params"]
        mfu = f"{s['mfu']:.1%}" if s.get("mfu") is not None else "n/a"
        peak = s.get("peak_memory_mb")
        memory = f"{peak / 1024:.2f}" if peak else "n/a"
        measured = f"{peak * 2**20 / plan.memory_total:.2f}" if peak else "n/a"
        ratio = f"{s['tok_per_s'] / base['tok_per_s']:.3f}" if base else "n/a"
        lines.append(
            f"| {preset} | {name} | {params['total'] / 1e6:.1f} | {params['value_memory'] / 1e6:.1f} | "
            f"{s['tok_per_s']:,.0f} | {ratio} | {mfu} | {memory} | {planned} | {measured} | "
            f"{s['val_bpb']:.3f} |"
        )
    lines += [
        "",
        "tok/s is measured over the training steps only (the first steps include warm-up and, "
        "with --compile, compilation); MFU uses the card's data-sheet dense bf16 peak. Peak memory: "
        "the CUDA allocator's peak (the CPU: the process's resident high-water mark); planned: "
        "`move plan` for the same run, per process.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("error: no CUDA device (pass --allow-cpu to run this smoke test on the CPU)", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (Path(args.data) / "manifest.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "move",
                "prepare",
                "--corpus",
                "shakespeare",
                "--vocab-size",
                "8192",
                "--passage-tokens",
                "2048",
                "--out",
                args.data,
            ],
            check=True,
        )
    on_gpu = torch.cuda.is_available()
    device_bytes = torch.cuda.get_device_properties(0).total_memory if on_gpu else None
    rows = {}
    for preset in args.presets:
        for variant in args.variants:
            plan = planned_bytes(args, preset, variant, on_gpu)
            run_dir = out / preset / variant
            summary_path = run_dir / "summary.json"
            if device_bytes and not fits(plan, device_bytes) and not summary_path.is_file():
                print(
                    f"== {preset} {variant}: skipped, the plan needs {plan.memory_total / 2**30:.1f} GiB per process",
                    flush=True,
                )
                rows[preset, variant] = (plan, None)
                continue
            if not summary_path.is_file():
                print(f"== {preset} {variant}", flush=True)
                result = subprocess.run(train_command(args, preset, variant, run_dir), env={**os.environ}, check=False)
                if result.returncode:
                    raise UserError(f"{preset} {variant}: move train exited with status {result.returncode}")
            rows[preset, variant] = (plan, read_json_object(summary_path, "run summary"))
    text = table(device_name, args, rows)
    (out / "smoke.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
