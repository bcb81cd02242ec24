"""Core model: value-memory formula, identity at init, causality, KV cache,
accounting, checkpoints, bank gradients."""

import itertools
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from move.api import build_model
from move.config import OTHER_MEMORY_DESIGNS, ModelConfig, TrainConfig
from move.errors import CheckpointError, ConfigError, TokenRangeError
from move.model.accounting import count_params, forward_flops_per_token
from move.model.gpt import GPT
from move.model.layers import rms_norm
from move.model.sampling import compiled_decode_step, decode_step, generate
from move.training.checkpoint import header_checksum, load_model, save_checkpoint
from move.training.trainer import prepare_model

VOCAB = 50
SHAPES = {  # attention kind -> extra config
    "mha": dict(attention="mha"),
    "gqa": dict(attention="mha", n_kv_head=2),
    "mla": dict(attention="mla", kv_latent_dim=48, rope_head_dim=8),
}
VARIANTS = ["standard", "lave", "move"]


def make_config(shape="mha", variant="move", **kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, seq_len=16, n_layer=3, n_embd=64, n_head=4, value_memory=variant)
    return ModelConfig(**{**base, **SHAPES[shape], **kw}).validate()


def randomized(model: GPT, seed=0, std=0.2) -> GPT:
    """Random weights everywhere: zero-initialised routers and projections would
    otherwise hide mistakes in the gates and in the cached values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def capture_memory_calls(model):
    """Record (module, (x, v, idx, bank_slots), output) of every LayerValueMemory
    call, x being the normed block input its attention layer (and router) read."""
    calls, block_inputs, hooks = [], {}, []
    for block in model.blocks:
        memory = block.attn.value_memory
        if memory is None:
            continue
        hooks.append(
            block.attn.register_forward_pre_hook(
                lambda mod, inp, memory=memory: block_inputs.__setitem__(memory, inp[0])
            )
        )
        hooks.append(
            memory.register_forward_hook(
                lambda mod, inp, out: calls.append((mod, (block_inputs[mod], inp[0], inp[2], inp[3]), out))
            )
        )
    return calls, hooks


# ---------------------------------------------------------------- mixing formula
def naive_move_mix(x, v, idx, router_w, bank_spec, heads, slots, gate_g0):
    """Spec formula with explicit loops. bank_spec is (vocab, M, d_v) as in the paper."""
    B, T, _ = x.shape
    width = bank_spec.shape[-1] // heads
    out = torch.empty_like(v)
    for b, t, h in itertools.product(range(B), range(T), range(heads)):
        logits = (router_w @ x[b, t]).view(heads, slots + int(gate_g0))
        g = 2 * torch.sigmoid(logits[h])
        acc = g[0] * v[b, t, h] if gate_g0 else v[b, t, h].clone()
        for i in range(slots):
            gi = g[i + 1] if gate_g0 else g[i]
            acc = acc + gi * bank_spec[idx[b, t], i, h * width : (h + 1) * width]
        out[b, t, h] = acc
    return out


# with autograd on (training: mix_values) and off (decoding, evaluation: mix_inference)
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("gate_g0", [True, False])
def test_move_mixing_matches_naive_formula(shape, gate_g0, grad):
    config = make_config(shape, "move", move_gate_g0=gate_g0)
    model = randomized(GPT(config))
    idx = torch.randint(0, VOCAB, (2, 5))
    calls, _ = capture_memory_calls(model)
    with torch.set_grad_enabled(grad):
        model(idx)
    assert len(calls) == config.n_layer
    H, M = config.kv_heads, config.n_slots
    bank_spec = model.bank.weight.permute(0, 2, 1, 3).reshape(VOCAB, M, -1)  # (vocab, M, d_v)
    for layer, (module, (x, v, _idx_in, _), out) in enumerate(calls):
        attn = model.blocks[layer].attn
        # the value the memory is mixed into is the standard value (MLA: the normed latent)
        if shape == "mla":
            expected_v = rms_norm(attn.c_kv_down(x)).view(2, 5, H, -1)
        else:
            expected_v = attn.c_v(x).view(2, 5, H, -1)
        torch.testing.assert_close(v, expected_v)
        naive = naive_move_mix(x, v, idx, module.router.weight, bank_spec, H, M, gate_g0)
        torch.testing.assert_close(out, naive, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "inference"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_lave_mixing_matches_naive_formula(shape, grad):
    config = make_config(shape, "lave", n_layer=4, memory_density=2)
    model = randomized(GPT(config))
    idx = torch.randint(0, VOCAB, (2, 5))
    calls, _ = capture_memory_calls(model)
    with torch.set_grad_enabled(grad):
        model(idx)
    assert [c[0] for c in calls] == [model.blocks[i].attn.value_memory for i in (1, 3)]  # i % 2 == (L-1) % 2
    H, k = config.kv_heads, 2
    for module, (x, v, _idx_in, _), out in calls:
        expected = v.clone()
        for b, t, h, j in itertools.product(range(2), range(5), range(H), range(k)):
            gate = 2 * torch.sigmoid(module.router.weight.view(H, k, 32)[h, j] @ x[b, t, :32])
            expected[b, t, h] += gate * module.table.weight[idx[b, t], h, j]
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- identity at init
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("variant,extra", [("move", {}), ("lave", {}), ("lave", {"lave_full_gates": True})])
def test_gates_start_at_one_and_zero_memory_equals_standard(shape, variant, extra):
    torch.manual_seed(0)
    config = make_config(shape, variant, **extra)
    model = GPT(config)
    x = torch.randn(2, 5, config.n_embd)
    for block in model.blocks:
        m = block.attn.value_memory
        if m is not None:
            projection = block.attn.c_kv_down if shape == "mla" else block.attn.c_v
            gates = m.gate_values(m.project(x, projection, None, 0)[1])
            assert torch.equal(gates, torch.ones_like(gates))
    # same shared weights, memory zeroed -> exactly the standard model's logits
    standard = randomized(GPT(make_config(shape, "standard")))
    missing, unexpected = model.load_state_dict(standard.state_dict(), strict=False)
    assert not unexpected and all("bank" in n or "value_memory" in n for n in missing)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bank" in name or "table" in name:
                p.zero_()
    idx = torch.randint(0, VOCAB, (2, 12))
    assert torch.equal(model(idx), standard(idx))


# ---------------------------------------------------------------- token indexing and causality
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("variant", ["move", "lave"])
def test_changing_a_bank_row_changes_outputs_only_from_its_first_occurrence(shape, variant):
    model = randomized(GPT(make_config(shape, variant)))
    idx = torch.tensor([[1, 2, 3, 4, 7, 5, 7, 6, 1, 2]])
    before = model(idx)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bank" in name or "table" in name:
                p[7] += 1.0
    after = model(idx)
    changed = (after - before).abs().amax(dim=-1)[0] > 1e-6
    assert changed.tolist() == [False] * 4 + [True] * 6


# ---------------------------------------------------------------- KV cache
# a growing cache (int positions) and a static one (tensor position, whole-buffer attention)
@pytest.mark.parametrize("static", [False, True], ids=["growing", "static"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("variant", VARIANTS + list(OTHER_MEMORY_DESIGNS))
def test_cached_decoding_equals_full_forward(shape, variant, static):
    if variant in OTHER_MEMORY_DESIGNS and shape == "mla":
        pytest.skip("the other memory designs run on MHA/GQA")
    model = randomized(GPT(make_config(shape, variant)), std=0.1)
    idx = torch.randint(0, VOCAB, (2, 12))
    full = model(idx)  # with autograd: the training path
    cache = model.new_cache(2, 12, static=static)
    with torch.no_grad():  # decoding: router stacked with the value projection, mix_inference
        pieces = [model(idx[:, :4], cache=cache), model(idx[:, 4:7], cache=cache)]  # prefill, then a chunk
        pieces += [model(idx[:, t : t + 1], cache=cache) for t in range(7, 12)]  # then token by token
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


class LowRankAdapted(torch.nn.Linear):
    """A LoRA-like layer: its weight plus a low-rank update that is not in .weight."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2):
        super().__init__(base.in_features, base.out_features, bias=False)
        self.weight = base.weight
        g = torch.Generator().manual_seed(1)
        self.down = torch.nn.Parameter(torch.randn(rank, base.in_features, generator=g) * 0.3)
        self.up = torch.nn.Parameter(torch.randn(base.out_features, rank, generator=g) * 0.3)

    def forward(self, x):
        return super().forward(x) + x @ self.down.T @ self.up.T


