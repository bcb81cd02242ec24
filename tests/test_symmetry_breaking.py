"""Symmetry breaking between the slots of a row: the layer-assigned start
(layer_start_bias: MoVE xk begins as LaVE xk, with a trained gate bias that lets the
layers learn to share their slots) and the content-reading gate (slot_gate_channels:
each slot's gate reads the slot's own first channels)."""

import pytest
import torch

from move import api
from move.config import ModelConfig, OptimConfig
from move.errors import ConfigError
from move.model.accounting import count_params
from move.training.optim import build_optimizers

SHAPES = {"mha": {}, "gqa": dict(n_kv_head=1)}
BASE = dict(vocab_size=64, seq_len=16, n_layer=4, n_embd=64, n_head=4)


def test_lave_layers_take_the_slots_in_turn():
    config = ModelConfig(**BASE, value_memory="move", memory_density=2, layer_start_bias=3.0).validate()
    assert config.lave_layers == [1, 3] and config.n_slots == 4
    assert [config.own_slots(layer) for layer in range(4)] == [[], [0, 2], [], [1, 3]]


def test_the_bias_starts_at_zero_for_g0_and_own_slots_and_minus_b_elsewhere():
    model = api.build_model("tiny", seed=3, **BASE, value_memory="move", layer_start_bias=2.5)
    heads = model.config.kv_heads
    expected = {0: [0.0, -2.5, -2.5], 1: [0.0, 0.0, -2.5], 2: [0.0, -2.5, -2.5], 3: [0.0, -2.5, 0.0]}
    for layer, block in enumerate(model.blocks):
        bias = block.attn.value_memory.gate_bias.view(heads, -1)
        assert torch.equal(bias, torch.tensor(expected[layer]).expand(heads, 3)), layer


