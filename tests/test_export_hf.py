"""Hugging Face export: the folder loads with AutoModelForCausalLM / AutoTokenizer
and greedy generate() gives the project's own sampler's tokens (issue: ecosystem).
Skipped when transformers is not installed (it is an optional extra)."""

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from move.config import model_config_from_preset  # noqa: E402
from move.export.hf import export_hf  # noqa: E402
from move.model.gpt import GPT  # noqa: E402
from move.model.sampling import generate  # noqa: E402
from move.text.prepare import load_prepared  # noqa: E402
from move.training.checkpoint import save_checkpoint  # noqa: E402

VARIANTS = [
    ("standard", "mha"),
    ("lave", "mha"),
    ("move", "mha"),
    ("standard", "mla"),
    ("lave", "mla"),
    ("move", "mla"),
    ("bigram", "mha"),
    ("pkm", "mha"),
    ("value_residual", "mha"),
]


def export_random_model(tmp_path, prepared_dir, monkeypatch, variant, attention, meta=None):
    """A model with decisive (non-uniform) logits, checkpointed and exported; the
    transformers dynamic-module cache is private to the test."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = load_prepared(prepared_dir)
    torch.manual_seed(0)
    extra = dict(attention="mla", n_head=4, kv_latent_dim=32) if attention == "mla" else dict(n_head=4, n_kv_head=2)
    model = GPT(model_config_from_preset("tiny", vocab_size=data.tokenizer.vocab_size, value_memory=variant, **extra))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, meta=meta or {"task": {"data": str(prepared_dir)}})
    out = export_hf(ckpt, tmp_path / "hf")

    def no_prompt(*args):
        raise AssertionError("transformers asked an interactive question")

    monkeypatch.setattr("builtins.input", no_prompt)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    return model.eval(), data.tokenizer, hf_model, hf_tokenizer, out


@pytest.mark.parametrize("variant,attention", VARIANTS, ids=[f"{v}-{a}" for v, a in VARIANTS])
def test_exported_model_generates_the_same_tokens(tmp_path, prepared_dir, monkeypatch, variant, attention):
    """The HF tokenizer adds BOS as `move sample` does, and greedy generate() (KV cache)
    gives the project's sampler's tokens."""
    model, tokenizer, hf_model, hf_tokenizer, _ = export_random_model(
        tmp_path, prepared_dir, monkeypatch, variant, attention
    )
    text = "First Citizen: Before we proceed any further"
    prompt = hf_tokenizer(text, return_tensors="pt")
    assert prompt["input_ids"][0].tolist() == [tokenizer.bos_id, *tokenizer.encode(text)]
    ours = generate(model, prompt["input_ids"], 12, temperature=0)
    theirs = hf_model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert theirs.tolist() == ours.tolist()


@pytest.mark.parametrize("variant,attention", VARIANTS, ids=[f"{v}-{a}" for v, a in VARIANTS])
def test_left_padded_batches_generate_what_each_prompt_generates_alone(
    tmp_path, prepared_dir, monkeypatch, variant, attention
):
    _, _, hf_model, hf_tokenizer, _ = export_random_model(tmp_path, prepared_dir, monkeypatch, variant, attention)
    texts = ["First Citizen: Before we proceed", "KING", "To be, or not to be, that is the question"]
    batch = hf_tokenizer(texts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()  # really padded, on the left
    together = hf_model.generate(**batch, max_new_tokens=10, do_sample=False)
    for row, text in zip(together, texts):
        alone = hf_model.generate(**hf_tokenizer(text, return_tensors="pt"), max_new_tokens=10, do_sample=False)
        assert row[-10:].tolist() == alone[0, -10:].tolist(), text


def test_generation_runs_each_token_through_the_model_once(tmp_path, prepared_dir, monkeypatch):
    """With the cache each step feeds only the new token (prompt + n - 1 positions in all);
    without it every step re-reads the whole context (quadratic)."""
    _, _, hf_model, hf_tokenizer, _ = export_random_model(tmp_path, prepared_dir, monkeypatch, "move", "mha")
    prompt = hf_tokenizer("First Citizen: Before we proceed", return_tensors="pt")
    t0, n = prompt["input_ids"].size(1), 16
    positions = []
    forward = hf_model.gpt.forward
    monkeypatch.setattr(hf_model.gpt, "forward", lambda idx, **kw: positions.append(idx.size(1)) or forward(idx, **kw))
    cached = hf_model.generate(**prompt, max_new_tokens=n, do_sample=False)
    assert sum(positions) == t0 + n - 1
    positions.clear()
    uncached = hf_model.generate(**prompt, max_new_tokens=n, do_sample=False, use_cache=False)
    assert sum(positions) == sum(t0 + i for i in range(n)) and uncached.tolist() == cached.tolist()


def test_loss_follows_the_num_items_in_batch_convention(tmp_path, prepared_dir, monkeypatch):
    """transformers' Trainer, accumulating micro-batches, passes num_items_in_batch (the
    step's target count) and sums the micro-batch losses: they must add up to the mean
    over the whole batch, not to micro-batches times it."""
    *_, hf_model, _, _ = export_random_model(tmp_path, prepared_dir, monkeypatch, "move", "mha")
    ids = torch.randint(
        0, hf_model.config.move_config["vocab_size"], (4, 12), generator=torch.Generator().manual_seed(0)
    )
    labels = ids.clone()
    labels[0, 5:] = -100  # uneven targets per row, as padding makes them
    with torch.no_grad():
        mean = hf_model(ids, labels=labels).loss
        items = int((labels[:, 1:] != -100).sum())
        halves = sum(hf_model(ids[i : i + 2], labels=labels[i : i + 2], num_items_in_batch=items).loss for i in (0, 2))
    torch.testing.assert_close(halves, mean, rtol=1e-5, atol=1e-6)


def test_the_export_has_a_model_card_and_shareable_file_modes(tmp_path, prepared_dir, monkeypatch):
    from move.model.accounting import count_params

    model, _, _, _, out = export_random_model(
        tmp_path,
        prepared_dir,
        monkeypatch,
        "move",
        "mha",
        meta={"step": 7, "task": {"source": "txt", "train_tokens": 1234, "data": str(prepared_dir)}},
    )
    card = (out / "README.md").read_text()
    assert "MoVE" in card and "checkpoint step: 7" in card and "txt (1234 training tokens)" in card
    front = card.split("---\n")[1]  # YAML metadata the Hub indexes
    assert "library_name: transformers" in front and "pipeline_tag: text-generation" in front
    # no path of this machine in any exported file (the card, config.json, code)
    for path in (tmp_path, prepared_dir, Path.home(), Path(__file__).resolve().parent.parent):
        for f in out.iterdir():
            assert str(path) not in f.read_text(errors="replace"), (f.name, str(path))
    assert f"| value_memory | {count_params(model)['value_memory']:,} |" in card
    assert oct(out.stat().st_mode & 0o777) == "0o755"
    assert {oct(f.stat().st_mode & 0o777) for f in out.iterdir()} == {"0o644"}
