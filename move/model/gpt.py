"""The GPT: nanochat-style decoder with swappable value memory.

token embedding -> RMSNorm -> L x [x + attn(norm(x)), x + mlp(norm(x))] -> norm ->
untied lm_head -> optional tanh soft-cap. No biases, RoPE, QK-norm, relu^2.
MoVE's global bank is looked up once here and handed to every layer.
"""

import hashlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from move.config import ModelConfig
from move.errors import ConfigError, TokenRangeError
from move.model.attention import CausalSelfAttention, MultiHeadLatentAttention
from move.model.layers import MLP, KVCache, StaticKVCache, rms_norm, rotary_tables
from move.model.memory_designs import (
    BIGRAM_SCALE_INIT,
    VALUE_RESIDUAL_INIT,
    BigramHashEmbedding,
    ProductKeyMemory,
    ValueResidual,
    previous_tokens,
)
from move.model.value_memory import LayerValueMemory, MemoryInputs
from move.model.value_tables import GRAD_MODES, Slots, ValueTable


def _init_named(weight: torch.Tensor, init_seed: int, name: str, law: str, scale: float) -> None:
    """Fill `weight` with U(-scale, scale) or N(0, scale^2) drawn from a CPU generator
    seeded by a hash of (init_seed, module name): the same values on any device."""
    if weight.is_meta:
        return
    digest = hashlib.sha256(f"{init_seed}/{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    values = torch.empty(weight.shape, dtype=weight.dtype)
    if law == "uniform":
        values.uniform_(-scale, scale, generator=generator)
    else:
        values.normal_(0.0, scale, generator=generator)
    weight.copy_(values)


# A table's rows are drawn in blocks of this many, each block from a generator of its
# own: a rank holding rows [a, b) of a sharded table draws only the blocks that cover
# them and gets exactly the rows one process would draw for the whole table.
ROW_BLOCK = 256


def _init_rows(weight: torch.Tensor, init_seed: int, name: str, scale: float, first_row: int = 0) -> None:
    """U(-scale, scale) rows first_row .. first_row + len(weight) of table `name`,
    block by block (ROW_BLOCK), each block seeded by a hash of (init_seed, name, block)."""
    if weight.is_meta:
        return
    rows = weight.shape[0]
    for block in range(first_row // ROW_BLOCK, -(-(first_row + rows) // ROW_BLOCK)):
        digest = hashlib.sha256(f"{init_seed}/{name}/rows{block}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        values = torch.empty((ROW_BLOCK, *weight.shape[1:]), dtype=torch.float32).uniform_(
            -scale, scale, generator=generator
        )
        begin, end = max(block * ROW_BLOCK, first_row), min((block + 1) * ROW_BLOCK, first_row + rows)
        weight[begin - first_row : end - first_row].copy_(values[begin - block * ROW_BLOCK : end - block * ROW_BLOCK])


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        attention = MultiHeadLatentAttention if config.attention == "mla" else CausalSelfAttention
        self.attn = attention(config, layer_idx)
        product_keys = config.value_memory == "pkm" and layer_idx == config.pkm_layer
        self.mlp = ProductKeyMemory(config) if product_keys else MLP(config.n_embd)

    def forward(self, x, memory: MemoryInputs, cos, sin, cache, key_mask=None):
        x = x + self.attn(rms_norm(x), memory, cos, sin, cache, key_mask)
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    kind = "gpt"  # recorded in checkpoints (move.training.checkpoint.model_classes)
    config_class = ModelConfig

    def __init__(self, config: ModelConfig, init_seed: int | None = None):
        super().__init__()
        self.config = config.validate()
        # Drawn before any submodule is built: module constructors consume the global
        # generator differently per variant (a router's Linear draws, a bank does not),
        # so nothing drawn after this point may depend on it. See init_weights.
        if init_seed is None:
            init_seed = int(torch.randint(0, 2**62, (), device="cpu"))
        self.init_seed = init_seed  # kept, so a model built on the meta device can initialise later
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.bank = None
        if config.value_memory == "move":
            heads = config.kv_heads
            self.bank = ValueTable(config.vocab_size, heads, config.n_slots, config.memory_width // heads)
        self.bigram = BigramHashEmbedding(config) if config.value_memory == "bigram" else None
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.rotary_dim = config.rope_width if config.attention == "mla" else config.head_dim
        # built here, not in the first forward: a buffer registered while torch.compile
        # traces the first step changes the module, and the second step recompiles. A
        # model built on the meta device (checkpoint loading, sharding) gets its tables
        # when it is materialised or in its first forward.
        # recompute each block's activations in the backward instead of keeping them
        # (torch.utils.checkpoint, non-reentrant: the reentrant form would run the bank's
        # backward once per block instead of once after all of them)
        self.activation_checkpointing = False
        self._rotary_len = 0
        if not self.wte.weight.is_meta:
            self._rotary(2 * config.seq_len, self.wte.weight.device)
        self.init_weights(init_seed)

    @torch.no_grad()
    def init_weights(self, init_seed: int) -> None:
        """Every initialisation of the model, in one place (nanochat's scheme).

        - wte: N(0, 1); the embedding is RMS-normed right after, so only direction matters.
        - lm_head: N(0, 0.001): near-uniform predictions at step 0.
        - every input-side matrix (q, k, v, MLA down/up projections, MLP c_fc):
          U(-s, s) with s = sqrt(3) / sqrt(fan_in), i.e. std 1/sqrt(fan_in).
        - output projections (attn c_proj, mlp c_proj): zero, so each block starts
          as the identity on the residual stream.
        - value memory tables (MoVE bank, LaVE tables): U(-s, s) with the value
          projection's s = sqrt(3)/sqrt(d_model), so memory and v start on one scale;
          drawn in row blocks (_init_rows), so a row-sharded table initialises only its
          own rows, bit for bit as one process would (x memory_init_scale, 1 by default).
        - routers / gates: zero, so every gate 2*sigmoid(0) is exactly 1.0; with
          router_init_scale s > 0, N(0, s^2/fan_in), so at unit-RMS input the gate
          logits have std ~s: gates near 1 but unequal, which breaks the symmetry
          between the slots of a row (with a zero router they get equal gradients).
          The layer-assigned start (layer_start_bias b > 0) adds a gate bias: 0 for
          g0 and a layer's own slots, -b for the rest (LayerValueMemory.start_gate_bias).
          The content-reading gate's weights u (slot_gate_channels k): N(0, 1/k), so a
          slot of unit-RMS content shifts its logit by ~1; the bank's content starts
          far smaller (the value projection's scale), so gates start near 1.
        - the other memory designs (memory_designs.py): the bigram table zero and its
          per-layer scales 0.1 (modded-nanogpt); product-key sub-keys U(-s, s) with
          s = sqrt(3)/sqrt(key width), its query like any input matrix and its values
          like a value table; value-residual mixing weights 0.5 and 0.5 (ResFormer).

        Pairing: every tensor draws from its own generator, seeded by (init_seed, the
        parameter's name), never from a shared stream. A tensor's initial value thus
        depends only on the seed, its name and its shape, so with one seed standard,
        LaVE and MoVE (and a deeper baseline, for its first layers) start from
        bit-identical shared weights whatever else each variant adds or leaves out.
        """
        s_model = math.sqrt(3) / math.sqrt(self.config.n_embd)
        for name, module in self.named_modules():
            if isinstance(module, ValueTable) and module.zero_init:
                nn.init.zeros_(module.weight)
            elif isinstance(module, ValueTable):
                scale = s_model * self.config.memory_init_scale
                _init_rows(module.weight, init_seed, name, scale, module.shard.start if module.shard else 0)
            elif isinstance(module, BigramHashEmbedding):
                nn.init.constant_(module.scales, BIGRAM_SCALE_INIT)
            elif isinstance(module, ProductKeyMemory):
                _init_named(
                    module.sub_keys, init_seed, f"{name}.sub_keys", "uniform", math.sqrt(3) / math.sqrt(module.key_dim)
                )
            elif isinstance(module, ValueResidual):
                nn.init.constant_(module.lambdas, VALUE_RESIDUAL_INIT)
            elif isinstance(module, LayerValueMemory):
                if module.gate_bias is not None:
                    module.start_gate_bias()
                if module.slot_gate is not None:
                    k = module.slot_gate.shape[1]
                    _init_named(module.slot_gate, init_seed, f"{name}.slot_gate", "normal", 1 / math.sqrt(k))
            elif isinstance(module, nn.Linear):
                if name.endswith("router") and self.config.router_init_scale > 0:
                    std = self.config.router_init_scale / math.sqrt(module.in_features)
                    _init_named(module.weight, init_seed, name, "normal", std)
                elif name.endswith(("c_proj", "router")):
                    nn.init.zeros_(module.weight)
                elif name == "lm_head":
                    _init_named(module.weight, init_seed, name, "normal", 0.001)
                else:
                    _init_named(module.weight, init_seed, name, "uniform", math.sqrt(3) / math.sqrt(module.in_features))
        _init_named(self.wte.weight, init_seed, "wte", "normal", 1.0)

    def materialize(self, device) -> None:
        """Allocate and initialise a model built on the meta device (after its tables
        were sharded, so each rank allocates and draws only its own rows)."""
        self.to_empty(device=device)
        self._rotary_len = 0  # to_empty left the rotary tables unwritten: rebuild them now
        self._rotary(2 * self.config.seq_len, device)
        self.init_weights(self.init_seed)

    def _rotary(self, end: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        # Tables grow on demand so generation may run past seq_len.
        if end > self._rotary_len or self.rotary_cos.device != device:
            length = max(end, 2 * self.config.seq_len)
            cos, sin = rotary_tables(length, self.rotary_dim, self.config.rope_base, device)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
            self._rotary_len = length
        return self.rotary_cos, self.rotary_sin

    def check_token_ids(self, idx: torch.Tensor) -> None:
        """Refuse ids outside the vocabulary. Called where ids enter from outside
        (sampling prompts, evaluated text, the API), never in forward: the min/max read
        back to the host would synchronise every training step on a GPU and break
        torch.compile's graph; training data is checked once when it is loaded."""
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.config.vocab_size):
            raise TokenRangeError(
                f"token ids must lie in [0, {self.config.vocab_size}), got range [{int(idx.min())}, {int(idx.max())}]"
            )

    def forward(
        self,
        idx,
        targets=None,
        cache: KVCache | None = None,
        reduction: str = "mean",
        positions: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
    ):
        """idx (B, T) -> logits (B, T, V), or the cross-entropy loss if targets are
        given (targets == -1 are ignored; reduction='none' gives per-token nats).

        Padded batches (left padding, as Hugging Face generation makes them): positions
        (B, T) gives each token's rotary position within its own row, key_mask (B, S)
        marks the real tokens among all S = cached + T keys; a padded row then computes
        exactly what the row alone would. Ids are not range-checked here (see
        check_token_ids): an id past the vocabulary fails inside the embedding."""
        B, T = idx.shape
        if positions is None:
            if cache is None or not cache.static:  # (a static cache built the tables for its length)
                self._rotary((cache.pos if cache is not None else 0) + T, idx.device)
            span = cache.span(T) if cache is not None else slice(0, T)
            cos, sin = self.rotary_cos[:, span], self.rotary_sin[:, span]
        else:
            cos, sin = self._rotary(int(positions.max()) + 1, idx.device)
            cos, sin = cos[0, positions], sin[0, positions]  # (B, T, 1, rotary_dim / 2)
        memory = MemoryInputs(idx, self.bank_slots(idx))
        x = rms_norm(self.wte(idx))
        bigram = self.bigram_embeddings(idx, cache, positions).to(x.dtype) if self.bigram is not None else None
        for layer, block in enumerate(self.blocks):
            if bigram is not None:
                x = x + self.bigram.scales[layer].to(x.dtype) * bigram
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, memory, cos, sin, cache, key_mask, use_reentrant=False)
            else:
                x = block(x, memory, cos, sin, cache, key_mask)
        if cache is not None:
            cache.advance(T)
        logits = self.lm_head(rms_norm(x)).float()
        if self.config.logit_softcap:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=reduction
        )
        return loss.view(B, T) if reduction == "none" else loss

    def bank_slots(self, idx) -> Slots | None:
        """MoVE's bank rows for idx, gathered once for all layers. Under autocast they
        are cast to its dtype here, once per forward: each layer's mix would otherwise
        cast the same rows again (at d12 x4 a multi-GB tensor, 12 times forward and
        backward). The gradient path does not change: it goes through the table's fast
        path (fp32 sums) or, on the reference path, through this cast."""
        if self.bank is None:
            return None
        slots = self.bank(idx)
        device = idx.device.type
        if torch.is_autocast_enabled(device):
            slots = slots._replace(values=slots.values.to(torch.get_autocast_dtype(device)))
        return slots

    def bigram_embeddings(self, idx, cache: KVCache | None, positions) -> torch.Tensor:
        """The hashed bigram rows of idx; a cache remembers the ids, so decoding a
        token pairs it with the one before it."""
        before = None
        if cache is not None:
            seen = cache.update(0, "ids", idx)  # every id so far, this chunk's included
            if cache.static:  # no branch on a tensor position (compiled decoding)
                last = seen.index_select(1, (cache.pos - 1).clamp(min=0).view(1))[:, 0]
                before = torch.where(cache.pos > 0, last, -1)
            elif cache.pos > 0:
                before = seen[:, cache.pos - 1]
        return self.bigram(idx, previous_tokens(idx, before, positions))

    def value_tables(self) -> list[ValueTable]:
        return [m for m in self.modules() if isinstance(m, ValueTable)]

    def set_value_memory_grad_mode(self, mode: str) -> None:
        """'autograd' (reference path) or 'dense' (the fast path, for exact AdamW and lazy RowAdam)."""
        if mode not in GRAD_MODES:
            raise ConfigError(f"unknown value-memory gradient mode {mode!r}; choose one of {', '.join(GRAD_MODES)}")
        for table in self.value_tables():
            table.weight.grad = None
            table.grad_mode = mode

    def set_value_memory_dtype(self, dtype: torch.dtype) -> None:
        """Storage dtype of the memory tables (bf16 halves them; gates and mixing
        still produce values in the model's dtype)."""
        for table in self.value_tables():
            table.weight.grad = None
            table.weight.data = table.weight.data.to(dtype)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Like nn.Module.zero_grad, but a fast-path table keeps its dense gradient
        buffer and zeroes only the rows the step touched: no bank-sized allocation
        or memset per step."""
        kept = set()
        for table in self.value_tables():
            if table.grad_mode == "dense":
                table.zero_touched_grad()
                kept.add(table.weight)
        for p in self.parameters():
            if p not in kept and p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def new_cache(self, batch_size: int, max_len: int, static: bool = False) -> KVCache:
        """A KV cache for max_len positions; static: for a compiled decoding step
        (StaticKVCache, on the model's device, rotary tables built for its length)."""
        if not static:
            return KVCache(self.config.n_layer, batch_size, max_len)
        device = self.lm_head.weight.device
        self._rotary(max_len, device)
        return StaticKVCache(self.config.n_layer, batch_size, max_len, device)