def random_weights(model, keep=("router", "gate_bias")):
    """The same random draw for every tensor of a given name and shape (so two models
    share their common weights), except the routers and gate biases, which keep
    their start: the output projections would otherwise be zero and hide the values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(k in name for k in keep):
                g = torch.Generator().manual_seed(sum(map(ord, name)))
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_move_with_a_large_start_bias_computes_lave_at_step_0(shape):
    """With every foreign slot's gate ~0 (bias -100), MoVE x1 is LaVE x1 whose tables
    hold the bank's slots: each LaVE layer adds its own slot with gate 1 (g0 = 1), the
    other layers add nothing. LaVE is built independently, from the same seed."""
    fields = dict(**BASE, **SHAPES[shape])
    move = api.build_model("tiny", seed=7, value_memory="move", layer_start_bias=100.0, **fields)
    lave = api.build_model("tiny", seed=7, value_memory="lave", **fields)
    random_weights(move)
    random_weights(lave)
    with torch.no_grad():
        for layer in move.config.lave_layers:
            (slot,) = move.config.own_slots(layer)
            lave.blocks[layer].attn.value_memory.table.weight.copy_(move.bank.weight[:, :, slot : slot + 1])
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(move(idx), lave(idx), rtol=1e-5, atol=1e-5)
    paper_start = api.build_model("tiny", seed=7, value_memory="move", **fields)
    random_weights(paper_start)
    assert not torch.allclose(paper_start(idx), lave(idx), atol=1e-3)  # every gate 1 is not LaVE's start


def test_the_default_builds_no_bias_and_the_option_changes_only_the_bias():
    paper = api.build_model("tiny", seed=5, **BASE, value_memory="move", memory_density=2)
    started = api.build_model("tiny", seed=5, **BASE, value_memory="move", memory_density=2, layer_start_bias=4.0)
    assert not any("gate_bias" in name for name, _ in paper.named_parameters())
    theirs = paper.state_dict()
    for name, tensor in started.state_dict().items():
        if name.endswith("gate_bias"):
            continue
        assert torch.equal(tensor, theirs[name]), name
    counts, paper_counts = count_params(started), count_params(paper)
    heads, gates = started.config.kv_heads, started.config.n_slots + 1
    assert counts["memory_control"] - paper_counts["memory_control"] == 4 * heads * gates  # 4 layers


def test_the_bias_trains_with_adamw_in_the_memory_control_group():
    model = api.build_model("tiny", seed=1, **BASE, value_memory="move", layer_start_bias=3.0)
    biases = [b.attn.value_memory.gate_bias for b in model.blocks]
    optimizers = build_optimizers(model, OptimConfig())
    adamw = [g for o in optimizers if isinstance(o, torch.optim.AdamW) for g in o.param_groups]
    group = next(g for g in adamw if any(p is biases[0] for p in g["params"]))
    assert all(any(p is b for p in group["params"]) for b in biases)
    assert group["lr"] == OptimConfig().lr_memory_control
    before = [b.detach().clone() for b in biases]
    random_weights(model)  # non-zero slots and output projections, so the gates matter
    idx = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    model(idx[:, :-1], idx[:, 1:]).backward()
    for optimizer in optimizers:
        optimizer.step()
    assert all(not torch.equal(b, a) for b, a in zip(biases, before))


def test_layer_start_bias_is_refused_outside_move():
    with pytest.raises(ConfigError, match="layer_start_bias is a MoVE option"):
        ModelConfig(**BASE, value_memory="lave", layer_start_bias=1.0).validate()
    with pytest.raises(ConfigError, match="layer_start_bias"):
        ModelConfig(**BASE, value_memory="move", layer_start_bias=-1.0).validate()


OPTIONS = {"layer start": dict(layer_start_bias=2.0), "content gate": dict(slot_gate_channels=4)}
OPTION_PARAMS = ("gate_bias", "slot_gate")


@pytest.mark.parametrize("shape", ["mha", "mla"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_cached_decoding_gates_as_the_training_forward_does(shape, option):
    """Decoding stacks the router with the value projection and mixes in fewer
    kernels; the bias and the content-reading gate must follow."""
    extra = dict(attention="mla", kv_latent_dim=64, rope_head_dim=8) if shape == "mla" else {}
    fields = dict(**BASE, **extra, value_memory="move", memory_density=2)
    model = api.build_model("tiny", seed=2, **fields, **OPTIONS[option])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(OPTION_PARAMS):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    idx = torch.randint(0, 64, (2, 12), generator=g)
    full = model(idx)
    cache = model.new_cache(2, 12)
    with torch.no_grad():
        pieces = [model(idx[:, :5], cache=cache)] + [model(idx[:, t : t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)
    without = api.build_model("tiny", seed=2, **fields)
    without.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith(OPTION_PARAMS)})
    assert not torch.allclose(without(idx), full, atol=1e-4)  # the option is what the check is about


def test_the_content_gate_adds_each_slots_own_reading_to_its_logit():
    """read_slots against the formula written out: logit_m + sum_c u[h, c] m[..., c]
    for the slots, g0 untouched; equal slots get equal gates, different ones do not."""
    model = api.build_model("tiny", seed=4, **BASE, value_memory="move", memory_density=2, slot_gate_channels=3)
    memory = model.blocks[1].attn.value_memory
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, memory.heads, 1 + memory.slots, generator=g)
    values = torch.randn(2, 5, memory.heads, memory.slots, 16, generator=g)
    values[:, :, :, 1] = values[:, :, :, 0]  # slots 0 and 1 hold the same content
    out = memory.read_slots(logits, values)
    u = memory.slot_gate.detach()
    expected = logits.clone()
    for h in range(memory.heads):
        for m in range(memory.slots):
            expected[:, :, h, 1 + m] += sum(u[h, c] * values[:, :, h, m, c] for c in range(3))
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[..., 0], logits[..., 0])
    torch.testing.assert_close(out[..., 1] - logits[..., 1], out[..., 2] - logits[..., 2])
    assert not torch.allclose(out[..., 3] - logits[..., 3], out[..., 1] - logits[..., 1])


def test_the_content_gate_changes_only_its_own_weights_and_counts_them():
    paper = api.build_model("tiny", seed=5, **BASE, value_memory="move")
    reading = api.build_model("tiny", seed=5, **BASE, value_memory="move", slot_gate_channels=4)
    theirs = paper.state_dict()
    for name, tensor in reading.state_dict().items():
        if name.endswith("slot_gate"):
            assert tensor.std() > 0.3  # N(0, 1/4)
            continue
        assert torch.equal(tensor, theirs[name]), name
    heads = reading.config.kv_heads
    assert count_params(reading)["memory_control"] - count_params(paper)["memory_control"] == 4 * heads * 4
    with pytest.raises(ConfigError, match="slot_gate_channels is a MoVE option"):
        ModelConfig(**BASE, value_memory="lave", slot_gate_channels=2).validate()
    with pytest.raises(ConfigError, match="slot width per head"):
        ModelConfig(**BASE, value_memory="move", slot_gate_channels=1000).validate()


def test_with_every_gate_at_one_the_slots_of_a_row_get_the_same_gradient():
    """The paper's start (zero routers: every gate exactly 1): whatever the slots hold,
    slot m's gradient is sum over layers and positions of g_m dL/dv', the same for
    every m, so Adam moves every slot of a row by the same step (the symmetry the layer
    start breaks). With the layer start the gradients differ."""
    for start, same in ((0.0, True), (3.0, False)):
        model = api.build_model("tiny", seed=1, **BASE, value_memory="move", memory_density=2, layer_start_bias=start)
        random_weights(model)  # slots differ; the routers and gate biases stay as they start
        idx = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
        model(idx[:, :-1], idx[:, 1:]).backward()
        grad = model.value_tables()[0].weight.grad  # (vocab, heads, slots, width)
        assert grad.abs().max() > 0
        equal = all(torch.allclose(grad[:, :, m], grad[:, :, 0], rtol=1e-5, atol=1e-8) for m in range(4))
        assert equal is same
