"""Command line: `move <command>` or `python -m move <command>`.

Every error a user can cause prints one line `error: ...` and exits with status 2
(add --debug for the traceback).

Start-up: this module imports only the configs (plain dataclasses, no PyTorch), so
`move --help` and `move <command> --help` answer at once; each command imports
what it runs when it runs (tests/test_cli.py checks that importing this module
loads no torch).
"""

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from move import DISTRIBUTION, __version__
from move.config import (
    DEFAULT_PRESET,
    LABEL_DROPOUT,
    MEMORY_KINDS,
    MODEL_PRESETS,
    ClassifierConfig,
    ModelConfig,
    OptimConfig,
    RetrofitRun,
    TrainConfig,
    VQConfig,
    model_config_from_preset,
)
from move.errors import UserError
from move.knowledge.corpus import OPENERS
from move.readers import read_text

if TYPE_CHECKING:
    from move.recipes import RunSpec


def format_default(value) -> str:
    if value == "" or value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


class HelpWithDefaults(argparse.HelpFormatter):
    """Every flag's help ends with the default it really gets: argparse's own default
    where it holds it; flags of config dataclasses state theirs (a preset's, a file's)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            not action.option_strings
            or "(default" in text
            or action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
        ):
            return text
        return f"{text} (default {format_default(action.default)})".replace("%", "%%")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpWithDefaults)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}\n")


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def at_least(minimum: int):
    """An argparse type: an integer >= minimum (a bad count is a one-line usage error)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


BYTE_UNITS = {
    "": 2**30,
    "g": 2**30,
    "gb": 2**30,
    "gib": 2**30,
    "m": 2**20,
    "mb": 2**20,
    "mib": 2**20,
    "t": 2**40,
    "tb": 2**40,
    "tib": 2**40,
}


def byte_size(text: str) -> int:
    """An argparse type: a memory size such as 80GB, 141GiB or 512MB (units of 2^30 and
    2^20 bytes, as GPU memory is quoted; a bare number is GiB)."""
    number = text.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ")
    unit = text[len(number) :].strip().lower()
    try:
        value = float(number) * BYTE_UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 80GB, 141GiB, 512MB)") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return int(value)


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


METAVARS = {int: "INT", float: "FLOAT", bool: "BOOL"}


def field_help(cls, name: str) -> str:
    return cls.__dataclass_fields__[name].metadata["help"]


def add_dataclass_flags(parser, cls, skip=(), shown=None) -> None:
    """One --flag per field of a config dataclass, with the field's help and the default
    a run really gets: `shown` gives that default's text where it is not the dataclass's
    (a preset's, the data's, the command's own). Parsed values default to None (= not
    given), so a config file can sit between the defaults and the flags."""
    shown = shown or {}
    for f in dataclasses.fields(cls):
        if f.name in skip or dataclasses.is_dataclass(f.type):
            continue
        kind = str if f.default in (None, dataclasses.MISSING) else type(f.default)
        default = shown.get(f.name, format_default(f.default))
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            default=None,
            type=parse_bool if kind is bool else kind,
            metavar=METAVARS.get(kind, "TEXT"),
            help=f"{f.metadata['help']} (default {default})".replace("%", "%%"),
        )


def preset_defaults(preset: str = DEFAULT_PRESET) -> dict[str, str]:
    """What a GPT run gets for the model fields when no flag or file sets them."""
    shown = {k: f"{v}, from --preset {preset}" for k, v in MODEL_PRESETS[preset].items()}
    shown["vocab_size"] = "the data's vocabulary"
    shown["seq_len"] = f"{MODEL_PRESETS[preset]['seq_len']}, from --preset {preset}; image data: the tokens of an image"
    return shown


