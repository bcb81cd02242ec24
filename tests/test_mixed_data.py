"""Continued training with general text mixed in (--mix-data, --mix-fraction): a fixed
share of every batch from the second corpus, exact resume, and its validation bpb."""

import pytest
import torch
from test_training import Crash, crash_after

from move import api
from move.cli import main as cli
from move.config import ConfigError, model_config_from_preset
from move.errors import DataError
from move.model.gpt import GPT
from move.text.loader import BatchLoader
from move.text.prepare import load_prepared
from move.text.task import TextTask
from move.training.trainer import TrainConfig, Trainer, prepare_model


@pytest.fixture(scope="module")
def facts_dir(tmp_path_factory, prepared_dir):
    """A knowledge corpus written with the text corpus's tokenizer: other text, same ids."""
    out = tmp_path_factory.mktemp("facts") / "facts"
    assert cli(["knowledge-prepare", "--individuals", "40", "--tokenizer", str(prepared_dir / "tokenizer.json"),
                "--out", str(out)]) == 0  # fmt: skip
    return out


def test_every_batch_holds_the_fixed_share_of_each_corpus(facts_dir, prepared_dir):
    facts, text = load_prepared(facts_dir), load_prepared(prepared_dir)
    task = TextTask(facts, 32, 8, 3, 1024, mixed_in=text, mix_fraction=0.25)
    own = BatchLoader(facts.tokens("train"), facts.tokenizer.bos_id, 6, 32, 3)  # each corpus alone, same seed
    other = BatchLoader(text.tokens("train"), text.tokenizer.bos_id, 2, 32, 3)
    for _ in range(5):
        (x, y), (fx, fy), (tx, ty) = task.loader.next_batch(), own.next_batch(), other.next_batch()
        assert torch.equal(x, torch.cat([fx, tx])) and torch.equal(y, torch.cat([fy, ty]))


def make_trainer(facts_dir, prepared_dir, run_dir, resume=False):
    torch.manual_seed(0)
    facts, text = load_prepared(facts_dir), load_prepared(prepared_dir)
    model = GPT(model_config_from_preset("tiny", vocab_size=facts.tokenizer.vocab_size, value_memory="move"))
    config = TrainConfig(
        steps=12, batch_size=4, eval_every=4, eval_tokens=1024, checkpoint_every=4, mix_data=str(prepared_dir),
        mix_fraction=0.5,
    )  # fmt: skip
    task = TextTask(facts, model.config.seq_len, 4, 0, 1024, mixed_in=text, mix_fraction=0.5)
    prepare_model(model, config)
    return Trainer(model, task, config, run_dir, resume=resume, quiet=True)


def test_a_mixed_run_resumes_bit_for_bit_and_reports_the_mixed_in_bpb(facts_dir, prepared_dir, tmp_path):
    reference = make_trainer(facts_dir, prepared_dir, tmp_path / "ref")
    summary = reference.run()
    crashed = make_trainer(facts_dir, prepared_dir, tmp_path / "run")
    crash_after(crashed, 10)  # dies during step 11, after the step-8 checkpoint
    with pytest.raises(Crash):
        crashed.run()
    resumed = make_trainer(facts_dir, prepared_dir, tmp_path / "run", resume=True)
    assert resumed.step == 8
    resumed.run()
    for (name, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    # the bpb of the mixed-in corpus, computed here without the task
    expected = api.bits_per_byte(reference.model, prepared_dir, max_tokens=1024, batch_size=4)
    assert summary["mix_val_bpb"] == pytest.approx(expected, rel=1e-6)
    assert summary["val_bpb"] != pytest.approx(summary["mix_val_bpb"], rel=1e-3)


def test_bad_mixes_are_refused_in_one_line(facts_dir, prepared_dir, tmp_path):
    facts, text = load_prepared(facts_dir), load_prepared(prepared_dir)
    with pytest.raises(DataError, match="is 0 rows"):
        TextTask(facts, 32, 4, 0, 1024, mixed_in=text, mix_fraction=0.1)
    with pytest.raises(ConfigError, match="go together"):
        TrainConfig(mix_data=str(prepared_dir)).validate()
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        TrainConfig(mix_data=str(prepared_dir), mix_fraction=1.0).validate()
    other = tmp_path / "other"
    assert cli(["knowledge-prepare", "--individuals", "20", "--out", str(other)]) == 0  # its own word-level tokenizer
    with pytest.raises(DataError, match="another tokenizer"):
        TextTask(facts, 32, 4, 0, 1024, mixed_in=load_prepared(other), mix_fraction=0.5)
    argv = ["train", "--data", str(facts_dir), "--mix-data", str(other), "--mix-fraction", "0.5", "--preset", "tiny",
            "--steps", "2", "--out", str(tmp_path / "run")]  # fmt: skip
    assert cli(argv) != 0
    assert not (tmp_path / "run").exists()
