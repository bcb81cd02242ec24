"""`move train --init-from`: value memory added to a trained checkpoint computes the
source's function at step 0, mismatches are refused in one line, and a continued run
resumes like any other."""

import shutil

import pytest
import torch
from test_training import Crash, crash_after

from move.cli import main
from move.errors import ConfigError
from move.recipes import RunSpec, build_run, resolve_checkpoint, start_training
from move.training.checkpoint import load_model
from move.training.trainer import TrainConfig

SHAPES = {"mha": {}, "gqa": {"n_kv_head": 2}, "mla": {"attention": "mla", "kv_latent_dim": 32}}
SHORT = dict(batch_size=4, eval_every=4, eval_tokens=2048, checkpoint_every=4)


def train(prepared_dir, run_dir, steps=4, resume=False, **fields):
    init_from = fields.pop("init_from", "")
    spec = RunSpec(
        str(prepared_dir), "tiny", model=fields, train=TrainConfig(steps=steps, init_from=init_from, **SHORT)
    )
    return start_training(spec, run_dir, resume=resume, quiet=True)


def grown(prepared_dir, source_dir, **fields) -> torch.nn.Module:
    spec = RunSpec(str(prepared_dir), "tiny", model=fields, train=TrainConfig(init_from=str(source_dir), **SHORT))
    return build_run(spec)[0]


# (source fields, new model fields). Memory added to a standard model is exact: v + 0.
# Slots added to trained memory join the mix's dot product as zero terms, which can
# change how a kernel rounds the sum (one fused multiply-add more or less): equal to
# rounding, not bit for bit.
GROWTHS = {
    "standard -> MoVE x1": ({}, {"value_memory": "move"}),
    "standard -> MoVE x4": ({}, {"value_memory": "move", "memory_density": 4}),
    "standard -> LaVE x1": ({}, {"value_memory": "lave"}),
    "MoVE x1 -> MoVE x4": ({"value_memory": "move"}, {"value_memory": "move", "memory_density": 4}),
    # the layer-assigned start's gate bias: a paper-start source has none (its gates take
    # a bias of 0); a layer-start source's bias is kept for its gates
    "MoVE x1 -> MoVE x4 layer start": (
        {"value_memory": "move"},
        {"value_memory": "move", "memory_density": 4, "layer_start_bias": 4.0},
    ),
    "MoVE x1 layer start -> MoVE x4 layer start": (
        {"value_memory": "move", "layer_start_bias": 4.0},
        {"value_memory": "move", "memory_density": 4, "layer_start_bias": 4.0},
    ),
    "LaVE x1 -> LaVE x2": ({"value_memory": "lave"}, {"value_memory": "lave", "memory_density": 2}),
    "LaVE -> LaVE with full gates": ({"value_memory": "lave"}, {"value_memory": "lave", "lave_full_gates": True}),
}


def assert_same(a, b, exact):
    if exact:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("growth", list(GROWTHS))
def test_the_grown_model_computes_the_sources_function(prepared_dir, tmp_path, shape, growth):
    before, after = GROWTHS[growth]
    train(prepared_dir, tmp_path / "source", **before, **SHAPES[shape]).run()  # trained: its memory is not zero
    source, _ = load_model(resolve_checkpoint(tmp_path / "source"))
    model = grown(prepared_dir, tmp_path / "source", **after, **SHAPES[shape])
    assert model.config.value_memory == after["value_memory"]
    x = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    source.eval(), model.eval()
    exact = "value_memory" not in before
    with torch.no_grad():
        assert_same(model(x), source(x), exact)
    # the training forward (autograd on, the fast path) too
    assert_same(model(x, targets=x), source(x, targets=x), exact)
    for name, t in source.state_dict().items():  # every source tensor kept (tables: as the first slots)
        mine = model.state_dict()[name]
        if "router" not in name and "gate_bias" not in name:  # gain gates per head: the logits test them
            assert torch.equal(mine[:, :, : t.shape[2]] if mine.dim() == 4 else mine, t), name


@pytest.mark.parametrize(
    "fields,named",
    [
        ({"n_embd": 128}, "n_embd"),
        ({"vocab_size": 600}, "vocab_size"),
        ({"attention": "mla", "kv_latent_dim": 32}, "attention"),
        ({"n_layer": 3}, "n_layer"),
    ],
)
def test_a_mismatched_source_is_refused_naming_the_difference(prepared_dir, tmp_path, fields, named):
    train(prepared_dir, tmp_path / "source", steps=4).run()
    with pytest.raises(ConfigError, match=f"{named} is .* there and .* here"):
        grown(prepared_dir, tmp_path / "source", value_memory="move", **fields)


def test_memory_that_would_be_dropped_or_shrunk_is_refused(prepared_dir, tmp_path):
    train(prepared_dir, tmp_path / "source", value_memory="move", memory_density=2).run()
    with pytest.raises(ConfigError, match="no place for"):
        grown(prepared_dir, tmp_path / "source")  # standard: the bank would be lost
    with pytest.raises(ConfigError, match="slots"):
        grown(prepared_dir, tmp_path / "source", value_memory="move", memory_density=1)
    with pytest.raises(ConfigError, match="pkm"):
        grown(prepared_dir, tmp_path / "source", value_memory="pkm")


def test_the_command_line_refuses_in_one_line(prepared_dir, tmp_path, capsys):
    train(prepared_dir, tmp_path / "source").run()
    flags = ["--data", str(prepared_dir), "--out", str(tmp_path / "new"), "--preset", "tiny", "--steps", "2"]
    code = main(["train", *flags, "--init-from", str(tmp_path / "source"), "--variant", "move", "--n-embd", "128"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "n_embd is 64 there and 128 here" in err
    assert not (tmp_path / "new" / "checkpoints").exists()


def test_a_continued_run_resumes_bit_for_bit_without_its_source(prepared_dir, tmp_path):
    train(prepared_dir, tmp_path / "source").run()
    grow = dict(init_from=str(tmp_path / "source"), value_memory="move", memory_density=2)
    reference = train(prepared_dir, tmp_path / "reference", steps=12, **grow)
    reference.run()
    crashed = train(prepared_dir, tmp_path / "run", steps=12, **grow)
    crash_after(crashed, 10)
    with pytest.raises(Crash):
        crashed.run()
    shutil.rmtree(tmp_path / "source")  # resuming reads the run's own checkpoint only
    resumed = train(prepared_dir, tmp_path / "run", steps=12, resume=True, **grow)
    assert resumed.step == 8
    resumed.run()
    for (name, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
