"""What `move retrofit` measures of a model before and after it learns: facts learnt
(recall, stored bits), forgetting (bits per byte on general text, and the KL
divergence from the untouched model's next-token distribution on it), and cost
(decoding speed with the KV cache).

The untouched model's figures are the same for every arm of a study (the added parts
start as the identity), so `--untouched FILE` keeps them: computed once, reused by
every later run whose model, data and evaluation settings match, refused otherwise.
The KL reference (the untouched log-probabilities, vocabulary x tokens) is too big to
keep in a file; it is computed in each run, on --kl-tokens tokens per corpus.
"""

import hashlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from move.errors import UserError
from move.evaluation.bpb import bits_per_byte
from move.files import atomic_write_json
from move.knowledge.recall import recall
from move.readers import read_json
from move.text.loader import eval_windows

RECALL_KEYS = ("recall_accuracy", "knowledge_bits", "chance_accuracy", "facts")


def measure(scorer, corpora: dict, knowledge: dict | None, tokenizer, seq_len: int, tokens: int, batch: int) -> dict:
    """Bits per byte on each corpus's validation split ({name}_bpb), and recall if
    there are facts."""
    out = {}
    for name, data in corpora.items():
        windows = eval_windows(data.tokens("val"), seq_len, tokens, batch)
        out[f"{name}_bpb"] = bits_per_byte(scorer, windows, torch.from_numpy(data.tokenizer.token_bytes()))
    if knowledge is not None:
        result = recall(scorer, tokenizer, knowledge)
        out.update({k: result[k] for k in RECALL_KEYS})
    return out


@torch.no_grad()
def log_probs(scorer, data, seq_len: int, tokens: int, batch: int) -> torch.Tensor:
    """The next-token log-probabilities (tokens, vocab), fp32, on the first `tokens`
    validation tokens (whole windows of seq_len)."""
    rows = [F.log_softmax(scorer(x).float(), dim=-1).flatten(0, 1) for x, _ in eval_windows(
        data.tokens("val"), seq_len, tokens, batch
    )]  # fmt: skip
    return torch.cat(rows)


@torch.no_grad()
def mean_kl(reference: torch.Tensor, scorer, data, seq_len: int, tokens: int, batch: int) -> float:
    """Mean over tokens of KL(untouched || now) in nats: sum_v p0(v) (log p0(v) - log p(v)),
    p0 the untouched model's distribution (`reference`, from log_probs)."""
    now = log_probs(scorer, data, seq_len, tokens, batch)
    return (reference.exp() * (reference - now)).sum(-1).mean().item()


@torch.no_grad()
def decode_tokens_per_second(model, vocab: int, prompt: int = 32, new: int = 64, seed: int = 0) -> float:
    """Greedy decoding with the KV cache (generate), batch 1: new tokens per second,
    after one untimed warm-up call."""
    ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    ids = ids.to(device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, min_new_tokens=new, max_new_tokens=new)
    was_training = model.training
    model.eval()
    model.generate(input_ids=ids, **{**kwargs, "min_new_tokens": 4, "max_new_tokens": 4})
    started = time.perf_counter()
    model.generate(input_ids=ids, **kwargs)
    seconds = time.perf_counter() - started
    model.train(was_training)
    return new / seconds


def untouched_key(model_path, corpora: dict, seq_len: int, tokens: int, batch: int) -> dict:
    """What the untouched figures depend on: the model file (name and size) and each
    corpus's validation split and tokenizer (their recorded hashes), and how they are scored."""
    model_path = Path(model_path)
    size = model_path.stat().st_size if model_path.is_file() else sum(
        f.stat().st_size for f in model_path.rglob("*") if f.is_file()
    )  # fmt: skip
    data = {
        name: hashlib.sha256(
            (corpus.manifest["tokenizer_sha256"] + corpus.manifest["splits"]["val"]["sha256"]).encode()
        ).hexdigest()
        for name, corpus in corpora.items()
    }
    return {"model": model_path.name, "model_bytes": size, "data": data, "seq_len": seq_len, "eval_tokens": tokens,
            "batch_size": batch}  # fmt: skip


def untouched_measures(path, key: dict, compute) -> dict:
    """The untouched model's measures from `path` when its key matches, else
    compute() and keep them there (a file with another key is refused, not replaced)."""
    if path is None:
        return compute()
    path = Path(path)
    if path.exists():
        stored = read_json(path, "untouched measures")
        if not isinstance(stored, dict) or stored.get("key") != key:
            raise UserError(f"{path} holds the untouched figures of another model, data or setting; give another file")
        return stored["measures"]
    measures = compute()
    atomic_write_json(path, {"key": key, "measures": measures})
    return measures
