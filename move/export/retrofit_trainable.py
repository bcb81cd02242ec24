"""A retrofitted Hugging Face model as this project's Trainer trains models.

The Trainer (move/training/trainer.py) trains any module whose forward(x, targets)
returns the loss and that carries a serialisable `config`, with a task that gives
its batches and evaluation. Here:
  - TrainableRetrofit wraps the model (its bank, LoRA or neither): it freezes what the
    run does not train, builds the optimisers of the parts that do (the Trainer's
    Optimizers asks it: each part has its own rate), and its state_dict holds the
    trained parameters only, so a checkpoint of a frozen 135M model with a bank holds
    the bank and its routers (the frozen weights are the model file's);
  - RetrofitTask gives the Trainer this project's batches of the prepared data (and of
    a mixed-in corpus) and, as its evaluation, the retrofit's measures: bits per byte
    on every corpus, recall and stored bits on facts, KL from the untouched model.
What the Trainer adds: checkpoints and exact resume, a stop on SIGINT/SIGTERM that
saves, the guard against non-finite losses, metrics.jsonl, summary.json, the loss curve.
"""

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from move.config import OptimConfig, RetrofitRun, TrainConfig
from move.device import evaluating
from move.export.retrofit import MEMORY_MODULE
from move.export.retrofit_measures import mean_kl, measure
from move.text.loader import training_loader
from move.text.prepare import load_prepared
from move.training.row_adam import RowAdam
from move.training.table_adamw import TableAdamW


class TokenLoss(nn.Module):
    """A causal LM as this project's trainer and evaluators call their models:
    model(x) -> logits, model(x, targets) -> mean nats over the targets >= 0,
    model(x, targets, reduction='none') -> per-token nats (ignored targets: 0)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, targets=None, reduction: str = "mean"):
        logits = self.model(input_ids=x).logits.float()
        if targets is None:
            return logits
        nats = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
        return nats.view_as(targets) if reduction == "none" else nats.sum() / (targets >= 0).sum()


def part_of(name: str) -> str:
    """Which part the parameter `name` of a retrofitted (and maybe peft-wrapped) model
    belongs to: memory (the bank or tables, and the routers), lora, or dense (the model's own)."""
    if MEMORY_MODULE in name:
        return "memory"
    return "lora" if "lora_" in name else "dense"


def trains(name: str, run: RetrofitRun) -> bool:
    """Whether the parameter `name` trains in this run (memory exists only when the run adds it)."""
    return {"memory": True, "lora": run.lora_rank > 0, "dense": run.lr_dense > 0}[part_of(name)]


class TrainableRetrofit(TokenLoss):
    kind = "retrofit"  # the checkpoint header's model kind

    def __init__(self, model: nn.Module, run: RetrofitRun):
        super().__init__(model)
        self.config = run
        for name, p in model.named_parameters():
            p.requires_grad_(trains(name, run))

    def build_optimizers(self, oc: OptimConfig) -> list[torch.optim.Optimizer]:
        """Each trained part with its optimiser and rate: AdamW for the dense weights and
        for LoRA; for the memory, this project's table optimisers (fp32 Adam moments
        whatever the tables' dtype; lazy: only the rows a step touched) and AdamW for
        the routers. oc gives the weight decay of the AdamWs (the retrofit's: 0)."""
        run, named = self.config, list(self.model.named_parameters())
        adamw = dict(weight_decay=oc.weight_decay)
        found = []
        if run.lr_dense > 0:
            found.append(torch.optim.AdamW([p for n, p in named if part_of(n) == "dense"], lr=run.lr_dense, **adamw))
        if run.lora_rank:
            found.append(torch.optim.AdamW([p for n, p in named if part_of(n) == "lora"], lr=run.lr_lora, **adamw))
        memory = getattr(self.model, MEMORY_MODULE, None)
        if memory is not None:
            tables = memory.value_tables()
            weights = [t.weight for t in tables]
            found.append(
                RowAdam(weights, {id(t.weight): t for t in tables}, lr=run.lr_memory)
                if run.bank_optimizer == "lazy"
                else TableAdamW(weights, lr=run.lr_memory)
            )
            found.append(torch.optim.AdamW(memory.routers.parameters(), lr=run.lr_router, **adamw))
        return found

    def state_dict(self, *args, **kwargs) -> dict:
        """The trained parameters only (a checkpoint's weights): the rest is the model file."""
        trained = {name for name, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in super().state_dict(*args, **kwargs).items() if k in trained}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load what state_dict() wrote: every trained parameter, nothing else (strict),
        the frozen weights left as the model file made them."""
        if strict:
            expected = set(self.state_dict())
            if set(state_dict) != expected:
                wrong = sorted(set(state_dict) ^ expected)[0]
                raise RuntimeError(f"the state dict does not hold exactly the trained parameters ({wrong})")
        return super().load_state_dict(state_dict, strict=False, assign=assign)


def train_config(run: RetrofitRun) -> TrainConfig:
    """The Trainer's settings for a retrofit run: each part's constant rate (no warm-up,
    no decay, no clipping: the rates the sweep chose), one evaluation (the measures)
    at the end, checkpoints every run.checkpoint_every steps (the newest kept)."""
    return TrainConfig(
        steps=run.steps,
        batch_size=run.batch_size,
        eval_every=run.steps,
        eval_tokens=run.eval_tokens,
        checkpoint_every=run.checkpoint_every,
        keep_checkpoints=1,
        seed=run.seed,
        device="cpu",
        optim=OptimConfig(warmup_steps=0, warmdown_frac=0.0, grad_clip=0.0, weight_decay=0.0),
    ).validate()


def training_batches(data, run: RetrofitRun):
    """The data's batches, with round(batch_size x mix_fraction) rows of --mix-data in each."""
    mixed_in = load_prepared(run.mix_data) if run.mix_data else None
    return training_loader(
        data, run.batch_size, run.seq_len, run.seed, mixed_in=mixed_in, mix_fraction=run.mix_fraction
    )


class RetrofitTask:
    """The Trainer's task for a retrofit: this project's batches of the data, and as
    evaluation the measures of the model now (kept as `latest`).

    corpora: {"val": the data, name: each general corpus}; references: {general corpus
    name: file of the untouched model's log-probabilities}, read at each evaluation
    (empty: no KL). The loader is built here: a bad mixed-in corpus is refused at once."""

    def __init__(self, data, corpora: dict, knowledge, run: RetrofitRun, references: dict[str, Path]):
        self.data, self.corpora, self.knowledge, self.run = data, corpora, knowledge, run
        self.references = references
        self.loader = training_batches(data, run)
        self.tokens_per_example = run.seq_len
        self.latest: dict | None = None

    def evaluate(self, model) -> dict:
        run = self.run
        with evaluating(model):
            scores = measure(
                model, self.corpora, self.knowledge, self.data.tokenizer, run.seq_len, run.eval_tokens, run.batch_size
            )
            for name, path in self.references.items():
                reference = torch.load(path, weights_only=True)
                scores[f"{name}_kl"] = mean_kl(
                    reference, model, self.corpora[name], run.seq_len, run.kl_tokens, run.batch_size
                )
        self.latest = scores
        return scores

    def describe(self) -> dict:
        return {
            "kind": "retrofit",
            "data": str(self.data.directory),
            "corpora": {name: str(corpus.directory) for name, corpus in self.corpora.items()},
            "mix_data": self.run.mix_data,
        }