@pytest.mark.parametrize("shape", ["mha", "mla"])
@pytest.mark.parametrize("wrap", ["adapter", "hook"])
def test_cached_decoding_honours_whatever_wraps_the_value_projection(shape, wrap):
    """Decoding stacks the value projection with the router, which is right only for a
    plain Linear: an adapter on the projection (LoRA) or a forward hook must still be
    applied with a cache, or cached text differs from the full forward."""
    model = randomized(GPT(make_config(shape, "move")), std=0.1)
    name = "c_kv_down" if shape == "mla" else "c_v"
    for block in model.blocks:
        if wrap == "adapter":
            setattr(block.attn, name, LowRankAdapted(getattr(block.attn, name)))
        else:
            getattr(block.attn, name).register_forward_hook(lambda m, args, out: out * 1.5 + 0.1)
    idx = torch.randint(0, VOCAB, (2, 10))
    full = model(idx)
    cache = model.new_cache(2, 10)
    with torch.no_grad():
        pieces = [model(idx[:, :4], cache=cache)] + [model(idx[:, t : t + 1], cache=cache) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


def cache_bytes(config, T=8):
    model = GPT(config)
    cache = model.new_cache(1, T)
    model(torch.zeros(1, T, dtype=torch.long), cache=cache)
    return cache.nbytes()


def test_mla_move_cache_is_as_small_as_mla_standard_and_lave_is_not():
    standard = cache_bytes(make_config("mla", "standard"))
    assert cache_bytes(make_config("mla", "move", memory_density=4)) == standard
    assert cache_bytes(make_config("mla", "lave")) > standard
    # MHA with memory caches exactly k and v like the standard model
    assert cache_bytes(make_config("mha", "move")) == cache_bytes(make_config("mha", "standard"))


# ---------------------------------------------------------------- accounting
def closed_form_params(c: ModelConfig) -> dict:
    d, V, L, H, hd = c.n_embd, c.vocab_size, c.n_layer, c.n_head, c.head_dim
    if c.attention == "mla":
        dc, r = c.kv_latent_width, c.rope_width
        attn = d * H * (hd + r) + d * dc + d * r + 2 * dc * H * hd + H * hd * d
        kv = H
    else:
        kv = c.n_kv_head or H
        attn = d * H * hd * 2 + 2 * d * kv * hd
    mlp = 8 * d * d
    L_mem = L if c.value_memory == "move" else (len(range((L - 1) % 2, L, 2)) if c.value_memory == "lave" else 0)
    if c.value_memory == "move":
        M = c.memory_slots or c.memory_density * len(range((L - 1) % 2, L, 2))
        width = c.kv_latent_width if c.attention == "mla" else kv * hd
        routers = L * d * kv * (M + int(c.move_gate_g0))
        memory = V * M * width
        slots = M
    elif c.value_memory == "lave":
        k = c.memory_density
        routers = L_mem * (d * kv * (k + 1) if c.lave_full_gates else 32 * kv * k)
        memory = L_mem * k * V * kv * hd
        slots = k
        width = kv * hd
    else:
        routers = memory = slots = width = 0
    return dict(
        token_embedding=V * d,
        lm_head=V * d,
        transformer_matrices=L * (attn + mlp),
        routers=routers,
        value_memory=memory,
        mixing_flops=L_mem * 2 * slots * width,
    )


CONFIGS = [make_config(s, v) for s in SHAPES for v in VARIANTS] + [
    make_config("mha", "move", memory_density=4, n_layer=4),
    make_config("gqa", "move", memory_slots=5, move_gate_g0=False),
    make_config("mha", "lave", memory_density=2, lave_full_gates=True, n_layer=4),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.attention}-{c.kv_heads}-{c.value_memory}-{c.n_slots}")
def test_param_and_flop_counts_match_closed_form(config):
    model = GPT(config)
    counts = count_params(model)
    expected = closed_form_params(config)
    for group in ["token_embedding", "lm_head", "transformer_matrices", "routers", "value_memory"]:
        assert counts[group] == expected[group], group
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    flops = forward_flops_per_token(config, counts)
    if config.value_memory == "move":  # the paper's router cost: 2 * d_model * H * (M+1) per layer
        per_layer = 2 * config.n_embd * config.kv_heads * (config.n_slots + int(config.move_gate_g0))
        assert flops["routers"] == config.n_layer * per_layer
    assert flops["value_mixing"] == expected["mixing_flops"]
    assert_flops_match_a_flop_counter(model, flops)


def assert_flops_match_a_flop_counter(model, flops: dict) -> None:
    """An independent count: torch's FLOP counter over a real forward (math SDPA so
    attention is visible to it); lookups are free, so memory tables add nothing."""
    idx = torch.zeros(2, model.config.seq_len, dtype=torch.long)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx)
    assert counter.get_total_flops() == flops["total"] * idx.numel()


