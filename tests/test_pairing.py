"""Paired comparisons: with one seed, every variant starts from bit-identical shared
weights. Each model here is built independently (its own call, its own global
generator state), exactly as separate runs build them - nothing is copied."""

import textwrap

import pytest
import torch

from move import api
from move.cli import build_parser, run_spec_from
from move.experiments.runner import Experiment
from move.recipes import RunSpec, build_run

SHAPES = {
    "mha": {},
    "gqa": dict(n_kv_head=1),
    "mla": dict(attention="mla", kv_latent_dim=64, rope_head_dim=8),
}
MEMORY_VARIANTS = {
    "lave x1": dict(value_memory="lave"),
    "lave x2": dict(value_memory="lave", memory_density=2),
    "lave full gates": dict(value_memory="lave", lave_full_gates=True),
    "move x1": dict(value_memory="move"),
    "move x4": dict(value_memory="move", memory_density=4),
    "move without g0": dict(value_memory="move", move_gate_g0=False),
    "hashed bigram x1": dict(value_memory="bigram"),
    "product keys x1": dict(value_memory="pkm"),
    "value residual": dict(value_memory="value_residual"),
}
OTHER_DESIGNS = ("hashed bigram x1", "product keys x1", "value residual")  # MHA/GQA only
# tiny has width 64; LaVE's gates read 32 channels, so every variant builds.
TINY = dict(vocab_size=96, n_layer=3)


def assert_shares_every_standard_tensor(standard, other):
    """Every tensor of the standard model exists in `other` with identical bits
    (except the MLP that a product-key memory replaces)."""
    theirs = other.state_dict()
    mine = standard.state_dict()
    if other.config.value_memory == "pkm":
        replaced = f"blocks.{other.config.pkm_layer}.mlp."
        assert not any(name.startswith(replaced + "c_") for name in theirs)
        mine = {name: t for name, t in mine.items() if not name.startswith(replaced)}
    assert set(mine) <= set(theirs), sorted(set(mine) - set(theirs))
    differing = [name for name, t in mine.items() if not torch.equal(t, theirs[name])]
    assert not differing, differing


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("variant", list(MEMORY_VARIANTS))
def test_public_api_builds_share_every_standard_tensor(shape, variant):
    if variant in OTHER_DESIGNS and shape == "mla":
        pytest.skip("the other memory designs run on MHA/GQA")
    standard = api.build_model("tiny", seed=7, **TINY, **SHAPES[shape])
    torch.randn(1000)  # whatever ran in between must not matter: the seed decides
    other = api.build_model("tiny", seed=7, **TINY, **SHAPES[shape], **MEMORY_VARIANTS[variant])
    assert_shares_every_standard_tensor(standard, other)
    assert other.state_dict().keys() - standard.state_dict().keys(), "the variant adds its memory and routers"


def test_another_seed_gives_other_weights_and_the_same_seed_the_same():
    a = api.build_model("tiny", seed=0, **TINY)
    b = api.build_model("tiny", seed=1, **TINY)
    c = api.build_model("tiny", seed=0, **TINY)
    random_tensors = [n for n, t in a.state_dict().items() if t.abs().sum() > 0]  # zero-init projections excluded
    assert len(random_tensors) >= 8
    assert all(not torch.equal(a.state_dict()[n], b.state_dict()[n]) for n in random_tensors)
    assert all(torch.equal(a.state_dict()[n], c.state_dict()[n]) for n in a.state_dict())


def test_deeper_baseline_shares_its_first_layers_and_memory_is_on_the_documented_scale():
    shallow = api.build_model("tiny", seed=3, **TINY)
    deeper = api.build_model("tiny", seed=3, **{**TINY, "n_layer": 5})
    common = dict(shallow.state_dict().items())
    theirs = deeper.state_dict()
    assert all(torch.equal(t, theirs[n]) for n, t in common.items())
    move = api.build_model("tiny", seed=3, **TINY, value_memory="move", memory_density=8)
    bank = move.bank.weight
    bound = 3**0.5 / move.config.n_embd**0.5
    assert bank.abs().max() <= bound and bank.abs().max() > 0.95 * bound  # U(-s, s)
    assert abs(bank.std().item() - bound / 3**0.5) < 0.02 * bound
    wte = move.wte.weight
    assert abs(wte.std().item() - 1.0) < 0.05 and abs(wte.mean().item()) < 0.05  # N(0, 1)


