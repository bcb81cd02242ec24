"""Parameters by group and FLOPs per token, in one place.

FLOP convention (nanochat / PaLM): a matmul with a weight of N parameters costs
2N FLOPs per token forward and 6N forward+backward. Lookups (token embedding,
value-memory tables) cost nothing. Attention scores and the attention-weighted
sum are counted over the full context T (not halved for causality). Element-wise
work (norms, rotary, gates' sigmoid, residual adds) is ignored.
"""

from move.config import ModelConfig

PARAM_GROUPS = ("token_embedding", "lm_head", "transformer_matrices", "routers", "value_memory")


def param_group(name: str) -> str:
    """Which accounting group a parameter name belongs to."""
    if name.startswith("wte."):
        return "token_embedding"
    if name.startswith("lm_head."):
        return "lm_head"
    if name.startswith("bank.") or ".value_memory.table." in name:
        return "value_memory"
    if ".value_memory.router." in name:
        return "routers"
    return "transformer_matrices"


def count_params(model) -> dict[str, int]:
    """Parameters by group, of the whole model: a table row-sharded across processes
    counts all its rows, not only this rank's."""
    counts = dict.fromkeys(PARAM_GROUPS, 0)
    tables = model.value_tables() if hasattr(model, "value_tables") else []
    full_rows = {id(t.weight): t.shard.num_rows for t in tables if t.shard is not None}
    for name, p in model.named_parameters():
        counts[param_group(name)] += full_rows[id(p)] * p[0].numel() if id(p) in full_rows else p.numel()
    counts["total"] = sum(counts[g] for g in PARAM_GROUPS)
    return counts


def forward_flops_per_token(config: ModelConfig, params: dict[str, int], context: int | None = None) -> dict[str, int]:
    """Forward FLOPs per token by component, for a context of `context` tokens
    (default: seq_len). `params` is the output of count_params."""
    T = context or config.seq_len
    c = config
    n_memory_layers = len(c.memory_layers())
    if c.attention == "mla":
        attention = c.n_layer * 2 * T * c.n_head * ((c.head_dim + c.rope_width) + c.head_dim)
    else:
        attention = c.n_layer * 2 * T * c.n_head * (c.head_dim + c.head_dim)
    flops = {
        "transformer_matrices": 2 * params["transformer_matrices"],
        "lm_head": 2 * params["lm_head"],
        "routers": 2 * params["routers"],
        # the slot mix is a (1 x S) @ (S x width) matmul per head: 2 * S * width per layer
        "value_mixing": n_memory_layers * 2 * c.n_slots * c.memory_width,
        "attention": attention,
    }
    flops["total"] = sum(flops.values())
    return flops


def summarize(model) -> dict:
    """Parameters by group and FLOPs per token: the accounting every run records.
    Models other than the GPT (image tokenizer, classifier) report their size only."""
    if not isinstance(model.config, ModelConfig):
        return {"params": {"total": sum(p.numel() for p in model.parameters())}}
    params = count_params(model)
    flops = forward_flops_per_token(model.config, params)
    return {
        "params": params,
        "forward_flops_per_token": flops,
        "training_flops_per_token": 3 * flops["total"],
    }