def test_move_x1_has_exactly_lave_x1_value_memory():
    for L in (2, 3, 4, 12):
        lave = count_params(GPT(make_config("mha", "lave", n_layer=L)))["value_memory"]
        move = count_params(GPT(make_config("mha", "move", n_layer=L)))["value_memory"]
        assert lave == move > 0


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("shape", ["gqa", "mla"])
def test_save_load_gives_identical_outputs(tmp_path, shape):
    model = randomized(GPT(make_config(shape, "move")))
    save_checkpoint(tmp_path / "ck", model, meta={"step": 3})
    loaded, header = load_model(tmp_path / "ck")
    idx = torch.randint(0, VOCAB, (2, 8))
    assert torch.equal(loaded(idx), model(idx))
    assert header["meta"]["step"] == 3


def test_mismatched_checkpoint_is_refused_with_the_mismatch_named(tmp_path):
    save_checkpoint(tmp_path / "ck", GPT(make_config("mha", "move")))
    header_path = tmp_path / "ck" / "config.json"
    header = json.loads(header_path.read_text())
    header["model_config"]["rope_base"] = 500.0  # an edit by hand: refused, it would change the results silently
    header_path.write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match=r"config\.json: checksum mismatch"):
        load_model(tmp_path / "ck")
    header["model_config"]["rope_base"] = 10000.0
    header["model_config"]["memory_slots"] = 7  # on disk M=2: routers 4*(2+1) x 64
    header["header_sha256"] = header_checksum(header)  # (as a deliberate rewrite would)
    header_path.write_text(json.dumps(header))
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch for blocks.0.attn.value_memory.router.weight: checkpoint \(12, 64\) vs model \(32, 64\)",
    ):
        load_model(tmp_path / "ck")
    header["model_config"]["value_memory"] = "standard"
    header["header_sha256"] = header_checksum(header)
    header_path.write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match=r"unexpected tensor bank\.weight"):
        load_model(tmp_path / "ck")