def config_overrides(args, cls) -> dict:
    """The flags of `args` that set fields of dataclass `cls` (None = not given)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def given_flags(args) -> dict:
    return {k: v for k, v in vars(args).items() if v is not None}


def run_spec_from(args, data_required: bool = True) -> "RunSpec":
    """The RunSpec of `train` / `compare` / `plan`: the defaults, then the --config file,
    then the flags given on the command line (plan: data "" when none is named)."""
    from move.config import read_run_config
    from move.recipes import RunSpec

    file = read_run_config(args.config) if args.config else {}
    data = args.data or file.get("data") or ""
    if not data and data_required:
        raise UserError("no training data: pass --data or a --config file that names it")
    flags = given_flags(args)
    return RunSpec(
        data=data,
        preset=flags.get("preset", file.get("preset", DEFAULT_PRESET)),
        model={**file.get("model", {}), **config_overrides(args, ModelConfig)},
        train=TrainConfig.from_flat({**file.get("train", {}), **flags}),
        label_dropout=flags.get("label_dropout", file.get("label_dropout", LABEL_DROPOUT)),
    )


# ---------------------------------------------------------------------------- prepare
def done_verb(args, verb: str) -> str:
    """What a data command did with --out: `verb`, or "kept" when it already held data
    made with the same options (anything else there is refused before this is asked)."""
    return "kept (already made with these options)" if Path(args.out).exists() and not args.force else verb


def pretrained_tokenizer(path):
    """This project's Tokenizer from a pretrained model's: a tokenizer.json, a
    transformers folder, or a .gguf file (read through transformers)."""
    from move.text.tokenizer import Tokenizer

    if str(path).endswith(".gguf"):
        from move.export.hf_models import project_tokenizer

        return project_tokenizer(path)
    return Tokenizer.load(path)


def cmd_prepare(args) -> None:
    from move.text.prepare import PrepareOptions, prepare

    options = PrepareOptions(**config_overrides(args, PrepareOptions))
    verb = done_verb(args, "prepared")
    pretrained = pretrained_tokenizer(options.tokenizer) if options.tokenizer not in ("bpe", "gpt2") else None
    manifest = prepare(options, args.out, force=args.force, pretrained=pretrained)
    s = manifest["splits"]
    print(
        f"{verb} {args.out}: vocab {manifest['vocab_size']}, train {s['train']['tokens']:,} tokens "
        f"({s['train']['documents']} docs), val {s['val']['tokens']:,} tokens ({s['val']['documents']} docs)"
    )


# ---------------------------------------------------------------------------- train
def cmd_train(args) -> None:
    import torch

    from move.recipes import start_training
    from move.training.distributed import distributed_job

    torch.set_flush_denormal(True)  # AdamW slows ~20x on denormals on CPU
    spec = run_spec_from(args)
    with distributed_job(spec.train.device):  # under torchrun: one process per rank
        summary = start_training(spec, args.out, resume=args.resume, force=args.force).run()
        print_summary(summary)


def print_summary(summary: dict) -> None:
    from move.training.distributed import current

    if current().is_main:
        print(json.dumps({k: v for k, v in summary.items() if k != "accounting"}, indent=2))


# ---------------------------------------------------------------------------- plan
def cmd_plan(args) -> None:
    from move.device import PEAK_BF16_FLOPS
    from move.recipes import load_data, model_config_for
    from move.training.plan import fits, gib, measure_peak_bytes, plan_run, plan_text

    spec = run_spec_from(args, data_required=False)
    spec.train.validate()
    config = (
        model_config_for(spec, load_data(spec.data))
        if spec.data
        else model_config_from_preset(spec.preset, **spec.model)
    )
    peaks = {name.lower(): (name, flops / 1e12) for name, flops in PEAK_BF16_FLOPS}
    card, peak = "", spec.train.peak_tflops or None
    if args.card:
        if args.card.lower() not in peaks:
            raise UserError(
                f"unknown card {args.card!r}; choose from {', '.join(n for n, _ in PEAK_BF16_FLOPS)} "
                f"or give --peak-tflops"
            )
        card, sheet = peaks[args.card.lower()]
        peak = peak or sheet
    on_gpu = bool(args.card or args.gpu_memory or spec.train.device.startswith("cuda"))
    bf16 = on_gpu if args.bf16 is None else args.bf16
    plan = plan_run(config, spec.train, args.processes, bf16)
    if args.measure and args.processes > 1:
        raise UserError("--measure trains in this one process: use it with --processes 1")
    measured = measure_peak_bytes(config, spec.train, args.measure) if args.measure else None
    if args.json:
        print(
            json.dumps(
                dict(
                    params=plan.params,
                    flops_per_token=plan.flops_per_token,
                    tokens=plan.tokens,
                    processes=plan.processes,
                    micro_batch=plan.micro_batch,
                    bf16=bf16,
                    memory_bytes=plan.memory,
                    memory_total_bytes=plan.memory_total,
                    fits=fits(plan, args.gpu_memory) if args.gpu_memory else None,
                    hours=plan.hours(peak, args.mfu) if peak else None,
                    measured_peak_bytes=measured,
                ),
                indent=2,
            )
        )
    else:
        print(plan_text(plan, args.gpu_memory, peak, args.mfu, card))
        if measured is not None:
            print(
                f"\nmeasured: {gib(measured)} at the peak of {args.measure} training step(s) here "
                f"({measured / plan.memory_total:.2f} x the plan)"
            )


# ---------------------------------------------------------------------------- consolidate
def cmd_consolidate(args) -> None:
    from move.recipes import resolve_checkpoint
    from move.training.sharded_checkpoint import consolidate

    checkpoint = resolve_checkpoint(args.checkpoint)
    if Path(args.out).exists():
        raise UserError(f"{args.out} exists; consolidate writes a new directory (nothing was changed)")
    out = consolidate(checkpoint, args.out)
    print(f"consolidated {checkpoint} into {out} (one weights file: sample, eval, export-hf, --mmap-bank)")


# ---------------------------------------------------------------------------- eval / sample
def tokenizer_for(checkpoint, explicit):
    from move.text.tokenizer import Tokenizer
    from move.training.checkpoint import read_header, tokenizer_source

    return Tokenizer.load(tokenizer_source(checkpoint, read_header(checkpoint), explicit))


def cmd_eval(args) -> None:
    import numpy as np
    import torch

    from move.device import pick_device
    from move.evaluation.bpb import bits_per_byte
    from move.recipes import resolve_checkpoint
    from move.text.loader import eval_windows, sliding_windows
    from move.text.prepare import encode_document, load_prepared
    from move.training.checkpoint import load_model

    device = pick_device(args.device)
    args.checkpoint = resolve_checkpoint(args.checkpoint)  # a checkpoint, or a run directory (its newest)
    model, _ = load_model(args.checkpoint, device)
    seq_len = model.config.seq_len
    sliding = args.protocol == "sliding"
    if args.text:
        tokenizer = tokenizer_for(args.checkpoint, args.tokenizer)
        text = read_text(args.text)
        if sliding:  # one BOS, then the text as one sequence
            tokens = np.asarray([tokenizer.bos_id, *tokenizer.encode(text)], dtype=np.int64)
        else:  # a BOS before every passage of seq_len tokens, as training data is made
            tokens = np.asarray(encode_document(tokenizer, text, seq_len), dtype=np.int64)
        if len(tokens) < 2:
            raise UserError(f"{args.text}: no text to evaluate (bits per byte needs at least one predicted token)")
        source = args.text
    else:
        data = load_prepared(args.data)
        tokenizer, tokens, source = data.tokenizer, data.tokens(args.split), f"{args.data}:{args.split}"
    model.check_token_ids(torch.tensor([int(tokens.min()), int(tokens.max())]))  # once: the forward does not check
    token_bytes = torch.from_numpy(tokenizer.token_bytes())
    if sliding:
        stride = args.stride or seq_len // 2
        windows = sliding_windows(tokens, seq_len, stride, args.max_tokens, args.batch_size)
        protocol = {"protocol": "sliding", "stride": stride}
    else:
        windows = eval_windows(tokens, seq_len, args.max_tokens, args.batch_size)
        protocol = {"protocol": "passages"}
    bpb = bits_per_byte(model, windows, token_bytes)
    print(json.dumps({"checkpoint": str(args.checkpoint), "source": source, **protocol, "bpb": bpb}))


def cmd_sample(args) -> None:
    import torch

    from move.device import pick_device
    from move.model.sampling import generate
    from move.recipes import resolve_checkpoint
    from move.training.checkpoint import load_model

    if args.compile and args.mmap_bank:
        raise UserError(
            "--compile and --mmap-bank do not combine: rows read from the file on demand cannot be compiled"
        )
    device = torch.device("cpu") if args.mmap_bank else pick_device(args.device)
    args.checkpoint = resolve_checkpoint(args.checkpoint)  # a checkpoint, or a run directory (its newest)
    model, _ = load_model(args.checkpoint, device, mmap_bank=args.mmap_bank)
    tokenizer = tokenizer_for(args.checkpoint, args.tokenizer)
    prompt = [tokenizer.bos_id, *tokenizer.encode(args.prompt)]
    prompt = torch.tensor([prompt] * args.num_samples, device=device)
    out = generate(
        model,
        prompt,
        args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        compiled=args.compile,
    )
    for row in out.tolist():
        print(tokenizer.decode(row))
        print("-" * 40)


# ---------------------------------------------------------------------------- images
def dataset_from(args):
    from move.image.datasets import load_image_dataset

    return load_image_dataset(args.dataset, args.root, args.image_size, args.channels)


def dataset_source(args) -> dict:
    """What `image-encode` records so later commands can reload the same images."""
    return {
        "source": args.dataset,
        "root": str(Path(args.root).resolve()) if args.root else None,
        "image_size": args.image_size,
        "channels": args.channels,
    }


def train_image_helper(args, model_class, config_class, task_class, shape_fields) -> None:
    """image-tokenizer / image-classifier: a conv net trained by the shared Trainer."""
    import torch

    from move.training.distributed import current, distributed_job, job_device, per_rank_batch
    from move.training.trainer import Trainer, prepare_model

    torch.set_flush_denormal(True)
    dataset = dataset_from(args)
    train_config = TrainConfig.from_flat(given_flags(args))
    config = config_class(**{**config_overrides(args, config_class), **shape_fields(dataset)})
    with distributed_job(train_config.device):
        torch.manual_seed(train_config.seed)
        model = model_class(config).to(job_device(train_config.device))
        task = task_class(
            dataset,
            per_rank_batch(train_config.batch_size),
            train_config.loader_seed,
            args.eval_images,
            current().rank,
            current().world_size,
        )
        task.check_model(model)
        prepare_model(model, train_config)
        summary = Trainer(model, task, train_config, args.out, resume=args.resume, force=args.force).run()
        print_summary(summary)


def cmd_image_tokenizer(args) -> None:
    from move.image.tasks import ReconstructionTask
    from move.model.vqvae import VQVAE

    train_image_helper(
        args, VQVAE, VQConfig, ReconstructionTask, lambda d: {"channels": d.shape[0], "image_size": d.shape[1]}
    )


def cmd_image_classifier(args) -> None:
    from move.image.tasks import ClassificationTask
    from move.model.classifier import ImageClassifier

    train_image_helper(
        args,
        ImageClassifier,
        ClassifierConfig,
        ClassificationTask,
        lambda d: {"channels": d.shape[0], "image_size": d.shape[1], "num_classes": d.num_classes},
    )


def cmd_image_encode(args) -> None:
    from move.device import pick_device
    from move.image.prepare import encode_dataset
    from move.image.tokenizers import PixelQuantizer, VQTokenizer
    from move.recipes import resolve_checkpoint

    dataset = dataset_from(args)
    if args.tokenizer == "pixel":
        tokenizer = PixelQuantizer(args.levels or dataset.gray_levels, dataset.shape)
    else:
        tokenizer = VQTokenizer(resolve_checkpoint(args.tokenizer), pick_device(args.device))
    verb = done_verb(args, "encoded")
    manifest = encode_dataset(dataset, tokenizer, dataset_source(args), args.out, force=args.force)
    s = manifest["splits"]
    print(
        f"{verb} {args.out}: {manifest['dataset']['name']}, codebook {manifest['codebook_size']}, grid "
        f"{'x'.join(map(str, manifest['grid']))}, train {s['train']['examples']:,} / "
        f"test {s['test']['examples']:,} images"
    )


def image_model_and_data(checkpoint, data_dir, device, decoding_only: bool = False):
    """The model and its image data: for sampling (decoding_only) the copy inside the
    checkpoint is enough unless --data is given; evaluation needs the data itself."""
    from move.image.prepare import decoding_from_checkpoint, load_prepared_images
    from move.recipes import resolve_checkpoint
    from move.training.checkpoint import data_dir_for, load_model

    checkpoint = resolve_checkpoint(checkpoint)
    model, header = load_model(checkpoint, device)
    data = decoding_from_checkpoint(checkpoint, header) if decoding_only and not data_dir else None
    if data is None:
        data_dir = data_dir_for(checkpoint, header, data_dir, "--data")
        data = load_prepared_images(data_dir)
    if model.config.vocab_size != data.layout.vocab_size:
        raise UserError(
            f"{checkpoint}: vocabulary {model.config.vocab_size} does not fit the image data "
            f"{data.directory} ({data.layout.vocab_size})"
        )
    return model, data


def cmd_image_sample(args) -> None:
    from move.device import pick_device
    from move.image.evaluate import generate_images
    from move.image.sampling import class_grid_labels, save_grid

    model, data = image_model_and_data(args.checkpoint, args.data, pick_device(args.device), decoding_only=True)
    labels = class_grid_labels(data.layout.num_classes, args.per_class)
    images = generate_images(model, data, labels, args.cfg_scale, args.temperature, args.top_k, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_grid(images, args.per_class, args.out, row_labels=data.manifest["class_names"])
    print(
        f"wrote {args.out}: one row per class ({', '.join(data.manifest['class_names'])}), cfg scale {args.cfg_scale}"
    )


def cmd_image_eval(args) -> None:
    from move.device import pick_device
    from move.files import atomic_write_json
    from move.image.evaluate import evaluate_generator
    from move.recipes import resolve_checkpoint

    model, data = image_model_and_data(args.checkpoint, args.data, pick_device(args.device))
    result = evaluate_generator(
        model,
        data,
        resolve_checkpoint(args.classifier),
        args.num_samples,
        args.cfg_scale,
        args.temperature,
        args.top_k,
        args.seed,
        grid_path=args.grid,
    )
    if args.out:
        atomic_write_json(args.out, result)
    print(json.dumps(result))


# ---------------------------------------------------------------------------- compare
def cmd_compare(args) -> None:
    import torch

    from move.experiments.compare import ImageEvalSpec, run_comparison

    torch.set_flush_denormal(True)
    image_eval = ImageEvalSpec(args.classifier, args.fid_samples, args.cfg_scale)
    run_comparison(run_spec_from(args), args.variants, args.out, force=args.force, image_eval=image_eval)


# ---------------------------------------------------------------------------- knowledge probe
def cmd_knowledge_prepare(args) -> None:
    from move.knowledge.corpus import KnowledgeConfig, prepare_knowledge, single_token_words, value_count

    config = KnowledgeConfig(
        args.individuals, args.name_tokens, args.seed, args.relations, args.values, args.cue_tokens, args.order
    )
    verb = done_verb(args, "prepared")
    pretrained = pretrained_tokenizer(args.tokenizer) if args.tokenizer else None
    if args.word_values:
        if pretrained is None:
            raise UserError("--word-values draws one-token words of a pretrained tokenizer: give --tokenizer too")
        config.value_words = single_token_words(pretrained, value_count(config), args.seed)
    manifest = prepare_knowledge(config, args.out, args.force, pretrained, args.tokenizer or "")
    relations = f"{args.relations} relations of {args.values} values" if args.relations else "the 5 classic relations"
    print(
        f"{verb} {args.out}: {args.individuals} individuals, names of {args.name_tokens} token(s), {relations}, "
        f"{args.order}, vocab {manifest['vocab_size']}, train {manifest['splits']['train']['tokens']:,} tokens"
    )


def cmd_knowledge_eval(args) -> None:
    from move.device import pick_device
    from move.knowledge.recall import load_knowledge, recall
    from move.recipes import resolve_checkpoint
    from move.text.prepare import load_prepared
    from move.training.checkpoint import data_dir_for, load_model

    checkpoint = resolve_checkpoint(args.checkpoint)
    model, header = load_model(checkpoint, pick_device(args.device))
    data_dir = data_dir_for(checkpoint, header, args.data, "--data")
    data = load_prepared(data_dir)
    knowledge = load_knowledge(data_dir)
    if args.opener is not None:  # ask in another phrasing (a training one: what the model memorised verbatim)
        knowledge = {**knowledge, "held_out_opener": args.opener}
    print(json.dumps(recall(model, data.tokenizer, knowledge)))


# ---------------------------------------------------------------------------- gates
def cmd_gates(args) -> None:
    import torch

    from move.device import pick_device
    from move.evaluation.gates import gate_summary, plot_gate_summary
    from move.files import atomic_write_json
    from move.recipes import resolve_checkpoint
    from move.training.checkpoint import load_model

    checkpoint = resolve_checkpoint(args.checkpoint)
    model, _ = load_model(checkpoint, pick_device(args.device))
    if not model.value_tables():
        raise UserError(f"{args.checkpoint}: a standard model has no value memory to analyse")
    tokenizer = tokenizer_for(checkpoint, args.tokenizer)
    text = read_text(args.text)
    ids = ([tokenizer.bos_id, *tokenizer.encode(text)])[: model.config.seq_len]
    idx = torch.tensor([ids], device=next(model.parameters()).device)
    summary = gate_summary(model, idx)
    tokens = [tokenizer.decode([i]) or "<bos>" for i in ids]
    plot_gate_summary(summary, tokens, args.out)
    atomic_write_json(Path(args.out).with_suffix(".json"), {"tokens": tokens, **summary})
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}")


# ---------------------------------------------------------------------------- export
def cmd_export_hf(args) -> None:
    from move.export.hf import export_hf
    from move.recipes import resolve_checkpoint

    out = export_hf(resolve_checkpoint(args.checkpoint), args.out, args.tokenizer, force=args.force)
    print(f"exported {out}: AutoModelForCausalLM.from_pretrained('{out}', trust_remote_code=True)")


def cmd_retrofit(args) -> None:
    import torch

    from move.export.retrofit_training import train_retrofit

    torch.set_flush_denormal(True)
    run = RetrofitRun(**config_overrides(args, RetrofitRun))
    summary = train_retrofit(
        args.model,
        args.data,
        args.out,
        run,
        args.general_data,
        save=not args.no_save,
        untouched=args.untouched,
        resume=args.resume,
        force=args.force,
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "accounting"}, indent=2))


# ---------------------------------------------------------------------------- experiments
def cmd_experiment(args) -> None:
    import torch

    from move.experiments.report import write_experiment_report
    from move.experiments.runner import run_experiment

    torch.set_flush_denormal(True)
    out = run_experiment(args.file, args.out, force=args.force, only=tuple(args.only), wait=not args.no_wait)
    if out is not None:
        write_experiment_report(out)


def cmd_report(args) -> None:
    from move.experiments.report import write_experiment_report

    write_experiment_report(args.results)


# ---------------------------------------------------------------------------- designs
def cmd_designs_table(args) -> None:
    from move.experiments.designs import designs_table
    from move.files import atomic_write_text

    table = designs_table(args.text, args.time, args.knowledge, args.bench)
    if args.out:
        atomic_write_text(args.out, table)
    print(table, end="")


# ---------------------------------------------------------------------------- bench
def cmd_bench(args) -> None:
    from move.experiments.bench import CONFIGS, SHAPES, run_bench, run_profile

    unknown = [c for c in args.configs or [] if c not in CONFIGS]
    if unknown:
        raise UserError(f"unknown bench config {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    shape = SHAPES["quick" if args.quick else args.shape]()
    if args.rounds:
        shape.rounds = args.rounds
    if args.profile:
        names = args.configs or ["move_x1", "move_x4", "move_x4_ref", "move_x4_lazy"]
        run_profile(
            shape,
            args.profile_vocab or shape.vocab_sizes[0],
            names,
            args.profile_steps,
            None if args.no_save else args.out,
            args.device,
        )
        return
    run_bench(shape, None if args.no_save else args.out, args.configs, args.device)


# ---------------------------------------------------------------------------- parser
DEVICE_HELP = "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps"
TOKENIZER_HELP = "tokenizer.json or its directory (default the one stored in the checkpoint)"


def build_parser() -> argparse.ArgumentParser:
    from move.text.corpora import SOURCES
    from move.text.prepare import PrepareOptions

    parser = OneLineParser(prog="move", description="MoVE: mixture of value embeddings")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"move {__version__} ({DISTRIBUTION})")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("prepare", help="split, tokenise and store a text corpus")
    add_dataclass_flags(p, PrepareOptions, skip=("source",))
    p.add_argument(
        "--corpus",
        dest="source",
        default="shakespeare",
        choices=SOURCES,
        help="bundled corpus, or a local format read from --path",
    )
    p.add_argument("--out", required=True, help="prepared data directory to create")
    p.add_argument("--force", action="store_true", help="replace an existing directory")
    p.set_defaults(func=cmd_prepare)

    def add_training_flags(p):
        p.add_argument(
            "--config",
            help="a run config TOML: data, preset, label_dropout, [model] and [train] "
            "tables (an earlier run's config.toml); flags override it (default none)",
        )
        p.add_argument(
            "--data",
            help="prepared data directory (move prepare, image-encode, knowledge-prepare); "
            "(default the --config file's; one of the two is required, except by plan)",
        )
        p.add_argument(
            "--preset",
            choices=list(MODEL_PRESETS),
            help=f"model shape the [model] fields and flags override (default {DEFAULT_PRESET})",
        )
        p.add_argument(
            "--variant",
            dest="value_memory",
            choices=MEMORY_KINDS,
            help=f"{field_help(ModelConfig, 'value_memory')}: the value memory (default standard)",
        )
        p.add_argument(
            "--density",
            dest="memory_density",
            type=at_least(1),
            help=f"{field_help(ModelConfig, 'memory_density')} (default 1)",
        )
        add_dataclass_flags(p, ModelConfig, skip=("value_memory", "memory_density"), shown=preset_defaults())
        add_dataclass_flags(p, TrainConfig)
        add_dataclass_flags(p, OptimConfig)
        p.add_argument(
            "--label-dropout",
            type=float,
            help=f"image data: probability of replacing the class by the null class, for guidance "
            f"(default {LABEL_DROPOUT})",
        )

    p = sub.add_parser("train", help="train a model on prepared text or image tokens")
    add_training_flags(p)
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    p.add_argument("--force", action="store_true", help="replace an existing run directory")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "plan",
        help="what a training run will need: parameters, FLOPs, memory per process and "
        "time, without allocating (takes the train flags)",
    )
    add_training_flags(p)
    p.add_argument(
        "--processes",
        type=at_least(1),
        default=1,
        help="processes (GPUs) under torchrun; value-memory tables are row-sharded over them",
    )
    p.add_argument(
        "--gpu-memory",
        type=byte_size,
        help="memory of one device, e.g. 80GB (GiB units): says whether the run fits (default none)",
    )
    p.add_argument(
        "--card",
        help="a known GPU (H100, H200, A100, B200, L40S, ...) for its data-sheet bf16 peak "
        "(default none; --peak-tflops overrides the data sheet)",
    )
    p.add_argument("--mfu", type=fraction, default=0.4, help="model FLOPs utilisation assumed for the time estimate")
    p.add_argument(
        "--bf16",
        type=parse_bool,
        metavar="BOOL",
        help="activations under bf16 autocast (default true when planning for a GPU: --card, "
        "--gpu-memory or --device cuda; else false)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes, FLOPs, hours)")
    p.add_argument(
        "--measure",
        type=at_least(1),
        help="also train this many steps on random tokens here (one process, --device) and print the "
        "measured peak memory beside the plan (default none)",
    )
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("eval", help="bits per byte of a checkpoint on a data split or a text file")
    p.add_argument("checkpoint", help="checkpoint or run directory (its newest checkpoint)")
    p.add_argument("--data", help="prepared data directory whose --split to evaluate (default none: give --text)")
    p.add_argument("--split", default="val", choices=("train", "val"), help="split of --data")
    p.add_argument("--text", help="a UTF-8 text file to evaluate instead of --data (default none)")
    p.add_argument("--tokenizer", help=TOKENIZER_HELP)
    p.add_argument("--max-tokens", type=at_least(1), default=10**9, help="evaluate at most this many tokens")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="windows per forward")
    p.add_argument(
        "--protocol",
        choices=("passages", "sliding"),
        default="passages",
        help="passages: disjoint windows of the context length, a BOS before every passage of --text (as "
        "training data is made; the README's figures); sliding: one BOS, windows every --stride tokens, "
        "each token scored once with at least context - stride tokens before it (the transformers recipe)",
    )
    p.add_argument(
        "--stride", type=at_least(1), default=0, help="sliding: tokens between windows (0: half the context)"
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="generate text from a checkpoint (KV cache)")
    p.add_argument("checkpoint", help="checkpoint or run directory (its newest checkpoint)")
    p.add_argument("--prompt", default="", help="text to continue (after the BOS token)")
    p.add_argument("--max-tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the smallest set with this mass")
    p.add_argument("--num-samples", type=at_least(1), default=1, help="samples, generated as one batch")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--tokenizer", help=TOKENIZER_HELP)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument(
        "--mmap-bank",
        action="store_true",
        help="keep the MoVE bank in the checkpoint file, gather rows on demand (CPU)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the one-token decoding step against a static KV cache (pays off for long "
        "generations: the first step compiles, tens of seconds on a CPU)",
    )
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("compare", help="the main job: train variants on identical data and report")
    add_training_flags(p)
    p.add_argument(
        "--variants", nargs="+", default=["standard", "lave:1", "move:1", "move:4"], help="variant[:density] list"
    )
    p.add_argument("--out", required=True, help="directory for runs and the report")
    p.add_argument("--force", action="store_true", help="retrain runs that are already complete")
    p.add_argument(
        "--classifier",
        help="image data: classifier run for class accuracy (move image-classifier) (default none: no accuracy)",
    )
    p.add_argument(
        "--fid-samples", type=at_least(2), default=500, help="image data: samples per variant for FID/accuracy"
    )
    p.add_argument("--cfg-scale", type=float, default=1.5, help="image data: guidance scale for the samples")
    p.set_defaults(func=cmd_compare)

    def add_dataset_flags(p):
        from move.image.datasets import SOURCES as IMAGE_SOURCES

        p.add_argument("--dataset", required=True, choices=IMAGE_SOURCES, help="image dataset")
        p.add_argument(
            "--root", help="folder dataset: one sub-folder per class (or train/ and test/ of those) (default none)"
        )
        p.add_argument("--image-size", type=int, default=32, help="folder dataset: images are resized to this")
        p.add_argument("--channels", type=int, default=3, choices=(1, 3), help="folder dataset: 1 gray, 3 RGB")

    def add_conv_training_flags(p, config_class, skip, steps):
        # the conv nets' own defaults: shown in the help and set on the parser
        own = dict(steps=steps, batch_size=64, eval_every=500, checkpoint_every=500, lr_adamw_matrix=2e-3)
        add_dataset_flags(p)
        add_dataclass_flags(p, config_class, skip=skip)
        add_dataclass_flags(p, TrainConfig, shown={k: format_default(v) for k, v in own.items()})
        add_dataclass_flags(
            p,
            OptimConfig,
            skip=(
                "lr_matrix",
                "lr_embedding",
                "lr_value_memory",
                "lr_lm_head",
                "value_memory_optimizer",
                "value_memory_lr_per_slot",
                "optimizer",
            ),
            shown={k: format_default(v) for k, v in own.items()},
        )
        p.add_argument("--eval-images", type=at_least(1), default=2000, help="test images per evaluation")
        p.add_argument("--out", required=True, help="run directory")
        p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
        p.add_argument("--force", action="store_true", help="replace an existing run directory")
        p.set_defaults(**own)

    p = sub.add_parser("image-tokenizer", help="train a VQ-VAE image tokenizer (shared training loop)")
    add_conv_training_flags(p, VQConfig, skip=("image_size", "channels"), steps=1500)
    p.set_defaults(func=cmd_image_tokenizer)

    p = sub.add_parser("image-classifier", help="train the classifier that scores conditional samples")
    add_conv_training_flags(p, ClassifierConfig, skip=("image_size", "channels", "num_classes"), steps=1000)
    p.set_defaults(func=cmd_image_classifier)

    p = sub.add_parser("image-encode", help="tokenise an image dataset for class-conditional training")
    add_dataset_flags(p)
    p.add_argument("--tokenizer", required=True, help="'pixel' (per-pixel quantiser) or a VQ-VAE run/checkpoint")
    p.add_argument(
        "--levels", type=int, default=0, help="pixel quantiser levels (default 0: the dataset's gray levels)"
    )
    p.add_argument("--out", required=True, help="prepared image-token directory to create")
    p.add_argument("--force", action="store_true", help="replace an existing directory")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_image_encode)

    def add_image_sampling_flags(p):
        p.add_argument("checkpoint", help="checkpoint or run directory")
        p.add_argument("--data", help="prepared image data (default the one the model was trained on)")
        p.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale s")
        p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
        p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely codes (0: all)")
        p.add_argument("--seed", type=int, default=0, help="sampling seed")
        p.add_argument("--device", default="auto", help=DEVICE_HELP)

    p = sub.add_parser("image-sample", help="a PNG grid of guided samples, one row per class")
    add_image_sampling_flags(p)
    p.add_argument("--per-class", type=at_least(1), default=10, help="samples per class (one row each)")
    p.add_argument("--out", required=True, help="PNG file")
    p.set_defaults(func=cmd_image_sample)

    p = sub.add_parser("image-eval", help="FID, class accuracy and NLL of a class-conditional model")
    add_image_sampling_flags(p)
    p.add_argument("--classifier", required=True, help="classifier run or checkpoint (move image-classifier)")
    p.add_argument(
        "--num-samples", type=at_least(2), default=500, help="samples for FID and accuracy (FID is biased at small N)"
    )
    p.add_argument("--grid", help="also write a sample grid PNG here (default none)")
    p.add_argument("--out", help="also write the metrics JSON here (default none: print only)")
    p.set_defaults(func=cmd_image_eval)

    p = sub.add_parser("knowledge-prepare", help="a synthetic knowledge corpus for the capacity probe")
    p.add_argument("--individuals", type=at_least(2), default=1000, help="people in the synthetic biographies")
    p.add_argument("--name-tokens", type=at_least(1), default=1, help="tokens per name (1: each name its own token)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic facts")
    p.add_argument(
        "--relations", type=at_least(0), default=0, help="synthetic relations per person (0: the classic five)"
    )
    p.add_argument("--values", type=at_least(2), default=32, help="values per synthetic relation")
    p.add_argument("--cue-tokens", type=at_least(1), default=1, help="words in a synthetic relation's cue")
    p.add_argument(
        "--order",
        choices=["key-first", "query-first", "mixed"],
        default="key-first",
        help="key-first: '<name> <cue> <value>'; query-first: 'the <relation> of <name> is <value>'; mixed: either",
    )
    p.add_argument(
        "--tokenizer",
        help="a pretrained model's tokenizer (tokenizer.json, transformers folder or .gguf) instead of the "
        "word-level one (default none: word-level)",
    )
    p.add_argument(
        "--word-values",
        action="store_true",
        help="with --tokenizer: values are real words of one token each (recall then needs one forward per "
        "prompt) instead of invented ones (city5, r3v12)",
    )
    p.add_argument("--out", required=True, help="knowledge data directory to create")
    p.add_argument("--force", action="store_true", help="replace an existing directory")
    p.set_defaults(func=cmd_knowledge_prepare)

    p = sub.add_parser("knowledge-eval", help="recall accuracy and stored bits of a checkpoint")
    p.add_argument("checkpoint", help="checkpoint or run directory")
    p.add_argument("--data", help="knowledge data (default the one the model was trained on)")
    p.add_argument(
        "--opener",
        choices=OPENERS,
        help="ask under this opener (a training one: recall of the trained sentences themselves) "
        "(default none: the held-out opener)",
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_knowledge_eval)

    p = sub.add_parser("gates", help="plot how much each layer and head relies on g0 versus the memory slots")
    p.add_argument("checkpoint", help="checkpoint or run directory")
    p.add_argument("--text", required=True, help="a UTF-8 text to run the model on")
    p.add_argument("--tokenizer", help=TOKENIZER_HELP)
    p.add_argument("--out", default="gates.png", help="PNG to write (and a .json of the numbers next to it)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_gates)

    p = sub.add_parser(
        "consolidate", help="a sharded (torchrun) checkpoint as one weights file, written piece by piece"
    )
    p.add_argument("checkpoint", help="sharded checkpoint, or a run directory (its newest checkpoint)")
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.set_defaults(func=cmd_consolidate)

    p = sub.add_parser("export-hf", help="a Hugging Face transformers folder (trust_remote_code)")
    p.add_argument("checkpoint", help="checkpoint or run directory")
    p.add_argument("out", help="folder to write")
    p.add_argument("--tokenizer", help=TOKENIZER_HELP)
    p.add_argument("--force", action="store_true", help="replace an existing export folder")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser(
        "retrofit",
        help="teach a pretrained causal LM (GGUF file or transformers folder) a corpus: MoVE bank, LoRA or both",
    )
    p.add_argument("model", help="a local .gguf file or transformers folder (never a hub name)")
    p.add_argument("--data", required=True, help="prepared data (move prepare --tokenizer MODEL)")
    p.add_argument("--out", required=True, help="folder for the retrofitted model (save_pretrained) and retrofit.json")
    p.add_argument(
        "--general-data",
        action="append",
        help="a corpus prepared with the same tokenizer that the model does not train on: its bpb before and "
        "after and the KL divergence from the untouched model, what the model forgets; repeat for more "
        "(the first is reported as general_*, the others by their directory name) (default none)",
    )
    p.add_argument(
        "--untouched",
        help="a JSON file keeping the untouched model's measures: written by the first run, reused by later "
        "runs of the same model, data and evaluation settings, refused for others (default none: measured)",
    )
    p.add_argument("--no-save", action="store_true", help="write retrofit.json only, not the model")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its newest checkpoint (same flags)"
    )
    p.add_argument("--force", action="store_true", help="replace the run in --out")
    add_dataclass_flags(p, RetrofitRun)
    p.set_defaults(func=cmd_retrofit)

    p = sub.add_parser("experiment", help="run a declarative experiment (TOML grid over variants, sizes, seeds)")
    p.add_argument("file", help="experiment TOML (see experiments/)")
    p.add_argument("--out", help="results directory (default results/<name>)")
    p.add_argument("--force", action="store_true", help="retrain finished runs")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="SIZE/VARIANT",
        help="run only this cell of the grid (every seed), e.g. layer-start/move:1; repeatable (default every cell)",
    )
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="when only runs another process is training are left, leave them to it and stop (with a partial "
        "report) instead of waiting for them (default wait)",
    )
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("report", help="tables, statistics and plots of an experiment's results")
    p.add_argument("results", help="results directory of `move experiment`")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "designs-table",
        help="MoVE vs the other memory designs: one table from a text experiment, "
        "its standard model's decay budgets, a knowledge probe and move bench",
    )
    p.add_argument("--text", required=True, help="results of the text experiment (every design, one size)")
    p.add_argument(
        "--time",
        required=True,
        help="results of the standard-only experiment with decay budgets "
        "around the text runs' length (equal-time comparison)",
    )
    p.add_argument("--knowledge", required=True, help="results of the knowledge-probe experiment")
    p.add_argument("--bench", required=True, help="cpu_bench.json of `move bench --shape small` with every design")
    p.add_argument("--out", help="also write the table to this markdown file (default print only)")
    p.set_defaults(func=cmd_designs_table)

    p = sub.add_parser("bench", help="training-step, decode and memory cost of value memory, side by side")
    p.add_argument("--out", default="benchmarks", help="where to write <device>_bench.md / .json")
    p.add_argument("--quick", action="store_true", help="tiny shapes (seconds; for smoke tests)")
    p.add_argument(
        "--shape",
        choices=("default", "small"),
        default="default",
        help="default: 6 layers x 384 at vocabularies 8,192 and 32,768; small: the CPU experiments' "
        "shape (4 x 128, vocabulary 2,048, 16 x 128 tokens per step)",
    )
    p.add_argument("--no-save", action="store_true", help="print only")
    p.add_argument(
        "--configs",
        nargs="+",
        help="subset of configurations (standard is always the baseline) "
        "(default standard, LaVE and MoVE; the other designs on request)",
    )
    p.add_argument("--rounds", type=int, default=0, help="timed rounds (default 7)")
    p.add_argument("--profile", action="store_true", help="instead: op-level torch.profiler breakdown vs standard")
    p.add_argument("--profile-vocab", type=int, default=0, help="vocabulary for --profile (default the first)")
    p.add_argument("--profile-steps", type=int, default=3, help="profiled steps per configuration")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "eval" and not (args.data or args.text):
        parser.error("eval needs --data or --text")
    try:
        run_command(args)
    except (UserError, OSError) as e:
        # OSError: what the file system refused (a path under a file, no permission, a full
        # disk) - the user's to fix, so one line; the writers leave earlier output intact
        if args.debug:
            raise
        rank = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"error: {rank}{describe_error(e)}", file=sys.stderr)
        return 2
    return 0


# Commands whose work runs in library loops (evaluation, sampling, tokenising) show
# those loops' bars; the training commands have the trainer's and the experiment's own.
SHOWS_PROGRESS = {
    "prepare",
    "eval",
    "image-encode",
    "image-sample",
    "image-eval",
    "knowledge-prepare",
    "knowledge-eval",
    "export-hf",
    "retrofit",
}


def run_command(args) -> None:
    from move.progress import shown

    with shown() if args.command in SHOWS_PROGRESS else contextlib.nullcontext():
        if "WORLD_SIZE" in os.environ:  # under torchrun: the failing rank's error goes into torchrun's failure report
            from torch.distributed.elastic.multiprocessing.errors import record

            record(args.func)(args)
        else:
            args.func(args)


def describe_error(e: Exception) -> str:
    if isinstance(e, OSError) and not isinstance(e, UserError):
        where = f"{e.filename}: " if e.filename else ""
        reason = e.strerror or e.__class__.__name__
        return f"{where}{reason} (the file system refused; nothing already written was removed)"
    return str(e)
