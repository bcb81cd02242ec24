"""The other memory designs (move/model/memory_designs.py) against naive references
of their formulas, causality, accounting in closed form and padded decoding (cached
decoding: tests/test_model.py; the fast path and pairing: their own test files)."""

import itertools
import json
import tomllib

import pytest
import torch
from test_model import VOCAB, assert_flops_match_a_flop_counter, make_config, randomized

from move.config import ModelConfig
from move.errors import ConfigError
from move.model.accounting import count_params, forward_flops_per_token
from move.model.diagnostics import value_memory_diagnostics
from move.model.gpt import GPT
from move.model.layers import rms_norm
from move.model.memory_designs import BigramHashEmbedding, ProductKeyMemory, bigram_hash, previous_tokens

DESIGNS = ["bigram", "pkm", "value_residual"]
SHAPES = ["mha", "gqa"]


# ---------------------------------------------------------------- hashed bigrams
def naive_bigram_row(previous: int | None, token: int, rows: int) -> int:
    """modded-nanogpt's hash, written out with Python integers."""
    if previous is None:
        return rows - 1
    return ((36313 * token) ^ (27191 * previous)) % (rows - 1)


def test_bigram_hash_matches_the_written_out_formula():
    rows = 4099
    idx = torch.randint(0, 50_000, (3, 40))
    got = bigram_hash(idx, previous_tokens(idx), rows)
    for b, t in itertools.product(range(3), range(40)):
        previous = int(idx[b, t - 1]) if t else None
        assert int(got[b, t]) == naive_bigram_row(previous, int(idx[b, t]), rows)
    assert int(got.min()) >= 0 and int(got.max()) < rows


def test_every_block_input_gets_its_scaled_bigram_row():
    """Block l's input = the previous block's output (or the normed token embedding)
    + s_l * E[h(x_{t-1}, x_t)], E read row by row with the written-out hash."""
    model = randomized(GPT(make_config("mha", "bigram", n_layer=3)))
    idx = torch.randint(0, VOCAB, (2, 9))
    inputs, outputs = [], []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
        block.register_forward_hook(lambda m, args, out: outputs.append(out))
    model(idx)
    table, rows = model.bigram.table.weight.flatten(1), model.config.bigram_rows
    expected_rows = torch.stack(
        [
            torch.stack(
                [table[naive_bigram_row(int(idx[b, t - 1]) if t else None, int(idx[b, t]), rows)] for t in range(9)]
            )
            for b in range(2)
        ]
    )
    previous = rms_norm(model.wte(idx))
    for layer in range(3):
        expected = previous + model.bigram.scales[layer] * expected_rows
        torch.testing.assert_close(inputs[layer], expected, rtol=1e-5, atol=1e-6)
        previous = outputs[layer]


def test_bigram_starts_as_the_standard_model_with_the_same_seed():
    """Zero table at initialisation: the bigram model computes what standard does."""
    standard = GPT(make_config("mha", "standard"), init_seed=3)
    bigram = GPT(make_config("mha", "bigram"), init_seed=3)
    assert torch.count_nonzero(bigram.bigram.table.weight) == 0
    assert torch.equal(bigram.bigram.scales, torch.full((3,), 0.1))
    idx = torch.randint(0, VOCAB, (2, 10))
    assert torch.equal(bigram(idx), standard(idx))


# ---------------------------------------------------------------- product keys
def naive_product_key_read(memory: ProductKeyMemory, x: torch.Tensor) -> torch.Tensor:
    """Every one of the n_keys^2 full keys [K1_i, K2_j] scored, the top-k of all of them
    taken, softmax-weighted rows summed over heads: what product keys must equal."""
    H, k, dk = memory.heads, memory.topk, memory.key_dim
    values = memory.table.weight.flatten(1)
    out = torch.zeros(*x.shape[:2], values.shape[1])
    for b, t in itertools.product(range(x.shape[0]), range(x.shape[1])):
        q = (memory.query.weight @ x[b, t]).view(H, 2, dk)
        q = q * torch.rsqrt(q.square().mean(-1, keepdim=True) + torch.finfo(q.dtype).eps)
        for h in range(H):
            full = (q[h, 0] @ memory.sub_keys[h, 0].T)[:, None] + (q[h, 1] @ memory.sub_keys[h, 1].T)[None, :]
            scores, rows = full.flatten().topk(k)
            out[b, t] += torch.softmax(scores, 0) @ values[rows]
    return out