def test_corrupted_weights_are_refused(tmp_path):
    save_checkpoint(tmp_path / "ck", GPT(make_config("mha", "standard")))
    weights = tmp_path / "ck" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_model(tmp_path / "ck")


# ---------------------------------------------------------------- gradients and validation
@pytest.mark.parametrize("variant", ["move", "lave"])
def test_bank_gradient_only_at_rows_of_tokens_in_the_batch(variant):
    model = randomized(GPT(make_config("mha", variant)))
    idx = torch.tensor([[3, 9, 9, 17], [40, 3, 22, 17]])
    model(idx, targets=torch.roll(idx, -1, 1)).backward()
    used = sorted(set(idx.flatten().tolist()))
    for name, p in model.named_parameters():
        if "bank" in name or "table" in name:
            nonzero_rows = (p.grad.flatten(1).abs().sum(1) > 0).nonzero().flatten().tolist()
            assert nonzero_rows == used


def test_token_ids_out_of_range_are_refused_where_they_enter():
    model = GPT(make_config("mha", "move"))
    with pytest.raises(TokenRangeError, match=r"token ids must lie in \[0, 50\)"):
        model.check_token_ids(torch.tensor([[1, 50]]))
    with pytest.raises(TokenRangeError):
        generate(model, torch.tensor([[-1]]), 2)


