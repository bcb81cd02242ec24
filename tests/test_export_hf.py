"""Hugging Face export: the folder loads with AutoModelForCausalLM / AutoTokenizer
and greedy generate() gives the project's own sampler's tokens (issue: ecosystem).
Skipped when transformers is not installed (it is an optional extra)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from move.training.checkpoint import save_checkpoint  # noqa: E402
from move.config import model_config_from_preset  # noqa: E402
from move.export.hf import export_hf  # noqa: E402
from move.model.gpt import GPT  # noqa: E402
from move.model.sampling import generate  # noqa: E402
from move.text.prepare import load_prepared  # noqa: E402

VARIANTS = [("standard", "mha"), ("lave", "mha"), ("move", "mha"), ("standard", "mla"), ("lave", "mla"), ("move", "mla")]


@pytest.mark.parametrize("variant,attention", VARIANTS, ids=[f"{v}-{a}" for v, a in VARIANTS])
def test_exported_model_generates_the_same_tokens(tmp_path, prepared_dir, monkeypatch, variant, attention):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # the dynamic-module cache, private to the test
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = load_prepared(prepared_dir)
    torch.manual_seed(0)
    extra = dict(attention="mla", n_head=4, kv_latent_dim=32) if attention == "mla" else {}
    model = GPT(model_config_from_preset("tiny", vocab_size=data.tokenizer.vocab_size, value_memory=variant, **extra))
    with torch.no_grad():  # leave the near-uniform initial state: decisive logits
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, meta={"task": {"data": str(prepared_dir)}})
    out = export_hf(ckpt, tmp_path / "hf")

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "First Citizen: Before we proceed any further"
    assert hf_tokenizer.encode(text, add_special_tokens=False) == data.tokenizer.encode(text)
    prompt = torch.tensor([[data.tokenizer.bos_id] + data.tokenizer.encode(text)])
    ours = generate(model.eval(), prompt, 12, temperature=0)
    theirs = hf_model.generate(prompt, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert theirs.tolist() == ours.tolist()