@pytest.mark.parametrize("variant", ["move x4", "lave x2"])
def test_symmetry_breaking_inits_change_only_what_they_name(variant):
    """router_init_scale draws the routers (gate logits of std ~s at unit-RMS input),
    memory_init_scale widens the tables' range; every other tensor keeps its bits."""
    fields = dict(**TINY, **MEMORY_VARIANTS[variant])
    paper = api.build_model("tiny", seed=5, **fields).state_dict()
    drawn = api.build_model("tiny", seed=5, router_init_scale=1.0, **fields)
    wider = api.build_model("tiny", seed=5, memory_init_scale=2.0, **fields).state_dict()
    for name, tensor in drawn.state_dict().items():
        if name.endswith("router.weight"):
            assert not tensor.eq(0).any() and paper[name].eq(0).all()
        else:
            assert torch.equal(tensor, paper[name]), name
    for name, tensor in wider.items():
        if "table" in name or name.startswith("bank"):
            torch.testing.assert_close(tensor, 2 * paper[name], rtol=1e-6, atol=0)
        else:
            assert torch.equal(tensor, paper[name]), name
    router = drawn.blocks[-1].attn.value_memory.router
    x = torch.nn.functional.rms_norm(torch.randn(8192, router.in_features), (router.in_features,))
    logit_var = router(x).pow(2).mean().item()
    weight_var = router.weight.pow(2).sum(1).mean().item()  # E[logit^2] for unit-variance inputs
    assert logit_var == pytest.approx(weight_var, rel=0.05)
    # s^2 = 1 in expectation; the estimate from n weights has relative sd sqrt(2/n): 4 sd allowed
    assert weight_var == pytest.approx(1.0, abs=4 * (2 / router.weight.numel()) ** 0.5)


def parsed_train_args(*flags):
    return build_parser().parse_args(["train", *flags])


@pytest.mark.parametrize("data_fixture", ["prepared_dir", "digits_tokens"])
def test_move_train_path_pairs_variants(request, tmp_path, data_fixture):
    """`move train` builds models from flags: text and class-conditional image models."""
    data = str(request.getfixturevalue(data_fixture))
    common = ["--data", data, "--preset", "tiny", "--seed", "5", "--n-layer", "3"]
    models = {}
    for name, flags in {
        "standard": [],
        "lave": ["--variant", "lave"],
        "move": ["--variant", "move", "--density", "2"],
        "mla-standard": ["--attention", "mla", "--kv-latent-dim", "64"],
        "mla-move": ["--attention", "mla", "--kv-latent-dim", "64", "--variant", "move"],
        "pkm": ["--variant", "pkm"],
    }.items():
        model, _, _ = build_run(run_spec_from(parsed_train_args(*common, *flags, "--out", str(tmp_path / name))))
        models[name] = model
    assert_shares_every_standard_tensor(models["standard"], models["lave"])
    assert_shares_every_standard_tensor(models["standard"], models["move"])
    assert_shares_every_standard_tensor(models["standard"], models["pkm"])
    assert_shares_every_standard_tensor(models["mla-standard"], models["mla-move"])


def test_experiment_runs_pair_variants_within_a_seed(tmp_path, prepared_dir):
    toml = tmp_path / "grid.toml"
    toml.write_text(
        textwrap.dedent(f"""
        name = "pairing"
        data = "{prepared_dir}"
        preset = "tiny"
        seeds = [0, 1]
        variants = ["standard", "lave:1", "move:1", "move:4", "move-nog0:1", "lave-full:1", "bigram:1", "pkm:2",
                    "value-residual"]
        [train]
        steps = 1
        [sizes.base]
        n_layer = 3
    """)
    )
    experiment = Experiment.load(toml)
    by_seed: dict[int, dict] = {}
    for spec in experiment.runs():
        model, _, _ = build_run(experiment.run_spec(spec))
        by_seed.setdefault(spec.seed, {})[spec.variant] = model
    for models in by_seed.values():
        for model in models.values():
            assert_shares_every_standard_tensor(models["standard"], model)
    assert not torch.equal(by_seed[0]["standard"].wte.weight, by_seed[1]["standard"].wte.weight)


def test_a_run_spec_trains_through_the_api_like_move_train(tmp_path, prepared_dir):
    """api.run(RunSpec) and `move train` with the same settings log the same losses."""
    from move.cli import main
    from move.config import TrainConfig
    from move.training.trainer import read_metrics

    fields = dict(steps=3, batch_size=2, eval_every=3, eval_tokens=512, checkpoint_every=3, seed=4)
    spec = RunSpec(data=str(prepared_dir), preset="tiny", model={"value_memory": "move"}, train=TrainConfig(**fields))
    summary = api.run(spec, out=tmp_path / "api", quiet=True)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in fields.items()]
    assert (
        main(
            [
                "train",
                "--data",
                str(prepared_dir),
                "--preset",
                "tiny",
                "--variant",
                "move",
                *flags,
                "--out",
                str(tmp_path / "cli"),
            ]
        )
        == 0
    )

    def logged(run):  # every record but the measured speed
        return [{k: v for k, v in m.items() if k != "tok_per_s"} for m in read_metrics(run)]

    assert logged(tmp_path / "api") == logged(tmp_path / "cli") and summary["steps"] == 3
