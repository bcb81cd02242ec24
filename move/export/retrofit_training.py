"""`move retrofit MODEL --data DIR --out DIR`: teach a pretrained causal LM a corpus
with a MoVE bank, LoRA, full fine-tuning or a mix of them, in one command.

It trains through this project's Trainer (move/export/retrofit_trainable.py wraps the
Hugging Face model for it: checkpoints every --checkpoint-every steps, --resume, a
stop on SIGINT/SIGTERM that saves), on this project's data path (BatchLoader:
BOS-aligned windows of the prepared tokens, seeded order). What trains:
  - the bank (`--slots` / `--density`), or LaVE-style tables on alternate layers
    (`--memory lave`), or none (`--memory none`), with its own rates for the tables
    and the routers, and this project's table optimisers (exact or lazy, fp32 or bf16);
  - LoRA on every linear layer but the head (`--lora-rank r`, peft), at --lr-lora;
  - the model's own weights at --lr-dense (0: frozen).
Measured before training (the untouched model: the retrofit and LoRA start as the
identity) and after: bits per byte on the data's validation split and, with
--general-data (another corpus prepared with the same tokenizer), on that one: what
the model forgets of general text, and the KL divergence from the untouched model on
it. A knowledge corpus (knowledge-prepare) adds recall and stored bits on its held-out
phrasing; with memory, what its gates do per layer on each corpus (memory_use). The
result goes to --out: retrofit.json, the Trainer's run.json, metrics.jsonl and
summary.json, and the model (save_pretrained; load a bank with
move.api.load_retrofitted). A finished run's checkpoints are removed.
"""

import resource
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from move.config import RetrofitRun
from move.errors import UserError
from move.export.hf_models import load_causal_lm
from move.export.retrofit import MEMORY_MODULE, retrofit, retrofit_accounting
from move.export.retrofit_measures import (
    decode_tokens_per_second,
    log_probs,
    measure,
    memory_use,
    untouched_key,
    untouched_measures,
)
from move.export.retrofit_trainable import RetrofitTask, TokenLoss, TrainableRetrofit, train_config
from move.files import RUN_MARKERS, atomic_write_json, check_replaceable
from move.knowledge.corpus import KNOWLEDGE_FILE
from move.knowledge.recall import load_knowledge
from move.readers import read_json
from move.text.prepare import load_prepared
from move.training.trainer import Trainer

SUMMARY = "retrofit.json"
LAYOUT_OF = {"bank": "move", "lave": "lave"}  # --memory -> the retrofit's layout (none: no memory)
MEMORY_USE_TOKENS = 1024  # tokens per corpus for the gates' and memory share's diagnostics (a forward each)


def add_lora(model: nn.Module, rank: int) -> nn.Module:
    """peft LoRA (alpha = 2 x rank) on every linear layer of the model but the head
    (not on the bank's routers); its B starts at zero: the model is unchanged at step 0."""
    import peft  # here: peft is an optional extra

    config = peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules="all-linear",
        exclude_modules=rf".*{MEMORY_MODULE}.*" if hasattr(model, MEMORY_MODULE) else None,  # routers train themselves
        lora_dropout=0.0,
    )
    return peft.get_peft_model(model, config)


def general_corpora(general_data, data) -> dict:
    """{name: corpus}: the first general corpus is "general" (general_bpb, general_kl),
    the others are named by their directory; all with the data's tokenizer."""
    paths = [general_data] if isinstance(general_data, (str, Path)) else list(general_data or [])
    corpora = {}
    for i, path in enumerate(paths):
        name = "general" if i == 0 else Path(path).name
        if name in corpora or name == "val":
            raise UserError(f"two general corpora would both be called {name!r}; rename one directory")
        corpora[name] = load_prepared(path)
        if corpora[name].tokenizer.fingerprint() != data.tokenizer.fingerprint():
            raise UserError(f"{path} was prepared with another tokenizer than {data.directory}")
    return corpora


