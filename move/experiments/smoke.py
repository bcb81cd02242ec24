"""GPU smoke test and throughput: the d12 preset trained for a short while with
standard / LaVE x1 / MoVE x1 / MoVE x4, one `move train` each (under torchrun
when --nproc > 1), then one table of tokens/s, MFU and peak GPU memory.

    python -m move.experiments.smoke --out runs/gpu_smoke          (scripts/gpu_smoke.sh)

The data is the bundled Shakespeare with an 8192-token BPE; the models keep the
preset's 65,536-row vocabulary (--vocab-size), so tables, lm_head and FLOPs have
the paper's D12 shape. The table goes to stdout and to <out>/smoke.md with the
card's name; runs already finished are not repeated. Without CUDA it refuses to
run unless --allow-cpu (the test suite runs it that way on the tiny preset).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from move.errors import UserError

VARIANTS = {"standard": ["--variant", "standard"], "lave_x1": ["--variant", "lave", "--density", "1"],
            "move_x1": ["--variant", "move", "--density", "1"], "move_x4": ["--variant", "move", "--density", "4"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu_smoke")
    p.add_argument("--data", default="data/shakespeare_8k", help="prepared text (made from Shakespeare if missing)")
    p.add_argument("--preset", default="d12")
    p.add_argument("--vocab-size", type=int, default=65536)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run, via torchrun")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--allow-cpu", action="store_true", help="run without CUDA (for testing this script)")
    p.add_argument("train_flags", nargs=argparse.REMAINDER, help="after --: extra `move train` flags")
    return p.parse_args(argv)


def train_command(args, variant: str, run_dir: Path) -> list[str]:
    launcher = [sys.executable, "-m", "move"]
    if args.nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "-m", "move"]
    extra = [f for f in args.train_flags if f != "--"]
    return [*launcher, "train", "--data", args.data, "--preset", args.preset, "--vocab-size", str(args.vocab_size),
            *VARIANTS[variant], "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--eval-every", str(args.steps), "--eval-tokens", "65536", "--checkpoint-every", str(args.steps),
            "--keep-checkpoints", "1", "--out", str(run_dir), "--force", *extra]


def table(device_name: str, args, summaries: dict) -> str:
    lines = [f"# GPU smoke: {args.preset} (vocab {args.vocab_size}), {args.steps} steps, "
             f"global batch {args.batch_size}, {args.nproc} process(es)", "",
             f"device: {device_name}; torch {torch.__version__}", "",
             "| variant | params (M) | value memory (M) | tok/s | tok/s vs standard | MFU | peak memory (GiB) | "
             "val bpb |", "|---|---|---|---|---|---|---|---|"]
    base = summaries.get("standard", {}).get("tok_per_s")
    for name, s in summaries.items():
        params = s["accounting"]["params"]
        mfu = f"{s['mfu']:.1%}" if s.get("mfu") is not None else "n/a"
        memory = f"{s['peak_memory_mb'] / 1024:.2f}" if s.get("peak_memory_mb") else "n/a"
        ratio = f"{s['tok_per_s'] / base:.3f}" if base else "n/a"
        lines.append(f"| {name} | {params['total'] / 1e6:.1f} | {params['value_memory'] / 1e6:.1f} | "
                     f"{s['tok_per_s']:,.0f} | {ratio} | {mfu} | {memory} | {s['val_bpb']:.3f} |")
    lines += ["", "tok/s is measured over the training steps only (the first steps include warm-up and, "
              "with --compile, compilation); MFU uses the card's data-sheet dense bf16 peak."]
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
        subprocess.run([sys.executable, "-m", "move", "prepare", "--corpus", "shakespeare", "--vocab-size", "8192",
                        "--passage-tokens", "2048", "--out", args.data], check=True)
    summaries = {}
    for variant in args.variants:
        run_dir = out / variant
        summary_path = run_dir / "summary.json"
        if not summary_path.is_file():
            print(f"== {variant}", flush=True)
            result = subprocess.run(train_command(args, variant, run_dir), env={**os.environ})
            if result.returncode:
                raise UserError(f"{variant}: move train exited with status {result.returncode}")
        summaries[variant] = json.loads(summary_path.read_text())
    text = table(device_name, args, summaries)
    (out / "smoke.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
