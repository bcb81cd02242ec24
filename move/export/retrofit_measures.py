"""What `move retrofit` measures of a model before and after it learns: facts learnt
(recall, stored bits), forgetting (bits per byte on general text, and the KL
divergence from the untouched model's next-token distribution on it), and cost
(decoding speed with the KV cache), and for memory, what the gates do per layer.

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
from move.model.value_memory import gate_values
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


@torch.no_grad()
def memory_use(memory, scorer, data, seq_len: int, tokens: int, batch: int) -> dict:
    """What a retrofitted model does with its memory on a corpus's first `tokens`
    validation tokens, per memory layer: the mean gate on the model's own values (g0,
    when there is one) and on the memory slots, and the memory share ||v' - v|| / ||v||
    (summed over every position and head): how far the memory moved the values the
    frozen layers read. `memory` is the model's move_memory; hooks read the values
    before and after its mix, and the gates from its routers."""
    width = memory.kv_heads * memory.head_dim
    sums = [dict(g0=0.0, slot=0.0, gates=0, slot_gates=0, moved=0.0, norm=0.0) for _ in memory.routers]
    raw = {}

    def values(output):
        return output[..., -width:].float()  # the values (GPT-2's c_attn gives [q, k, v])

    def gates_of(index):
        def record(_router, _args, logits):
            gates = gate_values(logits.float().unflatten(-1, (memory.kv_heads, -1)))
            slots = gates[..., 1:] if memory.gate_g0 else gates
            if memory.gate_g0:
                sums[index]["g0"] += gates[..., 0].sum().item()
                sums[index]["gates"] += gates[..., 0].numel()
            sums[index]["slot"] += slots.sum().item()
            sums[index]["slot_gates"] += slots.numel()

        return record

    def before_mix(index):
        return lambda _layer, _args, output: raw.__setitem__(index, values(output))

    def after_mix(index):
        def record(_layer, _args, output):
            v = raw.pop(index)
            sums[index]["moved"] += (values(output) - v).square().sum().item()
            sums[index]["norm"] += v.square().sum().item()

        return record

    handles = []
    for index, (router, layer) in enumerate(zip(memory.routers, memory.value_layers)):
        handles.append(router.register_forward_hook(gates_of(index)))
        handles.append(layer.register_forward_hook(before_mix(index), prepend=True))
        handles.append(layer.register_forward_hook(after_mix(index)))
    try:
        for x, _ in eval_windows(data.tokens("val"), seq_len, tokens, batch):
            scorer(x)
    finally:
        for handle in handles:
            handle.remove()
    layers = {}
    for layer, s in zip(memory.memory_layers, sums):
        layers[str(layer)] = {
            **({"g0_mean": s["g0"] / s["gates"]} if memory.gate_g0 else {}),
            "slot_gate_mean": s["slot"] / s["slot_gates"],
            "memory_share": (s["moved"] / max(s["norm"], 1e-30)) ** 0.5,
        }
    return layers


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