def test_product_keys_read_what_an_exhaustive_search_reads():
    config = make_config("mha", "pkm", n_layer=2, vocab_size=400, pkm_heads=3, pkm_topk=4)
    model = randomized(GPT(config))
    memory = model.blocks[config.pkm_layer].mlp
    assert isinstance(memory, ProductKeyMemory) and memory.n_keys == config.pkm_keys
    x = torch.randn(2, 5, config.n_embd)
    torch.testing.assert_close(memory(x), naive_product_key_read(memory, x), rtol=1e-5, atol=1e-5)


def test_product_keys_replace_exactly_one_mlp():
    model = GPT(make_config("mha", "pkm", n_layer=4))
    kinds = [type(block.mlp).__name__ for block in model.blocks]
    assert kinds == ["MLP", "MLP", "ProductKeyMemory", "MLP"]


# ---------------------------------------------------------------- value residual
@pytest.mark.parametrize("shape", SHAPES)
def test_value_residual_mixes_the_first_layers_values_into_every_later_layer(shape):
    """The cached values of layer l are a_l * c_v(h_l) + b_l * c_v(h_0), with h_l the
    layer's normed input and c_v the layer's own value projection."""
    model = randomized(GPT(make_config(shape, "value_residual", n_layer=3)))
    raw = {}
    for layer, block in enumerate(model.blocks):
        block.attn.c_v.register_forward_hook(lambda m, args, out, layer=layer: raw.__setitem__(layer, out))
    idx = torch.randint(0, VOCAB, (2, 7))
    cache = model.new_cache(2, 7)
    model(idx, cache=cache)
    heads, width = model.config.kv_heads, model.config.head_dim
    torch.testing.assert_close(cache.buffers[0]["v"], raw[0].view(2, 7, heads, width))
    for layer in (1, 2):
        a, b = model.blocks[layer].attn.value_residual.lambdas
        expected = (a * raw[layer] + b * raw[0]).view(2, 7, heads, width)
        torch.testing.assert_close(cache.buffers[layer]["v"], expected, rtol=1e-6, atol=1e-6)


def test_value_residual_with_weights_one_and_zero_is_the_standard_model():
    standard = randomized(GPT(make_config("gqa", "standard")))
    residual = GPT(make_config("gqa", "value_residual"))
    residual.load_state_dict(standard.state_dict(), strict=False)
    with torch.no_grad():
        for block in residual.blocks[1:]:
            block.attn.value_residual.lambdas.copy_(torch.tensor([1.0, 0.0]))
    idx = torch.randint(0, VOCAB, (2, 10))
    torch.testing.assert_close(residual(idx), standard(idx), rtol=0, atol=0)


# ---------------------------------------------------------------- every design
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("design", DESIGNS)
def test_outputs_never_depend_on_later_tokens(shape, design):
    model = randomized(GPT(make_config(shape, design)), std=0.1)
    idx = torch.randint(0, VOCAB, (1, 12))
    changed = idx.clone()
    changed[0, 6] = (changed[0, 6] + 1) % VOCAB
    before, after = model(idx), model(changed)
    torch.testing.assert_close(after[:, :6], before[:, :6], rtol=0, atol=0)
    assert (after[:, 6:] - before[:, 6:]).abs().amax() > 1e-4  # and the change is seen from there on


@pytest.mark.parametrize("design", DESIGNS)
def test_a_left_padded_row_computes_what_it_computes_alone(design):
    """Positions restart at each row's first real token: the bigram of that token has
    no predecessor, whatever padding sits before it."""
    model = randomized(GPT(make_config("mha", design)), std=0.1)
    alone = torch.randint(0, VOCAB, (1, 6))
    padded = torch.cat([torch.full((1, 3), 7), alone], dim=1)
    key_mask = torch.tensor([[False] * 3 + [True] * 6])
    positions = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 5]])
    got = model(padded, positions=positions, key_mask=key_mask)[:, 3:]
    torch.testing.assert_close(got, model(alone), rtol=1e-5, atol=1e-5)