@pytest.mark.parametrize(
    "fields",
    [
        dict(),
        dict(value_memory="move", memory_density=2),
        dict(value_memory="lave"),
        dict(value_memory="move", attention="mla"),
    ],
    ids=["standard", "move", "lave", "mla-move"],
)
def test_the_training_forward_breaks_the_graph_only_at_the_excluded_value_memory_functions(fields):
    """No host synchronisation (an id range check read back with int()) and nothing
    else dynamo cannot trace in the training forward: a standard model is one graph,
    and a memory model breaks only where the fast path's lookup and fast_mix are
    excluded from compilation on purpose (their side channel). Without autograd
    (decoding, evaluation) every model is one graph."""
    model = build_model("tiny", vocab_size=512, **fields)
    prepare_model(model, TrainConfig())
    x = torch.randint(512, (2, 64))
    explained = torch._dynamo.explain(model)(x, targets=x)
    reasons = [str(b.reason) for b in explained.break_reasons]
    assert all("torch.compiler.disable" in r and ("_fast_path_slots" in r or "fast_mix" in r) for r in reasons)
    assert (explained.graph_break_count == 0) == (not fields)
    with torch.no_grad():
        assert torch._dynamo.explain(model)(x).graph_break_count == 0


@pytest.mark.parametrize(
    "bad,message",
    [
        (dict(n_embd=65), "does not divide n_embd"),
        (dict(n_kv_head=3), "does not divide n_head"),
        (dict(attention="mla", kv_latent_dim=50, value_memory="move"), "divisible by n_head"),
        (dict(value_memory="moe"), "unknown value_memory"),
        (dict(n_layer=0), "n_layer must be positive"),
        (dict(memory_slots=-1), "memory_slots must be >= 0"),
    ],
)
def test_impossible_configs_are_refused(bad, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**dict(vocab_size=VOCAB, n_embd=64, n_head=4), **bad}).validate()


# ---------------------------------------------------------------- generation
@pytest.mark.parametrize("shape", list(SHAPES))
def test_greedy_generation_equals_repeated_full_forward(shape):
    model = randomized(GPT(make_config(shape, "move")), std=0.1)
    prompt = torch.randint(0, VOCAB, (3, 4))
    out = generate(model, prompt, 6, temperature=0)
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize(
    "shape,variant",
    [
        ("mha", "move"),
        pytest.param("mla", "move", marks=pytest.mark.slow),
        pytest.param("gqa", "lave", marks=pytest.mark.slow),
        pytest.param("mha", "standard", marks=pytest.mark.slow),
        pytest.param("mha", "bigram", marks=pytest.mark.slow),
        pytest.param("mha", "pkm", marks=pytest.mark.slow),
        pytest.param("mha", "value_residual", marks=pytest.mark.slow),
    ],
)
def test_compiled_decoding_step_equals_eager_and_compiles_once(shape, variant):
    """The compiled single-token step against a static cache gives the eager step's
    logits at every position, from one graph (a position baked into the graph would
    recompile at every token), reused by a second cache of the same shape."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = randomized(GPT(make_config(shape, variant)), std=0.1).eval()
    idx = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        for _ in range(2):
            eager_cache, compiled_cache = model.new_cache(2, 10, static=True), model.new_cache(2, 10, static=True)
            model(idx[:, :4], cache=eager_cache)
            model(idx[:, :4], cache=compiled_cache)
            for t in range(4, 10):
                eager = decode_step(model, idx[:, t : t + 1], eager_cache)
                compiled = compiled_decode_step(model, idx[:, t : t + 1], compiled_cache)
                torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    prompt = idx[:, :3]
    assert torch.equal(
        generate(model, prompt, 5, temperature=0, compiled=True), generate(model, prompt, 5, temperature=0)
    )


def test_compiled_generate_serves_many_lengths_in_one_process_from_one_graph():
    """A notebook or server calls generate(compiled=True) with a new length each time:
    cache lengths are bucketed (powers of two from STATIC_CACHE_MIN), so the lengths of
    one bucket share one graph, and 10 lengths neither recompile nor reach dynamo's
    recompile limit (8), which fullgraph turns into an error."""
    from move.model.sampling import STATIC_CACHE_MIN, static_cache_length

    assert [static_cache_length(n) for n in (1, STATIC_CACHE_MIN, STATIC_CACHE_MIN + 1)] == [
        STATIC_CACHE_MIN,
        STATIC_CACHE_MIN,
        2 * STATIC_CACHE_MIN,
    ]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = randomized(GPT(make_config("mha", "move")), std=0.1).eval()
    prompt = torch.randint(0, VOCAB, (1, 3))
    for n in range(2, 12):
        assert torch.equal(generate(model, prompt, n, temperature=0, compiled=True), generate(model, prompt, n, 0))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("variant", ["standard", "lave", "move", *OTHER_MEMORY_DESIGNS])
def test_backward_inside_autocast_works_for_every_variant(variant):
    """Many user loops call loss.backward() inside the autocast block; the tables'
    custom backwards must accept the low-precision gradients it produces."""
    model = randomized(GPT(make_config("mha", variant)), std=0.1)
    prepare_model(model, TrainConfig())
    idx = torch.randint(0, VOCAB, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, targets=idx)
        loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("t_q,offset", [(6, 0), (1, 5), (2, 4)])
def test_padding_mla_values_to_the_query_width_changes_nothing(t_q, offset):
    """On CUDA MLA's narrower values are zero-padded to the query width so that SDPA
    can use its flash kernel: the same output as unpadded attention, in every branch
    (causal prefill, one cached query, a chunk appended to a cache)."""
    from move.model.attention import causal_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, t_q, 4, 24, generator=g)
    k, v = torch.randn(2, offset + t_q, 4, 24, generator=g), torch.randn(2, offset + t_q, 4, 16, generator=g)
    padded = causal_attention(q, k, v, offset, pad_values=True)
    assert padded.shape == (2, t_q, 4, 16)
    torch.testing.assert_close(padded, causal_attention(q, k, v, offset, pad_values=False), rtol=1e-5, atol=1e-6)


def test_bank_rows_are_cast_once_per_forward_under_autocast():
    """MoVE's gathered rows are shared by every layer: under autocast they are cast to
    bf16 once (forward and backward together), not once per layer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CastsOfBankRows(TorchDispatchMode):
        def __init__(self, shape):
            super().__init__()
            self.shape, self.count = shape, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten._to_copy and tuple(args[0].shape) == self.shape:
                self.count += 1
            return func(*args, **(kwargs or {}))

    model = randomized(GPT(make_config("mha", "move", n_layer=4, memory_slots=3)), std=0.1)  # 3 slots, 4 layers
    prepare_model(model, TrainConfig())
    idx = torch.randint(0, VOCAB, (2, 8))
    heads, slots, width = model.bank.weight.shape[1:]
    with CastsOfBankRows((2, 8, heads, slots, width)) as casts, torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx, targets=idx).backward()
    assert casts.count == 1


