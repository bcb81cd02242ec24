"""`move retrofit MODEL --data DIR --out DIR`: teach a pretrained causal LM a corpus
with a MoVE bank, LoRA, full fine-tuning or a mix of them, in one command.

The loop is this project's data path (BatchLoader: BOS-aligned windows of the
prepared tokens, seeded order; bits_per_byte) around a Hugging Face model; the
project's Trainer builds its own GPT and is not used. What trains:
  - the bank (`--slots` / `--density`; `--memory none` for none), with its own rates
    for the bank and the routers, and this project's bank optimisers (exact or lazy,
    fp32 or bf16);
  - LoRA on every linear layer but the head (`--lora-rank r`, peft), at --lr-lora;
  - the model's own weights at --lr-dense (0: frozen).
Measured before training (the untouched model: the retrofit and LoRA start as the
identity) and after: bits per byte on the data's validation split and, with
--general-data (another corpus prepared with the same tokenizer), on that one: what
the model forgets of general text. A knowledge corpus (knowledge-prepare) adds recall
and stored bits on its held-out phrasing. The result goes to --out: retrofit.json,
and the model (save_pretrained; load a bank with move.api.load_retrofitted).
"""

import json
import resource
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from move.config import RetrofitRun
from move.errors import UserError
from move.evaluation.bpb import bits_per_byte
from move.export.hf_models import load_causal_lm
from move.export.retrofit import MEMORY_MODULE, retrofit, retrofit_accounting
from move.knowledge.corpus import KNOWLEDGE_FILE
from move.knowledge.recall import load_knowledge, recall
from move.progress import progress
from move.text.loader import BatchLoader, eval_windows
from move.text.prepare import load_prepared
from move.training.row_adam import RowAdam
from move.training.table_adamw import TableAdamW

SUMMARY = "retrofit.json"


class TokenLoss(nn.Module):
    """A causal LM as this project's evaluators call its models: model(x) -> logits,
    model(x, targets, reduction='none') -> per-token nats (targets < 0 ignored)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, targets=None, reduction: str = "none"):
        logits = self.model(input_ids=x).logits.float()
        if targets is None:
            return logits
        nats = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
        return nats.view_as(targets) if reduction == "none" else nats.sum() / (targets >= 0).sum()


def optimizers_for(model: nn.Module, run: RetrofitRun) -> list[torch.optim.Optimizer]:
    """Freeze what does not train and give each trained part its optimiser."""
    for p in model.parameters():
        p.requires_grad_(run.lr_dense > 0)
    found = []
    if run.lr_dense > 0:
        dense = [p for n, p in model.named_parameters() if MEMORY_MODULE not in n and "lora_" not in n]
        found.append(torch.optim.AdamW(dense, lr=run.lr_dense, weight_decay=0.0))
    if run.lora_rank:
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        for p in lora:
            p.requires_grad_(True)
        found.append(torch.optim.AdamW(lora, lr=run.lr_lora, weight_decay=0.0))
    memory = getattr(model, MEMORY_MODULE, None)
    if memory is not None:
        bank = memory.bank
        for p in memory.parameters():
            p.requires_grad_(True)
        # fp32 Adam moments whatever the bank's dtype; lazy: only the rows a step touched
        found.append(
            RowAdam([bank.weight], {id(bank.weight): bank}, lr=run.lr_memory)
            if run.bank_optimizer == "lazy"
            else TableAdamW([bank.weight], lr=run.lr_memory)
        )
        found.append(torch.optim.AdamW(memory.routers.parameters(), lr=run.lr_router, weight_decay=0.0))
    if not found:
        raise UserError("nothing to train: give a bank (--memory bank), --lora-rank or --lr-dense")
    return found


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


def measure(scorer: TokenLoss, run: RetrofitRun, corpora: dict, knowledge: dict | None, tokenizer) -> dict:
    """Bits per byte on each corpus's validation split, and recall if there are facts."""
    out = {}
    for name, data in corpora.items():
        windows = eval_windows(data.tokens("val"), run.seq_len, run.eval_tokens, run.batch_size)
        out[f"{name}_bpb"] = bits_per_byte(scorer, windows, torch.from_numpy(data.tokenizer.token_bytes()))
    if knowledge is not None:
        result = recall(scorer, tokenizer, knowledge)
        out.update({k: result[k] for k in ("recall_accuracy", "knowledge_bits", "chance_accuracy", "facts")})
    return out


def train_retrofit(model_path, data_dir, out, run: RetrofitRun, general_data=None, save: bool = True) -> dict:
    run.validate()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose another --out")
    data = load_prepared(data_dir)
    corpora = {"val": data}
    if general_data:
        corpora["general"] = load_prepared(general_data)
        if corpora["general"].tokenizer.fingerprint() != data.tokenizer.fingerprint():
            raise UserError(f"{general_data} was prepared with another tokenizer than {data_dir}")
    knowledge = load_knowledge(data_dir) if (Path(data_dir) / KNOWLEDGE_FILE).exists() else None
    model = load_causal_lm(model_path)
    vocab = model.get_input_embeddings().num_embeddings
    if data.tokenizer.vocab_size > vocab:
        raise UserError(
            f"{data_dir} was prepared with a vocabulary of {data.tokenizer.vocab_size:,} tokens, the model has "
            f"{vocab:,}: prepare it with the model's tokenizer (--tokenizer {model_path})"
        )
    torch.manual_seed(run.seed)  # the new parameters' initialisation (LoRA's A) and nothing else
    if run.memory == "bank":
        retrofit(model, density=run.density, slots=run.slots)
        bank = getattr(model, MEMORY_MODULE).bank
        bank.weight.data = bank.weight.data.to(getattr(torch, run.bank_dtype))
    trained = add_lora(model, run.lora_rank) if run.lora_rank else model
    scorer = TokenLoss(trained)
    before = measure(scorer, run, corpora, knowledge, data.tokenizer)
    optimizers = optimizers_for(trained, run)
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    loader = BatchLoader(data.tokens("train"), data.tokenizer.bos_id, run.batch_size, run.seq_len, run.seed)
    losses = []
    trained.train()
    started = time.perf_counter()
    for _ in progress(range(run.steps), "retrofit training", unit="step"):
        x, y = loader.next_batch()
        loss = scorer(x, y, reduction="mean")
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        trained.zero_grad(set_to_none=True)  # (a bank's next backward starts a fresh buffer and row list)
        losses.append(loss.item())
    train_seconds = time.perf_counter() - started
    trained.eval()
    summary = {
        "model": Path(model_path).name,
        "data": Path(data_dir).name,
        "run": asdict(run),
        "trainable_params": trainable,
        "before": before,
        "after": measure(scorer, run, corpora, knowledge, data.tokenizer),
        "train_loss_first": losses[0],
        "train_loss_last": losses[-1],
        "train_seconds": train_seconds,
        "step_seconds": train_seconds / run.steps,
        # the process's peak resident memory so far (Linux reports kB): model, optimiser and evaluations
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if run.memory == "bank":
        summary["accounting"] = retrofit_accounting(model)
    out.mkdir(parents=True, exist_ok=True)
    if save:  # with LoRA, peft writes the adapter; a bank and the model are written by save_pretrained
        trained.save_pretrained(out)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary
