"""Every preset builds for every variant and attention kind (on the meta device:
nothing is allocated), with parameter counts by group equal to closed forms written
out here from the architecture, independently of the model code; the paper-scale
presets have the paper's sizes."""

import pytest
import torch

from move.config import LAVE_GATE_CHANNELS, MODEL_PRESETS, model_config_from_preset
from move.model.accounting import count_params
from move.model.gpt import GPT

VARIANTS = {
    "standard": {},
    "lave:1": dict(value_memory="lave", memory_density=1),
    "lave:2": dict(value_memory="lave", memory_density=2),
    **{f"move:{k}": dict(value_memory="move", memory_density=k) for k in (1, 2, 4, 8, 32)},
    "move-nog0:1": dict(value_memory="move", move_gate_g0=False),
    "lave-full:1": dict(value_memory="lave", lave_full_gates=True),
}


def attention_fields(preset: str, kind: str) -> dict:
    heads = MODEL_PRESETS[preset]["n_head"]
    return {"mha": {}, "gqa": dict(n_kv_head=heads // 2), "mla": dict(attention="mla")}[kind]


def expected_counts(preset: str, variant: dict, kind: str) -> dict:
    p = MODEL_PRESETS[preset]
    V, d, L, H = p["vocab_size"], p["n_embd"], p["n_layer"], p["n_head"]
    hd = d // H
    kv = H // 2 if kind == "gqa" else H
    mlp = 2 * d * 4 * d
    if kind == "mla":
        dc = -(-4 * hd // H) * H  # 4 x head_dim, rounded up to a multiple of the heads
        r = max(2, hd // 2)
        per_layer = d * H * (hd + r) + d * dc + d * r + 2 * dc * H * hd + H * hd * d + mlp
    else:
        per_layer = d * H * hd + 2 * d * kv * hd + H * hd * d + mlp
    memory = routers = 0
    family, k = variant.get("value_memory", "standard"), variant.get("memory_density", 1)
    lave_layers = len([i for i in range(L) if i % 2 == (L - 1) % 2])
    value_width = H * hd if kind == "mla" else kv * hd  # MLA: no GQA, every head owns a value
    heads_with_value = H if kind == "mla" else kv
    if family == "move":
        M = k * lave_layers
        width = dc if kind == "mla" else value_width  # MLA: the memory is mixed into the latent
        memory = V * M * width
        g0 = 1 if variant.get("move_gate_g0", True) else 0
        routers = L * d * heads_with_value * (M + g0)
    elif family == "lave":
        memory = lave_layers * V * k * value_width
        if variant.get("lave_full_gates"):
            routers = lave_layers * d * heads_with_value * (k + 1)
        else:
            routers = lave_layers * LAVE_GATE_CHANNELS * heads_with_value * k
    counts = {
        "token_embedding": V * d,
        "lm_head": V * d,
        "transformer_matrices": L * per_layer,
        "routers": routers,
        "memory_control": 0,
        "value_memory": memory,
    }
    return {**counts, "total": sum(counts.values())}


@pytest.mark.parametrize("kind", ["mha", "gqa", "mla"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("preset", list(MODEL_PRESETS))
def test_every_preset_builds_for_every_variant_and_attention(preset, variant, kind):
    config = model_config_from_preset(preset, **VARIANTS[variant], **attention_fields(preset, kind))
    with torch.device("meta"):
        model = GPT(config)
    assert count_params(model) == expected_counts(preset, VARIANTS[variant], kind)


@pytest.mark.parametrize(
    "preset, paper_millions, tolerance",
    [
        ("d12", 186, 0.005),
        ("d20", 561, 0.005),
        ("d32", 1880, 0.005),  # nanochat D12/D20/D32 (the paper)
        ("gpt-b", 111, 0.01),
        ("gpt-l", 343, 0.02),  # LlamaGen GPT-B / GPT-L
    ],
)
def test_paper_presets_have_the_papers_sizes(preset, paper_millions, tolerance):
    with torch.device("meta"):
        total = count_params(GPT(model_config_from_preset(preset)))["total"]
    assert abs(total / 1e6 - paper_millions) <= tolerance * paper_millions
