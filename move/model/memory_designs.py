"""Other ways to give a transformer token-indexed memory, on the same GPT as MoVE.

The GPT builds one of these when config.value_memory names it. Their tables are
ValueTables (the same optimiser group and learning rate as MoVE's bank, the same fast
path: no table-sized gradient per step, lazy Adam, row sharding), and the density k
sizes them to MoVE xk's value-memory parameters (ModelConfig.memory_budget), so the
designs compare at equal extra parameters. Initial values live in GPT.init_weights.

- bigram: hashed bigram embeddings, as modded-nanogpt's record of January 2026 used
  them (KellerJordan/modded-nanogpt PR #201; nanochat tried the same as "Engram-lite";
  DeepSeek's Engram is the full form, with multi-head hashing of 2- and 3-grams and a
  context gate). A zero-initialised table E of K rows x d_model, indexed by a hash of
  (previous token, token), is added to the residual stream before every block with a
  learned per-layer scale initialised to 0.1:
      x <- x + s_l * E[h(x_{t-1}, x_t)],   h = ((36313 x_t) XOR (27191 x_{t-1})) mod (K - 1),
  and h = K - 1 at a sequence's first position. Simplified: modded-nanogpt also mixes
  the first hidden state back into every layer (its x0_lambdas), which is not memory
  and is left out; the hash runs in int64 here, not int32. K = MoVE xk's parameters
  / d_model (5 x vocabulary in the record).
- pkm: a product-key memory layer (Lample et al. 2019, "Large Memory Layers with
  Product Keys"; Berges et al. 2024, "Memory Layers at Scale") in place of the MLP of
  the middle layer. Per head h: a query [q1, q2] = Linear(x) (two halves of head_dim),
  sub-key sets K1, K2 of n_keys each, the top-k of q1.K1 and of q2.K2, the top-k of
  their k x k sums (rows i * n_keys + j of the value table), softmax weights over
  those k scores, and out = sum_h sum_i w_{h,i} V[row_{h,i}] from a table V of
  n_keys^2 rows x d_model. Simplified: the query's BatchNorm is a parameter-free
  RMSNorm of each half (no batch statistics, so decoding one token computes what a
  full forward does), the 2024 paper's silu-gated output projection (memory+) is
  left out, and there is one memory layer (so the 2024 paper's value table shared
  across memory layers does not arise). Hyper-parameters: pkm_heads 4 (the paper's
  4); pkm_topk 8 (the paper's 32, lowered so a CPU step reads 32 rows per token, not
  128); n_keys^2 rows ~ MoVE xk's parameters / d_model.
- value_residual: ResFormer (Zhou et al. 2024, "Value Residual Learning for
  Alleviating Attention Concentration in Transformers"): every layer after the first
  mixes the first layer's values into its own, v_l <- a_l v_l + b_l v_1, with learned
  scalars initialised to ResFormer's 0.5 and 0.5. No table: the cheapest value
  memory there is, a lower bound for the others.
"""

import torch
import torch.nn as nn

from move.config import ModelConfig
from move.model.layers import rms_norm
from move.model.value_tables import ValueTable

# modded-nanogpt's multipliers: they spread (previous, current) over the table
BIGRAM_MULTIPLIERS = (36313, 27191)
BIGRAM_SCALE_INIT = 0.1
VALUE_RESIDUAL_INIT = 0.5


def previous_tokens(
    idx: torch.Tensor, before: torch.Tensor | None = None, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """The id of each token's predecessor, -1 at a sequence's first position.
    idx (B, T); before (B,): the token preceding idx[:, 0] when decoding continues a
    cached sequence; positions (B, T): each token's position in its own row (left-padded
    batches), whose zeros mark first tokens."""
    first = torch.full_like(idx[:, :1], -1) if before is None else before[:, None]
    previous = torch.cat([first, idx[:, :-1]], dim=1)
    if positions is not None:
        previous = torch.where(positions == 0, -1, previous)
    return previous


def bigram_hash(idx: torch.Tensor, previous: torch.Tensor, rows: int) -> torch.Tensor:
    """Row of each (previous, token) pair in a table of `rows` rows; the last row is
    reserved for tokens without a predecessor (previous == -1)."""
    current_mult, previous_mult = BIGRAM_MULTIPLIERS
    hashed = torch.bitwise_xor(current_mult * idx, previous_mult * previous) % (rows - 1)
    return torch.where(previous < 0, rows - 1, hashed)


class BigramHashEmbedding(nn.Module):
    """table: (K, 1, 1, d_model) zero-initialised; scales: one per layer."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.rows = config.bigram_rows
        self.table = ValueTable(self.rows, 1, 1, config.n_embd, zero_init=True)
        self.scales = nn.Parameter(torch.empty(config.n_layer))

    def forward(self, idx: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """-> the bigram embeddings (B, T, d_model) that every block adds, scaled."""
        return self.table.lookup(bigram_hash(idx, previous, self.rows)).flatten(-3)


class ProductKeyMemory(nn.Module):
    """A product-key memory layer: x (B, T, d_model) -> (B, T, d_model)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.heads, self.topk, self.n_keys = config.pkm_heads, config.pkm_topk, config.pkm_keys
        self.key_dim = config.head_dim  # the width of one half of a query
        self.query = nn.Linear(config.n_embd, self.heads * 2 * self.key_dim, bias=False)
        self.sub_keys = nn.Parameter(torch.empty(self.heads, 2, self.n_keys, self.key_dim))
        self.table = ValueTable(self.n_keys**2, 1, 1, config.n_embd)

    def address(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, d) -> the rows each head reads (B, T, H, k) and their weights."""
        B, T, _ = x.shape
        q = rms_norm(self.query(x).view(B, T, self.heads, 2, self.key_dim))
        scores = torch.einsum("bthcd,hcnd->bthcn", q, self.sub_keys.to(q.dtype))  # (B, T, H, 2, n_keys)
        half_scores, half_ids = scores.topk(self.topk, dim=-1)
        # the k x k candidates: score s1_i + s2_j, row i * n_keys + j
        sums = half_scores[..., 0, :, None] + half_scores[..., 1, None, :]
        candidates = half_ids[..., 0, :, None] * self.n_keys + half_ids[..., 1, None, :]
        best, chosen = sums.flatten(-2).topk(self.topk, dim=-1)
        return candidates.flatten(-2).gather(-1, chosen), torch.softmax(best.float(), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, weights = self.address(x)
        values = self.table.lookup(rows).flatten(-3)  # (B, T, H, k, d)
        read = weights.unsqueeze(-2).to(values.dtype) @ values  # (B, T, H, 1, d)
        return read.squeeze(-2).sum(-2).to(x.dtype)


class ValueResidual(nn.Module):
    """v_l <- a v_l + b v_1 for one layer l > 0."""

    def __init__(self):
        super().__init__()
        self.lambdas = nn.Parameter(torch.empty(2))

    def forward(self, v: torch.Tensor, first_values: torch.Tensor) -> torch.Tensor:
        a, b = self.lambdas.to(v.dtype)
        return a * v + b * first_values
