"""Value memory added to a Hugging Face causal LM: `retrofit(model, density=K)`.

For the Llama family (Llama, Qwen2/Qwen3, Mistral: attention with a `v_proj`) and
GPT-2 (a fused `c_attn`). The model gets one module, `move_memory`, holding what
MoVE adds: a global bank of M value slots per token and key/value head, looked up by
the input ids (ValueTable, the project's own, with its fast row-sparse gradient), and
per attention layer a router Linear(hidden -> kv_heads * (M + 1)) giving the gates
[g0, g_1..g_M] = 2 * sigmoid(router(x)), x the value projection's input. Hooks mix
them into every layer's values through the project's one formula (mix_memory):
    v' = g0 * v + sum_i g_i * m_i(token)
Bank and routers start at zero, so every gate is exactly 1 and every slot 0: the
retrofitted model computes exactly the original function (tested bit for bit).

The parameter names of the original model do not change (hooks, not wrappers), so
peft, quantisation and the usual tooling see the model they know. save_pretrained
writes the bank and routers with the rest (`move_memory.*` in the safetensors files)
and the retrofit's settings in config.json (`move_retrofit`); `load_retrofitted(path)`
loads them back. Nothing here is needed to build or train this project's own models.
"""

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from move.config import owned_slots
from move.errors import ConfigError
from move.model.value_memory import layer_start_logits, mix_memory
from move.model.value_tables import ValueTable

MEMORY_MODULE = "move_memory"  # the attribute of the model that owns what the retrofit adds
CONFIG_KEY = "move_retrofit"  # its settings in the model's config (and config.json)


LAYOUTS = ("move", "lave")


@dataclass
class RetrofitSettings:
    slots: int  # move: M, bank slots per token and key/value head; lave: tables per memory layer
    gate_g0: bool = True  # a gate on the model's own values (the paper's MoVE; LaVE has none)
    layout: str = "move"  # move: one global bank read by every layer; lave: a table per alternate layer
    # move: the layer-assigned start b (0: off). Each layer's gates get a trained bias: 0 for g0 and the slots of
    # its LaVE turn, -b for the others. The bank starts at zero, so the function is still the original one; but
    # without it the slots of a row stay identical for ever (same zero start, same gradient), so M slots train
    # as one. The bias makes the layers read, and so train, different slots from the first step.
    layer_start_bias: float = 0.0


@dataclass
class AttentionShape:
    """What the retrofit needs of the architecture: where the values are made, how
    they are laid out, and how many tokens index the bank."""

    family: str  # "llama" (v_proj) or "gpt2" (fused c_attn)
    layers: list[nn.Module]  # the modules whose output holds the values (v_proj / c_attn)
    vocab_size: int
    hidden_size: int
    kv_heads: int
    head_dim: int


def attention_shape(model: nn.Module) -> AttentionShape:
    """Find the value projections of a supported causal LM, or refuse in one line."""
    llama = [m.v_proj for m in model.modules() if isinstance(getattr(m, "v_proj", None), nn.Linear)]
    gpt2 = [m.c_attn for m in model.modules() if type(m).__name__ == "GPT2Attention" and not m.is_cross_attention]
    if not (llama or gpt2) or not hasattr(model, "config"):
        raise ConfigError(
            f"retrofit supports the Llama family (attention with a v_proj: Llama, Qwen2/3, Mistral) and GPT-2; "
            f"{type(model).__name__} is neither"
        )
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    vocab = model.get_input_embeddings().num_embeddings
    if llama:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return AttentionShape("llama", llama, vocab, config.hidden_size, kv_heads, head_dim)
    return AttentionShape("gpt2", gpt2, vocab, config.n_embd, config.n_head, config.n_embd // config.n_head)


class ValueMemoryRetrofit(nn.Module):
    """The parts a retrofit adds and the hooks that use them. Layout "move": one bank
    of M slots looked up once per forward, a router on every attention layer. Layout
    "lave" (nanochat's value embeddings, the paper's LaVE baseline): each alternate
    layer, ending at the last, owns k tables of its own and a router without g0."""

    def __init__(self, shape: AttentionShape, settings: RetrofitSettings):
        super().__init__()
        self.family, self.gate_g0, self.layout = shape.family, settings.gate_g0, settings.layout
        self.kv_heads, self.head_dim = shape.kv_heads, shape.head_dim
        count = len(shape.layers)
        alternate = [i for i in range(count) if i % 2 == (count - 1) % 2]
        self.memory_layers = list(range(count)) if self.layout == "move" else alternate

        def table():
            return ValueTable(shape.vocab_size, shape.kv_heads, settings.slots, shape.head_dim, zero_init=True)

        if self.layout == "move":
            self.bank = table()
        else:
            self.tables = nn.ModuleList(table() for _ in self.memory_layers)
        gates = shape.kv_heads * (settings.slots + int(settings.gate_g0))
        start = settings.layer_start_bias  # the layer-assigned start: a trained bias on each router
        self.routers = nn.ModuleList(nn.Linear(shape.hidden_size, gates, bias=start > 0) for _ in self.memory_layers)
        for part in (*(t.weight for t in self.value_tables()), *(r.weight for r in self.routers)):
            nn.init.zeros_(part)  # every gate exactly 1 (but the start's), every slot 0: the original function
        if start > 0:
            for router, layer in zip(self.routers, self.memory_layers):
                own = owned_slots(layer, alternate, settings.slots)
                with torch.no_grad():
                    router.bias.copy_(layer_start_logits(shape.kv_heads, settings.slots, True, own, start))
        self.value_layers = []  # the modules whose values the hooks mix (set by attach; not submodules)
        self.ids_now = None  # the token ids of the current forward (set by look_up)
        self.slots_now = None  # move: the bank rows of those tokens, looked up once for all layers
        self.handles = []

    def value_tables(self) -> list[ValueTable]:
        """The bank (move) or the layers' tables (lave)."""
        return [self.bank] if self.layout == "move" else list(self.tables)

    def attach(self, model: nn.Module, shape: AttentionShape) -> None:
        """The ids are read where the model embeds them: its input embedding is called
        once per forward, before the layers, also when a wrapper (peft) calls the
        model's forward directly, which bypasses hooks on the model itself."""
        self.handles.append(model.register_forward_pre_hook(self.forget))
        self.handles.append(model.get_input_embeddings().register_forward_pre_hook(self.look_up))
        self.value_layers = [shape.layers[index] for index in self.memory_layers]
        tables = self.value_tables() if self.layout == "lave" else [None] * len(self.routers)
        for router, table, index in zip(self.routers, tables, self.memory_layers):
            self.handles.append(shape.layers[index].register_forward_hook(self.mixer(router, table)))

    def forget(self, _model, _args):
        """A new forward: ids and rows of the last one must not be used (inputs_embeds)."""
        self.ids_now = self.slots_now = None

    def look_up(self, _embedding, args):
        """The embedded ids; with one bank, its rows, once for all layers."""
        self.ids_now = args[0]
        self.slots_now = self.bank(args[0]) if self.layout == "move" else None

    def mixer(self, router: nn.Linear, table: ValueTable | None):
        def mix_into_values(_layer, args, output):
            x = args[0]
            if self.ids_now is None or self.ids_now.shape[:2] != output.shape[:2]:
                raise ValueError("a retrofitted model's value memory is looked up by token id: pass input_ids")
            slots = self.slots_now if table is None else table(self.ids_now)
            if slots.values.dtype != output.dtype:  # a bf16 model: cast once per layer, gradients stay fp32
                slots = slots._replace(values=slots.values.to(output.dtype))
            B, T = output.shape[:2]
            width = self.kv_heads * self.head_dim
            logits = router(x).view(B, T, self.kv_heads, -1)
            if self.family == "gpt2":  # c_attn gives [q, k, v]
                qk, v = output[..., :-width], output[..., -width:]
                mixed = mix_memory(v.view(B, T, self.kv_heads, self.head_dim), logits, slots, self.gate_g0)
                return torch.cat([qk, mixed.reshape(B, T, width)], dim=-1)
            mixed = mix_memory(output.view(B, T, self.kv_heads, self.head_dim), logits, slots, self.gate_g0)
            return mixed.reshape(B, T, width)

        return mix_into_values


def retrofit(
    model: nn.Module,
    density: int = 1,
    slots: int = 0,
    gate_g0: bool = True,
    layout: str = "move",
    layer_start_bias: float = 0.0,
) -> nn.Module:
    """Add value memory to a Hugging Face causal LM, in place; returns the model.

    layout "move": a MoVE bank; density K gives M = K x ceil(layers / 2) slots (this
    project's convention: MoVE xK has LaVE xK's value-memory parameters), `slots` sets
    M directly. Layout "lave": K tables (or `slots`) on each alternate layer ending at
    the last, gates without g0 (gate_g0 is ignored), the same parameters as MoVE xK.
    layer_start_bias b > 0 (move, with g0): the layer-assigned start (RetrofitSettings)."""
    if hasattr(model, MEMORY_MODULE):
        raise ConfigError(f"{type(model).__name__} already has value memory ({MEMORY_MODULE})")
    shape = attention_shape(model)
    if density < 1 or slots < 0:
        raise ConfigError(f"density must be >= 1 and slots >= 0, got {density} and {slots}")
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if layer_start_bias < 0 or (layer_start_bias > 0 and (layout != "move" or not gate_g0)):
        raise ConfigError(f"the layer-assigned start (b >= 0) is for a bank with g0, got b={layer_start_bias}")
    if layout == "lave":
        settings = RetrofitSettings(slots or density, gate_g0=False, layout="lave")
    else:
        settings = RetrofitSettings(
            slots or density * ((len(shape.layers) + 1) // 2), gate_g0, "move", layer_start_bias
        )
    memory = ValueMemoryRetrofit(shape, settings)
    reference = model.get_input_embeddings().weight
    for table in memory.value_tables():
        table.to(reference.device)  # fp32, like this project's banks (rows cast per layer)
    memory.routers.to(reference.device, reference.dtype)  # in the model's dtype, like its own projections
    setattr(model, MEMORY_MODULE, memory)
    memory.attach(model, shape)
    model.config.move_retrofit = asdict(settings)
    return model


def memory_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The tables and routers (for their own optimiser group, or to train only them)."""
    return list(getattr(model, MEMORY_MODULE).parameters())


def load_retrofitted(path, **from_pretrained_kwargs) -> nn.Module:
    """A model saved with save_pretrained after retrofit(): the base model as
    transformers loads it, the retrofit redone, and its bank and routers read back."""
    from transformers import AutoConfig, AutoModelForCausalLM  # here: transformers is an optional extra

    path = Path(path)
    settings = getattr(AutoConfig.from_pretrained(path), CONFIG_KEY, None)
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: no {CONFIG_KEY} in its config.json; was the model retrofitted?")
    model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    layout = settings.get("layout", "move")  # saved before LaVE layouts existed: a bank
    start = float(settings.get("layer_start_bias", 0.0))  # saved before the option existed: none
    retrofit(
        model, slots=int(settings["slots"]), gate_g0=bool(settings["gate_g0"]), layout=layout, layer_start_bias=start
    )
    memory = getattr(model, MEMORY_MODULE)
    prefix = f"{MEMORY_MODULE}."
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            keys = [key for key in f.keys() if key.startswith(prefix)]  # noqa: SIM118 (a safetensors handle)
            state.update({key[len(prefix) :]: f.get_tensor(key) for key in keys})
    memory.load_state_dict(state)  # strict: a missing bank or router is an error
    return model


def retrofit_accounting(model: nn.Module) -> dict:
    """Parameters by group and matmul FLOPs per token (forward; attention scores, which
    grow with the context, not included) of a retrofitted model, as `move plan`
    reports them for this project's models."""
    memory = getattr(model, MEMORY_MODULE)
    bank = sum(t.weight.numel() for t in memory.value_tables())
    routers = sum(p.numel() for p in memory.routers.parameters())  # with the layer start's biases
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    dense = sum(p.numel() for p in model.parameters()) - bank - routers
    tied = head.data_ptr() == embedding.data_ptr()
    dense_matmul = dense - embedding.numel() + (head.numel() if tied else 0)  # every matrix but the lookup
    gates = memory.routers[0].out_features
    mix = len(memory.routers) * 2 * gates * memory.head_dim  # a weighted sum of M + 1 vectors per head
    return {
        "params": {"dense": dense, "value_memory": bank, "routers": routers, "total": dense + bank + routers},
        "flops_per_token": {
            "dense": 2 * dense_matmul,
            "routers": 2 * routers,
            "mix": mix,
            "total": 2 * dense_matmul + 2 * routers + mix,
        },
    }