def test_sampling_is_seeded_and_respects_top_k():
    model = randomized(GPT(make_config("mha", "move")), std=0.1)
    prompt = torch.randint(0, VOCAB, (4, 3))
    a = generate(model, prompt, 10, temperature=1.0, top_k=5, seed=7)
    b = generate(model, prompt, 10, temperature=1.0, top_k=5, seed=7)
    c = generate(model, prompt, 10, temperature=1.0, top_k=5, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # with top_k=1 sampling is greedy
    assert torch.equal(generate(model, prompt, 5, top_k=1, seed=3), generate(model, prompt, 5, temperature=0))


def test_a_table_shard_draws_exactly_its_rows_of_the_whole_table():
    """Row-block initialisation: any contiguous slice of rows, drawn alone, equals that
    slice of the whole table (what lets each rank of a job draw only its shard)."""
    from move.model.gpt import ROW_BLOCK, _init_rows

    rows = 3 * ROW_BLOCK + 17
    whole = torch.empty(rows, 2, 3)
    _init_rows(whole, 7, "bank", 0.5)
    assert whole.abs().max() <= 0.5 and abs(whole.std().item() - 0.5 / 3**0.5) < 0.01
    assert not torch.equal(whole[:ROW_BLOCK], whole[ROW_BLOCK : 2 * ROW_BLOCK])  # blocks are not repeats
    for world in (2, 3, 7):
        per_rank = -(-rows // world)
        for rank in range(world):
            start, stop = min(rank * per_rank, rows), min((rank + 1) * per_rank, rows)
            part = torch.empty(stop - start, 2, 3)
            _init_rows(part, 7, "bank", 0.5, first_row=start)
            assert torch.equal(part, whole[start:stop]), (world, rank)


@pytest.mark.parametrize("variant", ["move", "lave"])
def test_a_model_built_empty_and_sharded_initialises_like_the_whole_model(variant):
    """Start-up under torchrun: built on the meta device, tables cut to one rank's rows,
    then allocated and initialised: every dense tensor and the rank's rows equal the
    model built whole with the same seed."""
    config = make_config("mha", variant)
    whole = GPT(config, init_seed=5)
    with torch.device("meta"):
        sharded = GPT(config, init_seed=5)
    for table in sharded.value_tables():
        table.shard_rows(rank=1, world_size=3)
    sharded.materialize("cpu")
    reference = whole.state_dict()
    for key, value in sharded.state_dict().items():
        expected = reference[key]
        if value.shape != expected.shape:  # a sharded table: rank 1's rows
            start = -(-expected.shape[0] // 3)
            expected = expected[start : start + value.shape[0]]
        assert torch.equal(value, expected), key
    assert torch.equal(sharded._rotary(3, "cpu")[0], whole._rotary(3, "cpu")[0])  # rebuilt, not left empty


def test_generate_decodes_under_the_devices_autocast(monkeypatch):
    """generate (and so `move sample`) runs its forwards under move.device.autocast of
    the prompt's device: bf16 on CUDA, as training; nothing on a CPU."""
    import contextlib

    import move.model.sampling as sampling

    seen = []

    def recording_autocast(device):
        seen.append(torch.device(device))
        return contextlib.nullcontext()

    monkeypatch.setattr(sampling, "autocast", recording_autocast)
    model = randomized(GPT(make_config("mha", "move")), std=0.1)
    generate(model, torch.randint(0, VOCAB, (1, 3)), 2, temperature=0)
    assert seen == [torch.device("cpu")]


def test_tf32_is_allowed_on_cuda_unless_the_user_chose_a_precision():
    from move.device import allow_tf32

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")  # torch's default
        allow_tf32(torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == "highest"
        allow_tf32(torch.device("cuda"))  # a setting only: no CUDA device needed
        assert torch.get_float32_matmul_precision() == "high"
        torch.set_float32_matmul_precision("medium")  # the user's choice stays
        allow_tf32(torch.device("cuda"))
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