def train_retrofit(
    model_path,
    data_dir,
    out,
    run: RetrofitRun,
    general_data=None,
    save: bool = True,
    untouched=None,
    resume: bool = False,
    force: bool = False,
) -> dict:
    """general_data: one or more corpora (paths) the model is not trained on;
    untouched: a file that keeps the untouched model's measures for later runs;
    resume: continue the run in `out` from its newest checkpoint (a finished run's
    summary is returned as it is); force: replace the run in `out`.
    -> the summary (retrofit.json), or {"stopped_at": step} when a signal stopped it."""
    run.validate()
    out = Path(out)
    if resume and (out / SUMMARY).is_file():
        return read_json(out / SUMMARY, "retrofit summary")
    if resume and not (out / "run.json").is_file():
        raise UserError(f"{out}: nothing to resume (no run.json)")
    if not (resume or force) and out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; pass --resume to continue its run or --force")
    if force and not resume:
        check_replaceable(out, RUN_MARKERS, "a training run")  # (the Trainer would refuse it after the measures)
    data = load_prepared(data_dir)
    general = general_corpora(general_data, data)
    corpora = {"val": data, **general}
    knowledge = load_knowledge(data_dir) if (Path(data_dir) / KNOWLEDGE_FILE).exists() else None
    references: dict[str, Path] = {}  # the KL references, filled below before training
    # (made now: its loader refuses a bad mixed-in corpus before the model loads and is measured)
    task = RetrofitTask(data, corpora, knowledge, run, references)
    model = load_causal_lm(model_path)
    vocab = model.get_input_embeddings().num_embeddings
    if data.tokenizer.vocab_size > vocab:
        raise UserError(
            f"{data_dir} was prepared with a vocabulary of {data.tokenizer.vocab_size:,} tokens, the model has "
            f"{vocab:,}: prepare it with the model's tokenizer (--tokenizer {model_path})"
        )
    scoring = (run.seq_len, run.eval_tokens, run.batch_size)
    key = untouched_key(model_path, corpora, *scoring)
    untouched_decode = decode_tokens_per_second(model, data.tokenizer.vocab_size)  # nothing added yet
    scorer = TokenLoss(model)
    before = untouched_measures(untouched, key, lambda: measure(scorer, corpora, knowledge, data.tokenizer, *scoring))
    # the untouched next-token distributions, kept on disk while training (vocab x tokens each)
    with tempfile.TemporaryDirectory(prefix="move-kl-") as kept:
        for name, corpus in general.items() if run.kl_tokens else ():
            references[name] = Path(kept) / f"{name}.pt"
            torch.save(log_probs(scorer, corpus, run.seq_len, run.kl_tokens, run.batch_size), references[name])
        torch.manual_seed(run.seed)  # the new parameters' initialisation (LoRA's A) and nothing else
        layout = LAYOUT_OF.get(run.memory)
        if layout:
            retrofit(model, density=run.density, slots=run.slots, layout=layout, layer_start_bias=run.layer_start_bias)
            for table in getattr(model, MEMORY_MODULE).value_tables():
                table.weight.data = table.weight.data.to(getattr(torch, run.bank_dtype))
        trained = add_lora(model, run.lora_rank) if run.lora_rank else model
        net = TrainableRetrofit(trained, run)
        trainer = Trainer(net, task, train_config(run), out, resume=resume, force=force)
        rss_before_training = peak_rss_mb()
        result = trainer.run()
        if "stopped_at" in result:
            return result
        rss_after_training = peak_rss_mb()
        after = task.latest if task.latest is not None else task.evaluate(net)  # (a resume of a finished run)
    summary = {
        "model": Path(model_path).name,
        "data": Path(data_dir).name,
        "general_data": {name: Path(corpus.directory).name for name, corpus in general.items()},
        "run": asdict(run),
        "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad),
        "total_params": sum(p.numel() for p in net.parameters()),
        "before": before,
        "after": after,
        "train_loss_first": trainer.train_losses[0],
        "train_loss_last": trainer.train_losses[-1],
        "cost": {
            "train_seconds": result["train_time_s"],
            "step_seconds": result["train_time_s"] / run.steps,
            # the process's peak resident memory (Linux reports kB) before and after the training loop:
            # the second is the training's peak when it is higher (the model, optimiser state, activations)
            "peak_rss_mb_before_training": rss_before_training,
            "peak_rss_mb": rss_after_training,
            "decode_tok_s_untouched": untouched_decode,
            "decode_tok_s": decode_tokens_per_second(trained, data.tokenizer.vocab_size),
            # each LoRA weight is one multiply-add per token; the memory's FLOPs are in accounting
            "lora_flops_per_token": 2 * sum(p.numel() for n, p in trained.named_parameters() if "lora_" in n),
        },
    }
    if layout:
        summary["accounting"] = retrofit_accounting(model)
        memory = getattr(model, MEMORY_MODULE)
        tables = memory.value_tables()
        summary["cost"]["rows_moved"] = sum(int(t.weight.ne(0).flatten(1).any(1).sum()) for t in tables)
        summary["cost"]["rows"] = sum(t.weight.shape[0] for t in tables)
        summary["rows_moved_most"] = rows_moved_most(tables, data.tokenizer)
        use_args = (run.seq_len, min(run.eval_tokens, MEMORY_USE_TOKENS), run.batch_size)
        summary["memory_use"] = {name: memory_use(memory, net, corpus, *use_args) for name, corpus in corpora.items()}
    if save:  # with LoRA, peft writes the adapter; a bank and the model are written by save_pretrained
        trained.save_pretrained(out)
    atomic_write_json(out / SUMMARY, summary)
    # the finished run is its summary (and the saved model): its checkpoints only served --resume
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return summary


def rows_moved_most(tables, tokenizer, count: int = 20) -> list[dict]:
    """The tokens whose rows moved furthest from their zero start (the L2 norm of the
    row over every table, slot and head), most first: which tokens the memory learnt."""
    norms = sum(t.weight.detach().float().flatten(1).square().sum(1) for t in tables).sqrt()
    top = norms.topk(min(count, norms.numel()))
    return [{"token": tokenizer.decode([i]), "norm": n} for i, n in zip(top.indices.tolist(), top.values.tolist())]


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
