"""Parameters by group and FLOPs per token, in one place.

FLOP convention (nanochat / PaLM): a matmul with a weight of N parameters costs
2N FLOPs per token forward and 6N forward+backward. Lookups (token embedding,
value-memory tables) cost nothing. Attention scores and the attention-weighted
sum are counted over the full context T (not halved for causality). Element-wise
work (norms, rotary, gates' sigmoid, residual adds) is ignored.
"""

from move.config import ModelConfig

PARAM_GROUPS = ("token_embedding", "lm_head", "transformer_matrices", "routers", "memory_control", "value_memory")
# memory parameters that are neither tables nor matrices: the other designs' bigram
# scales, value-residual weights, product sub-keys (memory_designs.py), and MoVE's
# gate biases of the layer-assigned start and content-reading gate weights (value_memory.py)
MEMORY_CONTROL_NAMES = ("scales", "lambdas", "sub_keys", "gate_bias", "slot_gate")


def param_group(name: str) -> str:
    """Which accounting group a parameter name belongs to: value_memory holds every
    token- or key-indexed table (MoVE's bank, LaVE's, bigram and product-key tables),
    routers the matrices that address memory (gates, the product-key query)."""
    if name.startswith("wte."):
        return "token_embedding"
    if name.startswith("lm_head."):
        return "lm_head"
    if name.startswith("bank.") or name.endswith(".table.weight"):
        return "value_memory"
    if ".value_memory.router." in name or name.endswith(".mlp.query.weight"):
        return "routers"
    if name.rsplit(".", 1)[-1] in MEMORY_CONTROL_NAMES:
        return "memory_control"
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
    if c.attention == "mla":
        attention = c.n_layer * 2 * T * c.n_head * ((c.head_dim + c.rope_width) + c.head_dim)
    else:
        attention = c.n_layer * 2 * T * c.n_head * (c.head_dim + c.head_dim)
    flops = {
        "transformer_matrices": 2 * params["transformer_matrices"],
        "lm_head": 2 * params["lm_head"],
        "routers": 2 * params["routers"],
        "value_mixing": memory_mixing_flops(c),
        "memory_addressing": memory_addressing_flops(c),
        "attention": attention,
    }
    flops["total"] = sum(flops.values())
    return flops


def memory_mixing_flops(c: ModelConfig) -> int:
    """Forward FLOPs per token of the matmuls that mix memory into the model. The
    bigram's scaled add and the value residual's a v + b v_1 are element-wise work,
    not counted (the convention above; a multiply-add per channel and layer)."""
    if c.value_memory in ("move", "lave"):
        # the slot mix is a (1 x S) @ (S x width) matmul per head: 2 * S * width per layer
        return len(c.memory_layers()) * 2 * c.n_slots * c.memory_width
    if c.value_memory == "pkm":  # the softmax-weighted sum of k rows per head, (1 x k) @ (k x d)
        return 2 * c.pkm_heads * c.pkm_topk * c.n_embd
    return 0


def memory_addressing_flops(c: ModelConfig) -> int:
    """Forward FLOPs per token of product-key addressing beyond its query matmul: the
    scores of both query halves against their n_keys sub-keys (the k x k candidate
    sums, top-k and softmax are element-wise work). 0 for the designs addressed by
    token ids."""
    if c.value_memory != "pkm":
        return 0
    return c.pkm_heads * 2 * 2 * c.pkm_keys * c.head_dim


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