def closed_form(c: ModelConfig) -> dict:
    """Parameters by group and forward FLOPs of the memory, from the designs' definitions."""
    d, V, L, kv, hd = c.n_embd, c.vocab_size, c.n_layer, c.kv_heads, c.head_dim
    budget = V * c.memory_density * len(range((L - 1) % 2, L, 2)) * kv * hd  # MoVE xk's bank
    attention = d * c.n_head * hd * 2 + 2 * d * kv * hd
    mlp = 8 * d * d
    groups = dict(
        token_embedding=V * d,
        lm_head=V * d,
        transformer_matrices=L * (attention + mlp),
        routers=0,
        memory_control=0,
        value_memory=0,
        value_mixing=0,
        memory_addressing=0,
    )
    if c.value_memory == "bigram":
        groups.update(value_memory=(budget // d) * d, memory_control=L)
    elif c.value_memory == "value_residual":
        groups.update(memory_control=2 * (L - 1))
    elif c.value_memory == "pkm":
        H, k = c.pkm_heads, c.pkm_topk
        n = max(k, int((budget // d) ** 0.5))  # top-k needs at least k sub-keys
        groups.update(
            transformer_matrices=L * attention + (L - 1) * mlp,
            routers=d * H * 2 * hd,
            memory_control=H * 2 * n * hd,
            value_memory=n * n * d,
            value_mixing=2 * H * k * d,
            memory_addressing=2 * H * 2 * n * hd,
        )
    return groups


CONFIGS = [make_config(s, d) for s in SHAPES for d in DESIGNS] + [
    make_config("mha", "bigram", memory_density=4, n_layer=4),
    make_config("mha", "pkm", memory_density=4, n_layer=4, pkm_heads=2, pkm_topk=3),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.kv_heads}-{c.value_memory}-x{c.memory_density}")
def test_params_and_flops_match_the_closed_form_and_a_flop_counter(config):
    model = GPT(config)
    counts, expected = count_params(model), closed_form(config)
    for group in ["token_embedding", "lm_head", "transformer_matrices", "routers", "memory_control", "value_memory"]:
        assert counts[group] == expected[group], group
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    flops = forward_flops_per_token(config, counts)
    assert flops["value_mixing"] == expected["value_mixing"]
    assert flops["memory_addressing"] == expected["memory_addressing"]
    assert_flops_match_a_flop_counter(model, flops)


def test_tables_hold_move_x1s_parameters_on_the_small_preset():
    """Equal extra parameters: 2,048 tokens x 2 slots x 128 = 524,288 for MoVE x1."""
    small = dict(vocab_size=2048, seq_len=128, n_layer=4, n_embd=128, n_head=4)
    for design in ("move", "lave", "bigram", "pkm"):
        assert count_params(GPT(ModelConfig(**small, value_memory=design)))["value_memory"] == 524_288, design
    assert count_params(GPT(ModelConfig(**small, value_memory="pkm", memory_density=4)))["value_memory"] == 4 * 524_288


@pytest.mark.parametrize("design", DESIGNS)
def test_designs_refuse_latent_attention(design):
    with pytest.raises(ConfigError, match="MHA/GQA"):
        make_config("mla", design)


def test_bigram_rows_only_of_the_pairs_in_the_batch_get_a_gradient():
    model = randomized(GPT(make_config("mha", "bigram")))
    model.set_value_memory_grad_mode("autograd")
    idx = torch.tensor([[1, 2, 3, 4]])
    model(idx, targets=idx).backward()
    touched = model.bigram.table.weight.grad.flatten(1).abs().sum(1).nonzero().flatten()
    expected = bigram_hash(idx, previous_tokens(idx), model.config.bigram_rows).unique()
    assert touched.tolist() == expected.tolist()
    assert isinstance(model.bigram, BigramHashEmbedding)


def test_diagnostics_report_each_designs_own_quantities():
    idx = torch.tensor([[1, 2, 3, 1, 2, 3, 4, 5]])
    bigram = GPT(make_config("mha", "bigram"))
    found = value_memory_diagnostics(bigram, idx)
    rows = bigram.config.bigram_rows
    pairs = {(None, 1), (1, 2), (2, 3), (3, 1), (3, 4), (4, 5)}  # (1, 2) and (2, 3) repeat
    read = {naive_bigram_row(previous, token, rows) for previous, token in pairs}  # hashes may collide
    assert found["vm/rows_touched_frac"] == pytest.approx(len(read) / rows)
    assert found["vm/layer2/bigram_scale"] == pytest.approx(0.1) and found["vm/row_norm_max"] == 0  # zero table
    residual = value_memory_diagnostics(GPT(make_config("mha", "value_residual")), idx)
    assert residual == {f"vm/layer{layer}/{w}_values_weight": 0.5 for layer in (1, 2) for w in ("own", "first")}
    pkm = GPT(make_config("mha", "pkm", pkm_topk=2, pkm_heads=1))
    found = value_memory_diagnostics(pkm, idx)
    # 8 positions, 1 head, top-2: at most 16 distinct rows read
    assert 0 < found["vm/rows_touched_frac"] * pkm.config.pkm_keys**2 <= 16


# ---------------------------------------------------------------- the comparison table
def tiny_experiment(path, name, data, variants, steps, budgets=()):
    path.write_text(f"""
name = "{name}"
data = "{data}"
preset = "tiny"
seeds = [0, 1]
variants = {json.dumps(variants)}
{f"decay_budgets = {list(budgets)}" if budgets else ""}
[train]
steps = {steps}
batch_size = 2
eval_every = {steps}
eval_tokens = 512
checkpoint_every = 1
[sizes.tiny]
""")
    return path


def test_designs_table_compares_at_equal_params_and_at_equal_measured_time(tmp_path, prepared_dir, capsys):
    """Equal time: a design whose step costs 1.25x standard's, trained 4 steps, meets
    standard's 5-step budget; the standard budget of the text runs' length is the
    text experiment's standard run itself (a branch is a run of that length)."""
    from move.cli import main
    from move.experiments.runner import run_experiment

    text = run_experiment(
        tiny_experiment(tmp_path / "text.toml", "text", prepared_dir, ["standard", "bigram:1"], 4), tmp_path / "text"
    )
    time = run_experiment(
        tiny_experiment(tmp_path / "time.toml", "time", prepared_dir, ["standard"], 6, (4, 5)), tmp_path / "time"
    )
    knowledge = tmp_path / "knowledge"  # a stand-in: the table reads only knowledge_bits
    for variant, bits in (("standard", 10.0), ("bigram_x1", 30.0)):
        for seed in (0, 1):
            run = knowledge / "runs" / "N40" / variant / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "summary.json").write_text(json.dumps({"knowledge_bits": bits + seed, "steps": 4}))
    (knowledge / "experiment.toml").write_text(
        tiny_experiment(tmp_path / "k.toml", "k", prepared_dir, ["standard", "bigram:1"], 4)
        .read_text()
        .replace("[sizes.tiny]", "[sizes.N40]")
    )
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"512": {"standard": {"train_ratio": 1.0}, "bigram_x1": {"train_ratio": 1.25}}}))

    def bpb(run_dir):
        return json.loads((run_dir / "summary.json").read_text())["val_bpb"]

    for seed in (0, 1):  # the 4-step budget of the longer run is the text experiment's standard run
        assert bpb(time / "runs/tiny/standard" / f"seed{seed}/decay/steps_000004") == bpb(
            text / "runs/tiny/standard" / f"seed{seed}"
        )
    assert (
        main(
            [
                "designs-table",
                "--text",
                str(text),
                "--time",
                str(time),
                "--knowledge",
                str(knowledge),
                "--bench",
                str(bench),
                "--out",
                str(tmp_path / "table.md"),
            ]
        )
        == 0
    )
    row = next(line for line in (tmp_path / "table.md").read_text().splitlines() if line.startswith("| hashed"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    design = {s: bpb(text / "runs/tiny/bigram_x1" / f"seed{s}") for s in (0, 1)}
    at_5 = {s: bpb(time / "runs/tiny/standard" / f"seed{s}/decay/steps_000005") for s in (0, 1)}
    plain = {s: bpb(text / "runs/tiny/standard" / f"seed{s}") for s in (0, 1)}
    assert cells[5].startswith(f"{sum(design[s] - plain[s] for s in (0, 1)) / 2:+.4f}")
    assert cells[6].startswith(f"{sum(design[s] - at_5[s] for s in (0, 1)) / 2:+.4f}")
    assert cells[3] == "1.250" and cells[7] == "30 ± 1"
    model = tomllib.loads((text / "runs/tiny/bigram_x1/seed0/config.toml").read_text())["model"]
    assert cells[1] == f"+{ModelConfig(**model).bigram_rows * model['n_embd'] + model['n_layer']:,}"  # table + scales
