"""`move retrofit MODEL --data DIR --out DIR`: retrofit a pretrained causal LM with a
MoVE bank and train it on a prepared corpus, in one command.

The loop is this project's data path (BatchLoader: BOS-aligned windows of the
prepared tokens, seeded order; bits_per_byte on the validation split) around a
Hugging Face model; the project's Trainer builds its own GPT and is not used. The
memory has its own learning rates (bank, routers); the dense weights are frozen
unless --lr-dense is given. Validation bits per byte are measured before training
(the model untouched: the retrofit changes nothing at step 0) and after, and the
result is saved with save_pretrained (load it back with move.api.load_retrofitted).
"""

import json
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
from move.progress import progress
from move.text.loader import BatchLoader, eval_windows
from move.text.prepare import load_prepared
from move.training.row_adam import RowAdam
from move.training.table_adamw import TableAdamW

SUMMARY = "retrofit.json"


class TokenLoss(nn.Module):
    """A causal LM as bits_per_byte calls this project's models: model(x, targets,
    reduction='none') -> per-token nats (targets < 0 ignored)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, targets, reduction: str = "none"):
        logits = self.model(input_ids=x).logits.float()
        nats = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
        return nats.view_as(targets) if reduction == "none" else nats.sum() / (targets >= 0).sum()


def train_retrofit(model_path, data_dir, out, run: RetrofitRun) -> dict:
    run.validate()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose another --out")
    data = load_prepared(data_dir)
    model = load_causal_lm(model_path)
    vocab = model.get_input_embeddings().num_embeddings
    if data.tokenizer.vocab_size > vocab:
        raise UserError(
            f"{data_dir} was prepared with a vocabulary of {data.tokenizer.vocab_size:,} tokens, the model has "
            f"{vocab:,}: prepare it with the model's tokenizer (move prepare --tokenizer {model_path})"
        )
    torch.manual_seed(run.seed)
    retrofit(model, density=run.density)
    memory = getattr(model, MEMORY_MODULE)
    bank = memory.bank
    bank.weight.data = bank.weight.data.to(getattr(torch, run.bank_dtype))
    dense = [p for n, p in model.named_parameters() if not n.startswith(f"{MEMORY_MODULE}.")]
    for p in dense:
        p.requires_grad_(run.lr_dense > 0)
    # the bank as in this project's training: fp32 Adam moments whatever its dtype, and
    # the lazy optimiser reading only the rows the step touched (the fast path's buffer)
    optimizers = [
        RowAdam([bank.weight], {id(bank.weight): bank}, lr=run.lr_memory)
        if run.bank_optimizer == "lazy"
        else TableAdamW([bank.weight], lr=run.lr_memory),
        torch.optim.AdamW(memory.routers.parameters(), lr=run.lr_router, weight_decay=0.0),
    ]
    if run.lr_dense > 0:
        optimizers.append(torch.optim.AdamW(dense, lr=run.lr_dense, weight_decay=0.0))
    scorer = TokenLoss(model)
    token_bytes = torch.from_numpy(data.tokenizer.token_bytes())
    val = data.tokens("val")

    def val_bpb() -> float:
        return bits_per_byte(scorer, eval_windows(val, run.seq_len, run.eval_tokens, run.batch_size), token_bytes)

    before = val_bpb()
    loader = BatchLoader(data.tokens("train"), data.tokenizer.bos_id, run.batch_size, run.seq_len, run.seed)
    losses = []
    model.train()
    for _ in progress(range(run.steps), "retrofit training", unit="step"):
        x, y = loader.next_batch()
        loss = scorer(x, y, reduction="mean")
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        bank.zero_touched_grad()  # keeps the bank's gradient buffer: only the touched rows are zeroed
        for optimizer in optimizers[1:]:
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    summary = {
        "model": Path(model_path).name,
        "data": Path(data_dir).name,
        "run": asdict(run),
        "val_bpb_before": before,
        "val_bpb_after": val_bpb(),
        "train_loss_first": losses[0],
        "train_loss_last": losses[-1],
        "accounting": retrofit_accounting(model),
    }
    model.save_pretrained(out)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary
