"""The model configuration: one plain dataclass, its validation, and the presets.

Every architectural knob lives here so that a compute-matched dense baseline is
just another `ModelConfig` (more layers or width, `value_memory="standard"`).
"""

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import tomli_w

from move.errors import ConfigError
from move.readers import read_toml

VALUE_MEMORY_VARIANTS = ("standard", "lave", "move")
# Other token-indexed memory designs, compared with MoVE on the same GPT
# (move/model/memory_designs.py): hashed bigram embeddings, a product-key memory
# layer and the value residual. They run on MHA/GQA attention.
OTHER_MEMORY_DESIGNS = ("bigram", "pkm", "value_residual")
MEMORY_KINDS = VALUE_MEMORY_VARIANTS + OTHER_MEMORY_DESIGNS
ROW_EXCHANGES = ("sized", "fixed")  # how a row-sharded table's rows travel (move/model/row_shard.py)
MEMORY_LABELS = {
    "standard": "standard",
    "lave": "LaVE",
    "move": "MoVE",
    "bigram": "hashed bigram",
    "pkm": "PKM",
    "value_residual": "value residual",
}
SIZED_BY_DENSITY = ("lave", "move", "bigram", "pkm")  # value_residual has no table to size
ATTENTION_KINDS = ("mha", "mla")
# nanochat's LaVE gate reads only the first 32 channels of the block input.
LAVE_GATE_CHANNELS = 32


def require_finite(config) -> None:
    """ConfigError naming the first float field that is NaN or infinite: a NaN slips
    through every `x < 0` check and poisons training silently."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value}")


def require_positive(config, names) -> None:
    """ConfigError naming the first of `names` that is not > 0."""
    for name in names:
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(config, name)}")


def option(default, help: str):
    """A config field with its one-line help: the command line shows the help (and
    the default a run really gets) for every field, so it is written once, here."""
    return field(default=default, metadata={"help": help})


class SerialConfig:
    """to_dict / from_dict for config dataclasses: unknown fields are refused and
    the result is validated, so a config read from a file is as safe as one built in code."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**d).validate()


@dataclass
class ModelConfig(SerialConfig):
    vocab_size: int = option(4096, "vocabulary size")
    seq_len: int = option(256, "context length in tokens")
    n_layer: int = option(4, "transformer blocks")
    n_embd: int = option(256, "model width d_model")
    n_head: int = option(4, "attention heads")
    n_kv_head: int = option(0, "key/value heads for grouped-query attention (0: n_head, plain MHA)")
    attention: str = option("mha", "mha (MHA/GQA) or mla (multi-head latent attention)")
    kv_latent_dim: int = option(
        0, "MLA: width d_c of the cached KV latent (0: 4 x head_dim, rounded up to a multiple of n_head)"
    )
    rope_head_dim: int = option(0, "MLA: width of the decoupled RoPE key/query part (0: head_dim / 2)")
    value_memory: str = option(
        "standard",
        "standard, lave, move, or another memory design: bigram (hashed "
        "bigram embeddings), pkm (product-key memory), value_residual",
    )
    # LaVE gets k tables per participating layer; MoVE gets M = k * (number of LaVE
    # layers) slots, i.e. the same value-memory parameters.
    memory_density: int = option(
        1,
        "memory density k (xk): LaVE tables per layer, MoVE slots M = k x LaVE layers; "
        "bigram and pkm tables get MoVE xk's value-memory parameters",
    )
    memory_slots: int = option(0, "MoVE: the number of slots M directly (0: from the density)")
    move_gate_g0: bool = option(True, "MoVE: gate g0 on the standard value path (false: the no-g0 ablation)")
    lave_full_gates: bool = option(False, "LaVE ablation: full-width routers d_model -> H(k+1) and a gate g0")
    # symmetry breaking (issue: slots of a row move as one): both default to the paper
    router_init_scale: float = option(
        0.0,
        "MoVE/LaVE: std of the gate logits at init, router N(0, s^2 / fan_in); 0: a zero router, "
        "every gate exactly 1 (the paper)",
    )
    memory_init_scale: float = option(
        1.0, "value-memory tables' init range as a multiple of the value projection's (1: the paper)"
    )
    slot_dropout: float = option(
        0.0, "MoVE/LaVE, training only: each slot's gate is dropped with this probability per token and head"
    )
    slot_gate_channels: int = option(
        0,
        "MoVE: each slot's gate also reads the first k channels of the slot's own content (learned weights "
        "per layer and head, modded-nanogpt's value-embedding gate), so slots with different content get "
        "different gates (0: off, the paper)",
    )
    layer_start_bias: float = option(
        0.0,
        "MoVE: layer-assigned start b; each layer's gates get a trained bias, 0 for g0 and for the slots of "
        "its LaVE layer, -b for the other slots, so MoVE xk starts near LaVE xk and can learn to share "
        "(0: no bias, every gate exactly 1: the paper)",
    )
    pkm_heads: int = option(4, "pkm: query heads, each reading its own top-k rows (Lample et al. 2019: 4)")
    pkm_topk: int = option(8, "pkm: rows each head reads per token (Lample et al. 2019: 32)")
    logit_softcap: float = option(15.0, "tanh soft-cap of the logits (0 disables)")
    rope_base: float = option(10000.0, "rotary embedding base")

    # ---- derived quantities (one place, used by model and accounting) ----
    def standard_names(self) -> dict:
        """The model's shape under the names transformers and the tools around it read
        (hidden_size, num_hidden_layers, ...): the Hugging Face export's config."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.n_embd,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.seq_len,
        }

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Heads that own a value vector (MLA has no GQA: every head does)."""
        if self.attention == "mla":
            return self.n_head
        return self.n_kv_head or self.n_head

    @property
    def kv_latent_width(self) -> int:
        # MoVE on MLA splits the latent in n_head chunks, so the default is a multiple of
        # n_head: 4 x head_dim is not for d12's 6 heads of 128 (512 -> 516)
        return self.kv_latent_dim or -(-4 * self.head_dim // self.n_head) * self.n_head

    @property
    def rope_width(self) -> int:
        return self.rope_head_dim or max(2, self.head_dim // 2)

    @property
    def lave_layers(self) -> list[int]:
        """Layers that carry LaVE tables: alternate ones ending at the last layer."""
        return [i for i in range(self.n_layer) if i % 2 == (self.n_layer - 1) % 2]

    @property
    def n_slots(self) -> int:
        """MoVE's M (bank slots per token) or LaVE's tables per participating layer."""
        if self.value_memory == "move":
            return self.memory_slots or self.memory_density * len(self.lave_layers)
        if self.value_memory == "lave":
            return self.memory_density
        return 0

    @property
    def memory_width(self) -> int:
        """Width of one memory slot summed over heads: the value width d_v, or on
        MLA+MoVE the latent width d_c (memory is mixed into the latent)."""
        if self.attention == "mla" and self.value_memory == "move":
            return self.kv_latent_width
        return self.kv_heads * self.head_dim

    @property
    def gate_g0(self) -> bool:
        """Whether the standard value path has its own gate g0."""
        if self.value_memory == "move":
            return self.move_gate_g0
        return self.value_memory == "lave" and self.lave_full_gates

    def own_slots(self, layer: int) -> list[int]:
        """MoVE slots that the layer-assigned start gives a layer (owned_slots)."""
        return owned_slots(layer, self.lave_layers, self.n_slots)

    def memory_layers(self) -> list[int]:
        """Layers that mix value memory into attention (MoVE, LaVE gates and tables)."""
        if self.value_memory == "move":
            return list(range(self.n_layer))
        if self.value_memory == "lave":
            return self.lave_layers
        return []

    @property
    def memory_budget(self) -> int:
        """The value-memory parameters of MoVE at this density: what the bigram and
        product-key tables are sized to, so designs compare at equal extra parameters."""
        return self.vocab_size * self.memory_density * len(self.lave_layers) * self.kv_heads * self.head_dim

    @property
    def bigram_rows(self) -> int:
        """Rows of the hashed bigram table (width n_embd): MoVE xk's parameters."""
        return max(2, self.memory_budget // self.n_embd)

    @property
    def pkm_keys(self) -> int:
        """Sub-keys per half of the product-key memory: its n_keys^2 value rows (width
        n_embd) hold about MoVE xk's parameters."""
        return max(self.pkm_topk, math.isqrt(self.memory_budget // self.n_embd))

    @property
    def pkm_layer(self) -> int:
        """The layer whose MLP the product-key memory replaces: the middle one."""
        return self.n_layer // 2

    def validate(self) -> "ModelConfig":
        require_finite(self)
        require_positive(self, ["vocab_size", "seq_len", "n_layer", "n_embd", "n_head", "memory_density"])
        if self.rope_base <= 1:
            raise ConfigError(f"rope_base must be > 1, got {self.rope_base}")
        for name in ["router_init_scale", "memory_init_scale", "layer_start_bias"]:
            if not 0 <= getattr(self, name) <= 100:  # also refuses nan
                raise ConfigError(f"{name} must lie in [0, 100], got {getattr(self, name)}")
        if not 0 <= self.slot_dropout < 1:
            raise ConfigError(f"slot_dropout must lie in [0, 1), got {self.slot_dropout}")
        if self.layer_start_bias > 0 and self.value_memory != "move":
            raise ConfigError(f"layer_start_bias is a MoVE option; value_memory is {self.value_memory}")
        if self.slot_gate_channels and self.value_memory != "move":
            raise ConfigError(f"slot_gate_channels is a MoVE option; value_memory is {self.value_memory}")
        if not 0 <= self.slot_gate_channels <= self.memory_width // max(self.kv_heads, 1):
            raise ConfigError(
                f"slot_gate_channels must lie in [0, the slot width per head], got {self.slot_gate_channels}"
            )
        for name in ["n_kv_head", "kv_latent_dim", "rope_head_dim", "memory_slots"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0 = default), got {getattr(self, name)}")
        if self.value_memory not in MEMORY_KINDS:
            raise ConfigError(f"unknown value_memory {self.value_memory!r}; choose one of {', '.join(MEMORY_KINDS)}")
        if self.value_memory in OTHER_MEMORY_DESIGNS and self.attention != "mha":
            raise ConfigError(f"value_memory {self.value_memory} runs on MHA/GQA attention, not {self.attention}")
        require_positive(self, ["pkm_heads", "pkm_topk"])
        if self.attention not in ATTENTION_KINDS:
            raise ConfigError(f"unknown attention {self.attention!r}; choose one of {', '.join(ATTENTION_KINDS)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_head={self.n_head} does not divide n_embd={self.n_embd}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.attention == "mha" and self.n_head % self.kv_heads:
            raise ConfigError(f"n_kv_head={self.kv_heads} does not divide n_head={self.n_head}")
        if self.attention == "mla" and self.rope_width % 2:
            raise ConfigError(f"rope_head_dim={self.rope_width} must be even")
        if self.attention == "mla" and self.value_memory == "move" and self.kv_latent_width % self.n_head:
            raise ConfigError(
                f"MLA+MoVE needs kv_latent_dim (d_c={self.kv_latent_width}) divisible by n_head={self.n_head}"
            )
        if self.value_memory == "lave" and self.n_embd < LAVE_GATE_CHANNELS and not self.lave_full_gates:
            raise ConfigError(f"LaVE gates read {LAVE_GATE_CHANNELS} channels; n_embd={self.n_embd} is smaller")
        if self.logit_softcap < 0:
            raise ConfigError(f"logit_softcap must be >= 0, got {self.logit_softcap}")
        return self


DEFAULT_PRESET = "small"
LABEL_DROPOUT = 0.1  # class-conditional images: probability of the null class in training

# Presets: the shape of the model; the variant and density are set separately.
# The paper's text baselines are nanochat models: width = 64 x depth, heads of 128
# channels, context 2,048 (nanochat scripts/base_train.py: --aspect-ratio 64,
# --head-dim 128, --max-seq-len 2048). With a vocabulary of 2^16 (nanochat's tokenizer,
# scripts/tok_train.py, until it moved to 2^15 in 2026) their parameter counts are the
# paper's: D12 185.6M (~186M), D20 561.2M (~561M), D32 1.879B (~1.88B) (tests/test_presets.py
# checks them). nanochat's January 2026 value-embedding log (151M = 6 tables x 32,768 x
# 768 at d12) used 2^15: pass --vocab-size 32768 (or prepare data with it) for that.
# The paper's image baselines are LlamaGen's class-conditional GPT-B / GPT-L on 256x256
# ImageNet: a 16x16 grid of a 16,384-code VQ tokenizer, 1,000 classes (+ a null class for
# guidance), GPT-B 12 layers x 768 with 12 heads (111M), GPT-L 24 x 1024 with 16 (343M)
# (LlamaGen, Sun et al. 2024, Table 2); relu^2 MLPs of 4 x width have the parameters of
# LlamaGen's SwiGLU of 8/3 x width (GPT-B: 111.6M; GPT-L: 337.6M, 1.6% under 343M because
# LlamaGen rounds its SwiGLU width up to a multiple of 256: 2,816 instead of 2,731). The image
# presets' vocabulary (codes + classes + null) and context (the 256 image tokens; the class
# token takes position 0) are what `move image-encode` of such data gives.
MODEL_PRESETS: dict[str, dict] = {
    # seconds on a CPU; used by tests
    "tiny": dict(vocab_size=512, seq_len=64, n_layer=2, n_embd=64, n_head=2),
    # a few minutes per model on 2 CPU cores
    "small": dict(vocab_size=2048, seq_len=128, n_layer=4, n_embd=128, n_head=4),
    # the paper's text models (nanochat depth 12 / 20 / 32)
    "d12": dict(vocab_size=65536, seq_len=2048, n_layer=12, n_embd=768, n_head=6),
    "d20": dict(vocab_size=65536, seq_len=2048, n_layer=20, n_embd=1280, n_head=10),
    "d32": dict(vocab_size=65536, seq_len=2048, n_layer=32, n_embd=2048, n_head=16),
    # the paper's image models (LlamaGen GPT-B / GPT-L, class-conditional ImageNet 256)
    "gpt-b": dict(vocab_size=16384 + 1000 + 1, seq_len=256, n_layer=12, n_embd=768, n_head=12),
    "gpt-l": dict(vocab_size=16384 + 1000 + 1, seq_len=256, n_layer=24, n_embd=1024, n_head=16),
}


def model_config_from_preset(preset: str, **overrides) -> ModelConfig:
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
    values = {**MODEL_PRESETS[preset], **overrides}
    return ModelConfig.from_dict(values)


# ---- training: the optimiser and the loop (move/training) ----

LOGGERS = ("tensorboard", "wandb")


def parse_loggers(spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ConfigError(f"unknown logger {unknown[0]!r}; choose from {', '.join(LOGGERS)} (comma-separated)")
    return names


@dataclass
class OptimConfig:
    optimizer: str = option("muon", "optimiser of the transformer matrices: muon or adamw")
    lr_matrix: float = option(0.02, "Muon learning rate of the matrices")
    lr_adamw_matrix: float = option(0.003, "AdamW learning rate of the matrices (optimizer adamw; image conv nets)")
    lr_embedding: float = option(0.2, "AdamW rate of the token embedding, scaled by (d_model/768)^-0.5")
    lr_value_memory: float = option(
        0.2, "AdamW rate of the value memory (bank, LaVE tables), scaled like the embedding"
    )
    lr_lm_head: float = option(0.004, "AdamW rate of the output head, scaled like the embedding")
    lr_memory_control: float = option(0.02, "AdamW rate of the other memory designs' scalars and product sub-keys")
    weight_decay: float = option(0.0, "decoupled weight decay")
    warmup_steps: int = option(0, "linear learning-rate warm-up steps")
    warmdown_frac: float = option(0.2, "fraction of the steps over which the rate decays linearly to zero")
    grad_clip: float = option(1.0, "global gradient-norm clip (0 disables)")
    value_memory_optimizer: str = option("exact", "exact (AdamW over the whole table) or lazy (row-sparse Adam)")
    # At initialisation every gate is equal, so all M slots of a row get the same
    # gradient and Adam the same step: the memory term moves M times faster than one
    # slot. Dividing by M keeps its step size independent of M. The default since the
    # evidence study (README "Findings": paired with the paper-faithful rate on
    # Shakespeare, x4 gains 0.012 bpb at 1M tokens, x1/x8 no worse); false is the
    # paper-faithful setting.
    value_memory_lr_per_slot: bool = option(
        True, "divide the value-memory rate by the slots a layer mixes (MoVE: M, LaVE: k); false: the paper's rate"
    )

    def validate(self) -> "OptimConfig":
        require_finite(self)
        if self.optimizer not in ("muon", "adamw"):
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose muon or adamw")
        for f in fields(self):
            if f.name.startswith("lr_") and not 0 < getattr(self, f.name) <= 10:
                raise ConfigError(f"{f.name} must be in (0, 10], got {getattr(self, f.name)}")
        if not 0 <= self.warmdown_frac <= 1:
            raise ConfigError(f"warmdown_frac must be in [0, 1], got {self.warmdown_frac}")
        if self.value_memory_optimizer not in ("exact", "lazy"):
            raise ConfigError(f"unknown value_memory_optimizer {self.value_memory_optimizer!r}; choose exact or lazy")
        if self.value_memory_optimizer == "lazy" and self.weight_decay:
            raise ConfigError("the lazy value-memory optimizer has no weight decay; use weight_decay 0 or exact")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("warmup_steps and grad_clip must be >= 0")
        if not 0 <= self.weight_decay <= 1:  # decoupled decay multiplies weights by 1 - lr * wd each step
            raise ConfigError(f"weight_decay must be in [0, 1], got {self.weight_decay}")
        return self


def owned_slots(layer: int, lave_layers: list[int], slots: int) -> list[int]:
    """The slots the layer-assigned start gives a layer: the LaVE layers take the slots
    in turn (slot m goes to LaVE layer m mod their count), so at M = k x LaVE layers
    each LaVE layer owns k slots, as LaVE xk owns k tables; the other layers own none.
    One rule for this project's models and a retrofitted Hugging Face model."""
    if layer not in lave_layers:
        return []
    turn, turns = lave_layers.index(layer), len(lave_layers)
    return [m for m in range(slots) if m % turns == turn]


def mixed_rows(batch_size: int, mix_fraction: float, error=ConfigError, per: str = "") -> int:
    """The rows of each batch taken from the mixed-in corpus: round(batch x fraction),
    refused (as `error`) unless each corpus keeps at least one row. per: what the batch
    is counted per, for the message (a process, under torchrun)."""
    rows = round(batch_size * mix_fraction)
    if not 0 < rows < batch_size:
        raise error(
            f"mix_fraction {mix_fraction} of {batch_size} rows a batch{per} is {rows} rows; "
            "it must leave at least one row of each corpus"
        )
    return rows


def check_mix(config) -> None:
    """A config's mix_data and mix_fraction (TrainConfig, RetrofitRun): both or neither,
    the fraction in [0, 1)."""
    if not 0 <= config.mix_fraction < 1:
        raise ConfigError(f"mix_fraction must lie in [0, 1), got {config.mix_fraction}")
    if bool(config.mix_data) != (config.mix_fraction > 0):
        raise ConfigError("mix_data and mix_fraction go together: give both or neither")


@dataclass
class TrainConfig:
    steps: int = option(200, "optimiser steps")
    batch_size: int = option(16, "sequences per step (the global batch under torchrun)")
    grad_accum: int = option(1, "micro-batches per step (gradient accumulation)")
    eval_every: int = option(50, "steps between evaluations")
    eval_tokens: int = option(65536, "validation tokens per evaluation")
    checkpoint_every: int = option(100, "steps between checkpoints")
    keep_checkpoints: int = option(2, "newest checkpoints kept")
    seed: int = option(0, "initialisation seed (and the data order unless --data-seed is set)")
    # Experiments fix the data seed so that every run of a grid sees the same batches.
    data_seed: int = option(-1, "data-order seed (-1: the same as --seed)")
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")
    value_memory_path: str = option("fast", "fast (row-sparse gradients) or reference (the direct implementation)")
    value_memory_dtype: str = option("float32", "float32 or bfloat16 (half the bank memory, fp32 optimiser state)")
    row_exchange: str = option(
        "sized",
        "under torchrun, how a row-sharded table's rows travel: sized (exactly the rows asked for; 4 host "
        "syncs per micro-batch + 4 per step) or fixed (padded buffers of fixed size: no host sync, up to "
        "world-size times the traffic)",
    )
    loggers: str = option("", "tensorboard, wandb or both, comma-separated (metrics.jsonl is always written)")
    log_every: int = option(10, "steps between training-loss records sent to the trackers")
    compile: bool = option(False, "torch.compile the training forward (worth it on GPUs; slow to start on CPU)")
    peak_tflops: float = option(0.0, "per-device peak TFLOP/s for MFU (0: the data sheet of a known GPU, else no MFU)")
    init_from: str = option(
        "",
        "a checkpoint or run directory to start from: its tensors by name, the value memory this model "
        "adds at zero, so step 0 computes the source's function (move/training/init_from.py)",
    )
    init_new_memory: str = option("zero", "with --init-from: zero (function-preserving) or random new memory tables")
    # continued training that must not forget: new text (facts) with general text mixed in
    mix_data: str = option(
        "",
        "a second prepared text corpus with the same tokenizer, mixed into every batch; its validation bpb "
        "is reported as mix_val_bpb (default none)",
    )
    mix_fraction: float = option(0.0, "with --mix-data: the fraction of each batch's rows drawn from it")
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> "TrainConfig":
        require_finite(self)
        require_positive(
            self,
            [
                "steps",
                "batch_size",
                "grad_accum",
                "eval_every",
                "eval_tokens",
                "checkpoint_every",
                "keep_checkpoints",
                "log_every",
            ],
        )
        if self.peak_tflops < 0:
            raise ConfigError(f"peak_tflops must be >= 0, got {self.peak_tflops}")
        if self.value_memory_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"value_memory_dtype must be float32 or bfloat16, got {self.value_memory_dtype!r}")
        if self.init_new_memory not in ("zero", "random"):
            raise ConfigError(f"init_new_memory must be zero or random, got {self.init_new_memory!r}")
        if self.row_exchange not in ROW_EXCHANGES:
            raise ConfigError(f"row_exchange must be one of {', '.join(ROW_EXCHANGES)}, got {self.row_exchange!r}")
        check_mix(self)
        parse_loggers(self.loggers)
        self.optim.validate()
        return self

    @property
    def loader_seed(self) -> int:
        return self.seed if self.data_seed < 0 else self.data_seed

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def flat_keys() -> set[str]:
        """The keys of a flat training table: TrainConfig's own fields and OptimConfig's."""
        return (set(TrainConfig.__dataclass_fields__) - {"optim"}) | set(OptimConfig.__dataclass_fields__)

    def to_flat(self) -> dict:
        """The inverse of from_flat: one mapping of every training and optimiser field."""
        own = {k: v for k, v in asdict(self).items() if k != "optim"}
        return {**own, **asdict(self.optim)}

    @classmethod
    def from_flat(cls, values: dict) -> "TrainConfig":
        """A validated TrainConfig with its OptimConfig from one flat mapping (command-line
        flags, an experiment's [train] table); keys of neither are ignored."""
        optim = {k: v for k, v in values.items() if k in OptimConfig.__dataclass_fields__}
        own = {k: v for k, v in values.items() if k in cls.__dataclass_fields__ and k != "optim"}
        return cls(**own, optim=OptimConfig(**optim)).validate()

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        return cls(**{**d, "optim": OptimConfig(**d.pop("optim", {}))})


# ---- the run config file: `move train --config run.toml`, and <run>/config.toml ----

RUN_CONFIG_NAME = "config.toml"
RUN_CONFIG_KEYS = {"data", "preset", "label_dropout", "model", "train"}


def read_run_config(path) -> dict:
    """A run config file: top-level data / preset / label_dropout, a [model] table of
    ModelConfig fields (over the preset) and a flat [train] table of TrainConfig and
    OptimConfig fields. Unknown keys are refused; values are checked when the run is built."""
    path = Path(path)
    raw = read_toml(path, "config file")
    for where, keys, allowed in (
        ("the top level", raw, RUN_CONFIG_KEYS),
        ("[model]", raw.get("model", {}), set(ModelConfig.__dataclass_fields__)),
        ("[train]", raw.get("train", {}), TrainConfig.flat_keys()),
    ):
        if not isinstance(keys, dict):
            raise ConfigError(f"{path}: {where} must be a table")
        unknown = sorted(set(keys) - allowed)
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) in {where}: {', '.join(unknown)}")
    return raw


def run_config_text(data: str, preset: str, label_dropout: float, model: ModelConfig, train: TrainConfig) -> str:
    """The effective config of a run in the format read_run_config reads, every field
    resolved, so `move train --config <run>/config.toml --out <new>` launches it again."""
    header = (
        "# The effective configuration of this run (preset, data and flags resolved), written when it started.\n"
        "# Launch it again: move train --config <this file> --out <new run directory> (flags override it).\n"
    )
    return header + tomli_w.dumps(
        {
            "data": str(data),
            "preset": preset,
            "label_dropout": label_dropout,
            "model": model.to_dict(),
            "train": train.to_flat(),
        }
    )


# ---- the image pipeline's conv nets (move/model/vqvae.py, classifier.py) ----


@dataclass
class VQConfig(SerialConfig):
    image_size: int = option(28, "image side in pixels")
    channels: int = option(1, "image channels")
    hidden: int = option(64, "channels of the conv stages")
    downsample: int = option(2, "stride-2 stages: the code grid is image_size / 2^downsample")
    codebook_size: int = option(256, "codes in the codebook")
    code_dim: int = option(8, "width of a code vector")
    commitment: float = option(0.25, "commitment weight beta: pulls encoder outputs towards their codes")

    def validate(self) -> "VQConfig":
        require_finite(self)
        require_positive(self, ("image_size", "channels", "hidden", "codebook_size", "code_dim"))
        if self.downsample < 0 or self.image_size % (2**self.downsample):
            raise ConfigError(f"image_size {self.image_size} must be divisible by 2**downsample ({2**self.downsample})")
        if self.codebook_size > 65535:
            raise ConfigError("codebook_size must fit in uint16 (<= 65535)")
        return self

    @property
    def grid(self) -> int:
        return self.image_size // 2**self.downsample


@dataclass
class ClassifierConfig(SerialConfig):
    image_size: int = option(28, "image side in pixels")
    channels: int = option(1, "image channels")
    num_classes: int = option(10, "classes")
    hidden: int = option(32, "channels of the conv stages")

    def validate(self) -> "ClassifierConfig":
        require_finite(self)
        require_positive(self, ("image_size", "channels", "num_classes", "hidden"))
        return self


@dataclass
class RetrofitRun(SerialConfig):
    """`move retrofit`: a pretrained causal LM given a MoVE bank and trained on (move/export/retrofit_training.py).
    It is also the trained model's config in the Trainer's run.json and checkpoints: a resumed run must match it."""

    memory: str = option(
        "bank",
        "bank (a MoVE bank is added), lave (tables on alternate layers: nanochat's layout, the paper's "
        "LaVE) or none (LoRA or full fine-tuning alone)",
    )
    density: int = option(1, "MoVE slots M = density x ceil(layers / 2); lave: tables per memory layer")
    slots: int = option(0, "MoVE slots M directly (lave: tables per memory layer; 0: from the density)")
    lora_rank: int = option(0, "LoRA rank on every linear layer but the head (0: no LoRA)")
    lr_lora: float = option(1e-4, "AdamW learning rate of LoRA")
    steps: int = option(100, "optimiser steps")
    batch_size: int = option(8, "sequences per step")
    seq_len: int = option(128, "tokens per sequence")
    lr_memory: float = option(1e-2, "AdamW learning rate of the bank")
    lr_router: float = option(1e-3, "AdamW learning rate of the routers")
    lr_dense: float = option(0.0, "AdamW learning rate of the model's own weights (0: frozen)")
    layer_start_bias: float = option(
        0.0,
        "bank: the layer-assigned start b; each layer's gates get a trained bias, 0 for g0 and the slots of its "
        "LaVE turn, -b for the others, so slots that all start at zero train apart (0: off, every gate 1)",
    )
    bank_optimizer: str = option("exact", "exact (AdamW over the whole bank) or lazy (Adam on the rows a step touched)")
    bank_dtype: str = option("float32", "float32 or bfloat16 (half the bank's memory; fp32 optimiser state)")
    eval_tokens: int = option(16384, "validation tokens scored before and after")
    kl_tokens: int = option(
        4096, "general-text tokens on which the KL divergence from the untouched model is measured (0: none)"
    )
    mix_data: str = option(
        "", "a corpus with the same tokenizer mixed into every batch (general text to keep) (default none)"
    )
    mix_fraction: float = option(0.0, "with --mix-data: the fraction of each batch's rows drawn from it")
    seed: int = option(0, "data order")
    checkpoint_every: int = option(50, "steps between checkpoints (--resume continues from the newest)")

    def validate(self) -> "RetrofitRun":
        for name in ("density", "steps", "batch_size", "seq_len", "eval_tokens", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.slots < 0 or self.lora_rank < 0 or self.kl_tokens < 0:
            raise ConfigError("slots, lora_rank and kl_tokens must be >= 0")
        if self.memory not in ("bank", "lave", "none"):
            raise ConfigError(f"memory must be bank, lave or none, got {self.memory!r}")
        if self.memory == "none" and not self.lora_rank and not self.lr_dense:
            raise ConfigError("nothing to train: give a bank (--memory bank), --lora-rank or --lr-dense")
        if self.layer_start_bias < 0 or (self.layer_start_bias > 0 and self.memory != "bank"):
            raise ConfigError(f"layer_start_bias (>= 0) is a bank option; memory is {self.memory}")
        for name in ("lr_memory", "lr_router", "lr_lora"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name} must lie in (0, 1], got {getattr(self, name)}")
        if not 0 <= self.lr_dense <= 1:
            raise ConfigError(f"lr_dense must lie in [0, 1], got {self.lr_dense}")
        if self.bank_optimizer not in ("exact", "lazy"):
            raise ConfigError(f"bank_optimizer must be exact or lazy, got {self.bank_optimizer!r}")
        if self.bank_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"bank_dtype must be float32 or bfloat16, got {self.bank_dtype!r}")
        check_mix(self)
        if self.mix_data:
            mixed_rows(self.batch_size, self.mix_fraction)  # before the model loads
        return self
