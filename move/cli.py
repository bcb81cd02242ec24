"""Command line: `move <command>` or `python -m move <command>`.

Every error a user can cause prints one line `error: ...` and exits with status 2
(add --debug for the traceback).
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from move.checkpoint import load_model, read_header
from move.config import MODEL_PRESETS, ModelConfig, model_config_from_preset
from move.device import pick_device
from move.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, exit status 2."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}\n")


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_dataclass_flags(parser, cls, skip=()) -> None:
    """One --flag per field of a config dataclass, defaulting to None (= keep)."""
    for f in dataclasses.fields(cls):
        if f.name in skip or dataclasses.is_dataclass(f.type):
            continue
        kind = str if f.default in (None, dataclasses.MISSING) else type(f.default)
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                            type=parse_bool if kind is bool else kind, help=f"(default {f.default})")


def dataclass_overrides(args, cls) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


# ---------------------------------------------------------------------------- prepare
def cmd_prepare(args) -> None:
    from move.text.prepare import PrepareOptions, prepare

    options = PrepareOptions(**dataclass_overrides(args, PrepareOptions))
    manifest = prepare(options, args.out, force=args.force)
    s = manifest["splits"]
    print(f"prepared {args.out}: vocab {manifest['vocab_size']}, train {s['train']['tokens']:,} tokens "
          f"({s['train']['documents']} docs), val {s['val']['tokens']:,} tokens ({s['val']['documents']} docs)")


# ---------------------------------------------------------------------------- train
def build_text_run(args):
    """Model, text task and train config from flags (shared by train and compare)."""
    from move.model.gpt import GPT
    from move.text.prepare import load_prepared
    from move.text.task import TextTask
    from move.training.optim import OptimConfig
    from move.training.trainer import TrainConfig

    data = load_prepared(args.data)
    overrides = dataclass_overrides(args, ModelConfig)
    overrides.setdefault("vocab_size", data.tokenizer.vocab_size)
    model_config = model_config_from_preset(args.preset, **overrides)
    train_config = TrainConfig(**dataclass_overrides(args, TrainConfig),
                               optim=OptimConfig(**dataclass_overrides(args, OptimConfig))).validate()
    torch.manual_seed(train_config.seed)
    model = GPT(model_config).to(pick_device(train_config.device))
    task = TextTask(data, model_config.seq_len, train_config.batch_size, train_config.seed, train_config.eval_tokens)
    task.check_model(model)
    return model, task, train_config


def cmd_train(args) -> None:
    from move.training.trainer import Trainer

    torch.set_flush_denormal(True)  # AdamW slows ~20x on denormals on CPU
    model, task, train_config = build_text_run(args)
    summary = Trainer(model, task, train_config, args.out, resume=args.resume, force=args.force).run()
    print(json.dumps({k: v for k, v in summary.items() if k != "accounting"}, indent=2))


# ---------------------------------------------------------------------------- eval / sample
def tokenizer_for(checkpoint, explicit):
    from move.text.tokenizer import Tokenizer

    if explicit:
        return Tokenizer.load(explicit)
    data = read_header(checkpoint).get("meta", {}).get("task", {}).get("data")
    if not data:
        raise UserError(f"{checkpoint}: no data directory recorded; pass --tokenizer")
    return Tokenizer.load(data)


def cmd_eval(args) -> None:
    from move.evaluation.bpb import bits_per_byte
    from move.text.loader import eval_windows
    from move.text.prepare import encode_document, load_prepared

    device = pick_device(args.device)
    model, _ = load_model(args.checkpoint, device)
    seq_len = model.config.seq_len
    if args.text:
        tokenizer = tokenizer_for(args.checkpoint, args.tokenizer)
        try:
            text = Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{args.text}: cannot read as UTF-8 text ({e.__class__.__name__})") from None
        tokens = np.asarray(encode_document(tokenizer, text, seq_len), dtype=np.int64)
        source = args.text
    else:
        data = load_prepared(args.data)
        tokenizer, tokens, source = data.tokenizer, data.tokens(args.split), f"{args.data}:{args.split}"
    token_bytes = torch.from_numpy(tokenizer.token_bytes())
    bpb = bits_per_byte(model, eval_windows(tokens, seq_len, args.max_tokens, args.batch_size), token_bytes)
    print(json.dumps({"checkpoint": str(args.checkpoint), "source": source, "bpb": bpb}))


def cmd_sample(args) -> None:
    from move.model.sampling import generate

    device = torch.device("cpu") if args.mmap_bank else pick_device(args.device)
    model, _ = load_model(args.checkpoint, device, mmap_bank=args.mmap_bank)
    tokenizer = tokenizer_for(args.checkpoint, args.tokenizer)
    prompt = [tokenizer.bos_id] + tokenizer.encode(args.prompt)
    prompt = torch.tensor([prompt] * args.num_samples, device=device)
    out = generate(model, prompt, args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed)
    for row in out.tolist():
        print(tokenizer.decode(row))
        print("-" * 40)


# ---------------------------------------------------------------------------- compare
def cmd_compare(args) -> None:
    from move.experiments.compare import run_comparison

    torch.set_flush_denormal(True)
    run_comparison(args)


# ---------------------------------------------------------------------------- bench
def cmd_bench(args) -> None:
    from move.experiments.bench import CONFIGS, QUICK, BenchShape, run_bench

    unknown = [c for c in args.configs or [] if c not in CONFIGS]
    if unknown:
        raise UserError(f"unknown bench config {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    shape = QUICK if args.quick else BenchShape()
    if args.rounds:
        shape.rounds = args.rounds
    run_bench(shape, None if args.no_save else args.out, args.configs, args.device)


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from move.text.corpora import SOURCES
    from move.text.prepare import PrepareOptions
    from move.training.optim import OptimConfig
    from move.training.trainer import TrainConfig

    parser = OneLineParser(prog="move", description="MoVE: mixture of value embeddings")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("prepare", help="split, tokenise and store a text corpus")
    add_dataclass_flags(p, PrepareOptions, skip=("source",))
    p.add_argument("--corpus", dest="source", default="shakespeare", choices=SOURCES)
    p.add_argument("--out", required=True, help="prepared data directory to create")
    p.add_argument("--force", action="store_true", help="replace an existing directory")
    p.set_defaults(func=cmd_prepare)

    def add_training_flags(p):
        p.add_argument("--data", required=True, help="prepared data directory (move prepare)")
        p.add_argument("--preset", default="small", help=f"model shape: {', '.join(MODEL_PRESETS)}")
        p.add_argument("--variant", dest="value_memory", default=None, help="standard, lave or move")
        p.add_argument("--density", dest="memory_density", type=int, default=None, help="memory density k (xk)")
        add_dataclass_flags(p, ModelConfig, skip=("value_memory", "memory_density"))
        add_dataclass_flags(p, TrainConfig)
        add_dataclass_flags(p, OptimConfig)

    p = sub.add_parser("train", help="train a model on prepared text")
    add_training_flags(p)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    p.add_argument("--force", action="store_true", help="replace an existing run directory")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="bits per byte of a checkpoint on a data split or a text file")
    p.add_argument("checkpoint")
    p.add_argument("--data", help="prepared data directory")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--text", help="a UTF-8 text file to evaluate instead")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's data)")
    p.add_argument("--max-tokens", type=int, default=10**9)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="generate text from a checkpoint (KV cache)")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", default="")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="tokenizer.json (default: the checkpoint's data)")
    p.add_argument("--device", default="auto")
    p.add_argument("--mmap-bank", action="store_true",
                   help="keep the MoVE bank in the checkpoint file, gather rows on demand (CPU)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("compare", help="the main job: train variants on identical data and report")
    add_training_flags(p)
    p.add_argument("--variants", nargs="+", default=["standard", "lave:1", "move:1", "move:4"],
                   help="variant[:density] list")
    p.add_argument("--out", required=True, help="directory for runs and the report")
    p.add_argument("--force", action="store_true", help="retrain runs that are already complete")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("bench", help="training-step, decode and memory cost of value memory, side by side")
    p.add_argument("--out", default="benchmarks", help="where to write <device>_bench.md / .json")
    p.add_argument("--quick", action="store_true", help="tiny shapes (seconds; for smoke tests)")
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument("--configs", nargs="+", help="subset of configurations (standard is always the baseline)")
    p.add_argument("--rounds", type=int, default=0, help="timed rounds (default 7)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "eval" and not (args.data or args.text):
        parser.error("eval needs --data or --text")
    try:
        args.func(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
