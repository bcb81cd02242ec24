"""Hugging Face export: the folder loads with AutoModelForCausalLM / AutoTokenizer
and greedy generate() gives the project's own sampler's tokens (issue: ecosystem).
Skipped when transformers is not installed (it is an optional extra)."""

import sys
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


def export_random_model(tmp_path, prepared_dir, monkeypatch, variant, attention, meta=None, **fields):
    """A model with decisive (non-uniform) logits, checkpointed and exported; the
    transformers dynamic-module cache is private to the test."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = load_prepared(prepared_dir)
    torch.manual_seed(0)
    extra = dict(attention="mla", n_head=4, kv_latent_dim=32) if attention == "mla" else dict(n_head=4, n_kv_head=2)
    vocab = data.tokenizer.vocab_size
    model = GPT(model_config_from_preset("tiny", vocab_size=vocab, value_memory=variant, **extra, **fields))
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


def test_the_symmetry_breaking_options_export(tmp_path, prepared_dir, monkeypatch):
    """A MoVE model with a layer-assigned start and a content-reading gate: the export
    carries both (their parameters and settings) and generates the project's tokens."""
    model, _, hf_model, hf_tokenizer, _ = export_random_model(
        tmp_path, prepared_dir, monkeypatch, "move", "mha", layer_start_bias=3.0, slot_gate_channels=4, memory_density=2
    )
    names = {n for n, _ in hf_model.named_parameters()}
    assert any(n.endswith("gate_bias") for n in names) and any(n.endswith("slot_gate") for n in names)
    prompt = hf_tokenizer("First Citizen: Before we proceed", return_tensors="pt")
    ours = generate(model, prompt["input_ids"], 12, temperature=0)
    assert hf_model.generate(**prompt, max_new_tokens=12, do_sample=False).tolist() == ours.tolist()


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


# ---------------------------------------------------------------- a full transformers citizen
def greedy(hf_model, prompt, **kw):
    out = hf_model.generate(
        **prompt, max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True, **kw
    )
    return out.sequences, torch.stack(out.scores, 1)


LORA_TARGETS = {"value projection": ["c_v"], "query and value": ["c_q", "c_v"], "all-linear": "all-linear"}


@pytest.mark.parametrize("target", list(LORA_TARGETS))
@pytest.mark.parametrize("variant,attention", [("move", "mha"), ("move", "mla"), ("lave", "mha")])
def test_cached_decoding_honours_peft_lora(tmp_path, prepared_dir, monkeypatch, target, variant, attention):
    """LoRA wraps the projections (the value projection and the router included under
    all-linear): cached decoding must compute what the uncached forward does."""
    peft = pytest.importorskip("peft")
    _, _, hf_model, hf_tokenizer, _ = export_random_model(tmp_path, prepared_dir, monkeypatch, variant, attention)
    targets = LORA_TARGETS[target]
    if attention == "mla" and targets != "all-linear":
        targets = ["c_q", "c_kv_down"]  # MLA's value path starts at the latent's down-projection
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    lora = peft.get_peft_model(hf_model, config)
    prompt = hf_tokenizer(["First Citizen: Before we", "KING"], return_tensors="pt", padding=True)
    cached, cached_scores = greedy(lora, prompt)
    uncached, uncached_scores = greedy(lora, prompt, use_cache=False)
    torch.testing.assert_close(cached_scores, uncached_scores, rtol=1e-4, atol=1e-4)
    assert cached.tolist() == uncached.tolist()
    with lora.disable_adapter():
        _, base_scores = greedy(lora, prompt, use_cache=False)
    assert (base_scores - uncached_scores).abs().max() > 1e-2  # the adapter does change the function


def test_cached_decoding_honours_a_forward_hook(tmp_path, prepared_dir, monkeypatch):
    _, _, hf_model, hf_tokenizer, _ = export_random_model(tmp_path, prepared_dir, monkeypatch, "move", "mha")
    for block in hf_model.gpt.blocks:
        block.attn.c_v.register_forward_hook(lambda _m, _a, out: 1.5 * out)
    prompt = hf_tokenizer("First Citizen: Before we", return_tensors="pt")
    _cached, cached_scores = greedy(hf_model, prompt)
    _uncached, uncached_scores = greedy(hf_model, prompt, use_cache=False)
    torch.testing.assert_close(cached_scores, uncached_scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant,attention", [("move", "mha"), ("move", "mla"), ("bigram", "mha")])
def test_beam_search_and_assisted_decoding_use_the_cache(tmp_path, prepared_dir, monkeypatch, variant, attention):
    """Beam search reorders the cache, prompt-lookup (assisted) decoding crops it: both
    give what they give without a cache."""
    _, _, hf_model, hf_tokenizer, _ = export_random_model(tmp_path, prepared_dir, monkeypatch, variant, attention)
    prompt = hf_tokenizer(["the the the the the", "KING KING"], return_tensors="pt", padding=True)
    beams = {}
    for use_cache in (True, False):
        beams[use_cache] = hf_model.generate(
            **prompt,
            max_new_tokens=8,
            num_beams=3,
            num_return_sequences=2,
            do_sample=False,
            use_cache=use_cache,
            output_scores=True,
            return_dict_in_generate=True,
        )
    assert beams[True].sequences.tolist() == beams[False].sequences.tolist()
    torch.testing.assert_close(beams[True].sequences_scores, beams[False].sequences_scores, rtol=1e-4, atol=1e-4)
    one = hf_tokenizer("the the the the the", return_tensors="pt")  # assisted decoding takes one row
    greedy_tokens, _ = greedy(hf_model, one, use_cache=False)
    crops = []
    crop = sys.modules[type(hf_model).__module__].MoveGenerationCache.crop
    monkeypatch.setattr(type(beams[True].cache), "crop", lambda self, n: crops.append(n) or crop(self, n))
    assisted = hf_model.generate(**one, max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=3)
    assert assisted.tolist() == greedy_tokens.tolist()
    assert any(n < 0 for n in crops)  # drafts were rejected and the cache rolled back


def test_cache_rows_repeat_and_select_like_a_fresh_batch(tmp_path, prepared_dir, monkeypatch):
    """What contrastive search does to a cache (batch_repeat_interleave, then
    batch_select_indices): the next token's logits equal a cache built for that batch."""
    *_, hf_model, _, _ = export_random_model(tmp_path, prepared_dir, monkeypatch, "move", "mha")
    cache_class = sys.modules[type(hf_model).__module__].MoveGenerationCache
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    nxt = torch.randint(0, 100, (4, 1), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = cache_class()
        hf_model(ids, cache=cache)
        cache.batch_repeat_interleave(2)
        repeated = hf_model(torch.cat([ids.repeat_interleave(2, 0), nxt], 1), cache=cache).logits
        fresh = cache_class()
        expected = hf_model(torch.cat([ids.repeat_interleave(2, 0), nxt], 1), cache=fresh).logits[:, -1:]
        torch.testing.assert_close(repeated, expected)
        cache.batch_select_indices(torch.tensor([3, 0]))
        selected = hf_model(torch.cat([ids.repeat_interleave(2, 0)[[3, 0]], nxt[[3, 0]], nxt[:2]], 1), cache=cache)
        alone = hf_model(torch.cat([ids.repeat_interleave(2, 0)[[3, 0]], nxt[[3, 0]], nxt[:2]], 1)).logits[:, -1:]
        torch.testing.assert_close(selected.logits, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["move", "lave", "standard"])
def test_resizing_the_vocabulary_grows_the_memory_and_keeps_old_tokens(tmp_path, prepared_dir, monkeypatch, variant):
    *_, hf_model, hf_tokenizer, _out = export_random_model(tmp_path, prepared_dir, monkeypatch, variant, "mha")
    old = hf_model.config.vocab_size
    assert hf_model.get_input_embeddings() is hf_model.gpt.wte
    assert hf_model.get_output_embeddings() is hf_model.gpt.lm_head
    ids = hf_tokenizer("First Citizen: Before we", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = hf_model(ids).logits
        hf_model.resize_token_embeddings(old + 5)
        after = hf_model(ids).logits
        assert after.shape[-1] == old + 5
        torch.testing.assert_close(after[..., :old], before, rtol=0, atol=0)  # old tokens compute what they did
        for table in hf_model.gpt.value_tables():
            assert table.weight.shape[0] == old + 5 and table.weight[old:].eq(0).all()
        assert hf_model(torch.cat([ids, torch.tensor([[old + 4]])], 1)).logits.isfinite().all()
    hf_model.save_pretrained(tmp_path / "resized")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resized", trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, after, rtol=0, atol=0)


@pytest.mark.parametrize("variant,attention", [("move", "mha"), ("lave", "mla"), ("standard", "mha")])
def test_gradient_checkpointing_gives_equal_gradients(tmp_path, prepared_dir, monkeypatch, variant, attention):
    *_, hf_model, _, _ = export_random_model(tmp_path, prepared_dir, monkeypatch, variant, attention)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        hf_model.zero_grad()
        if checkpointing:
            hf_model.gradient_checkpointing_enable()
        hf_model.train()
        hf_model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in hf_model.named_parameters() if p.grad is not None})
    assert hf_model.gradient_checkpointing
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-7, msg=name)


def test_hidden_states_and_inputs_embeds(tmp_path, prepared_dir, monkeypatch):
    *_, hf_model, _, _ = export_random_model(tmp_path, prepared_dir, monkeypatch, "move", "mha")
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = hf_model(ids, output_hidden_states=True)
        c = hf_model.gpt.config
        assert len(out.hidden_states) == c.n_layer + 1
        assert all(h.shape == (2, 10, c.n_embd) for h in out.hidden_states)
        # the last one is what the head reads: logits follow from it alone
        last = torch.nn.functional.rms_norm(out.hidden_states[-1], (c.n_embd,))
        logits = c.logit_softcap * torch.tanh(hf_model.gpt.lm_head(last) / c.logit_softcap)
        torch.testing.assert_close(logits, out.logits)
        assert hf_model(ids).hidden_states is None
    with pytest.raises(ValueError, match="input_ids"):
        hf_model(inputs_embeds=torch.zeros(1, 3, c.n_embd))


def test_config_names_eos_and_the_context_window(tmp_path, prepared_dir, monkeypatch):
    model, tokenizer, hf_model, hf_tokenizer, _out = export_random_model(
        tmp_path, prepared_dir, monkeypatch, "move", "mha"
    )
    c, config = model.config, hf_model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (c.n_embd, c.n_layer, c.n_head)
    assert (config.num_key_value_heads, config.max_position_embeddings) == (c.kv_heads, c.seq_len)
    assert config.vocab_size == c.vocab_size and config.tie_word_embeddings is False
    assert hf_tokenizer.eos_token_id == tokenizer.bos_id == config.eos_token_id
    assert hf_model.generation_config.eos_token_id == tokenizer.bos_id
    assert hf_model.generation_config.max_length == c.seq_len
    pipe = transformers.pipeline("text-generation", model=hf_model, tokenizer=hf_tokenizer)
    ids = pipe("First Citizen", do_sample=False, return_tensors=True, eos_token_id=None)[0]["generated_token_ids"]
    assert len(ids) == c.seq_len  # the default length is the context window (the pipeline's own is 256 new)
    prompt = hf_tokenizer("First Citizen", return_tensors="pt")
    with pytest.warns(UserWarning, match="past the 64-token context"):
        hf_model.generate(**prompt, max_new_tokens=c.seq_len, do_sample=False, eos_token_id=None)


def test_trainer_with_gradient_accumulation_logs_the_same_loss_and_step(tmp_path, prepared_dir, monkeypatch):
    """One optimiser step over the same 8 rows (uneven targets, as padding makes them):
    batch 8, or 4 micro-batches of 2 accumulated. Loss and updated weights agree."""
    pytest.importorskip("accelerate")
    *_, _hf_model, _, out = export_random_model(tmp_path, prepared_dir, monkeypatch, "move", "mha")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(8):
        ids = torch.randint(0, 500, (16,), generator=generator)
        labels = ids.clone()
        labels[: 2 * i] = -100  # row i has 15 - 2i targets (fewer for later rows)
        rows.append({"input_ids": ids, "labels": labels})
    results = {}
    for accumulation in (1, 4):
        model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / f"trainer{accumulation}"),
            per_device_train_batch_size=8 // accumulation,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            learning_rate=0.1,
            optim="sgd",
            lr_scheduler_type="constant",
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            seed=0,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
        trainer.train()
        loss = next(r["loss"] for r in trainer.state.log_history if "loss" in r)
        results[accumulation] = loss, {n: p.detach().clone() for n, p in model.named_parameters()}
    (loss_1, weights_1), (loss_4, weights_4) = results[1], results[4]
    assert loss_4 == pytest.approx(loss_1, rel=1e-4)
    assert 3 < loss_1 < 10  # about ln(512) for a random model, not 4 times it
    for name in weights_1:
        torch.testing.assert_close(weights_4[name], weights_1[name], rtol=1e-4, atol=1e-6, msg=name)


HELD_OUT = (
    "MENENIUS: Either you must confess yourselves wondrous malicious, or be accused of folly. "
    "I shall tell you a pretty tale: it may be you have heard it; but, since it serves my purpose, "
    "I will venture to stale't a little more."
)


def move_eval(*args) -> dict:
    import contextlib
    import io
    import json

    from move.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", *map(str, args)]) == 0
    return json.loads(out.getvalue())


def test_sliding_protocol_agrees_with_the_transformers_recipe(tmp_path, prepared_dir, monkeypatch):
    """`move eval --protocol sliding` against the recipe of the transformers docs
    ("Perplexity of fixed-length models": one BOS, windows of max_position_embeddings
    tokens every `stride`, labels -100 where already scored), run on the export."""
    import math

    *_, hf_model, hf_tokenizer, _ = export_random_model(tmp_path, prepared_dir, monkeypatch, "move", "mha")
    text = " ".join([HELD_OUT] * 3)
    (tmp_path / "held_out.txt").write_text(text)
    ids = hf_tokenizer(text, return_tensors="pt").input_ids  # the tokenizer adds the one BOS
    max_length, stride = hf_model.config.max_position_embeddings, 24
    assert ids.size(1) > 3 * max_length
    nll, previous_end = 0.0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + max_length, ids.size(1))
        target_length = end - previous_end
        input_ids = ids[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-target_length] = -100
        with torch.no_grad():
            loss = hf_model(input_ids, labels=labels).loss
        nll += loss.item() * int((labels[:, 1:] != -100).sum())
        previous_end = end
        if end == ids.size(1):
            break
    recipe_bpb = nll / (math.log(2) * len(text.encode()))
    held_out = tmp_path / "held_out.txt"
    ours = move_eval(tmp_path / "ckpt", "--text", held_out, "--protocol", "sliding", "--stride", stride)
    assert ours["protocol"] == "sliding" and ours["stride"] == stride
    assert ours["bpb"] == pytest.approx(recipe_bpb, abs=1e-4)
    passages = move_eval(tmp_path / "ckpt", "--text", tmp_path / "held_out.txt")
    assert passages["protocol"] == "passages" and abs(passages["bpb"] - recipe_bpb) > 1e-4  # another protocol


def test_lm_evaluation_harness_scores_the_export_like_move_eval(tmp_path, prepared_dir, monkeypatch):
    """lm-evaluation-harness (`--model hf`) on a local task over a jsonl, no download:
    its rolling log-likelihood of a held-out document within one context window gives
    the bits per byte `move eval` gives."""
    lm_eval = pytest.importorskip("lm_eval")
    import json

    *_, out = export_random_model(tmp_path, prepared_dir, monkeypatch, "move", "mha")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    text = HELD_OUT.split(":")[1].strip()[:150]
    (tmp_path / "held_out.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (tmp_path / "held_out.txt").write_text(text)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "move_held_out.yaml").write_text(
        "\n".join(
            [
                "task: move_held_out",
                "dataset_path: json",
                "dataset_kwargs:",
                f"  data_files: {{test: {tmp_path / 'held_out.jsonl'}}}",
                "test_split: test",
                "output_type: loglikelihood_rolling",
                'doc_to_text: ""',
                'doc_to_target: "{{text}}"',
                "metric_list:",
                "  - metric: bits_per_byte",
                "",
            ]
        )
    )
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={out},trust_remote_code=True,add_bos_token=False",
        tasks=["move_held_out"],
        task_manager=lm_eval.tasks.TaskManager(include_path=str(tasks)),
        device="cpu",
        batch_size=1,
    )
    theirs = results["results"]["move_held_out"]["bits_per_byte,none"]
    ours = move_eval(tmp_path / "ckpt", "--text", tmp_path / "held_out.txt", "--protocol", "sliding")
    assert theirs == pytest.approx(ours["bpb"], abs=1e-4)


def test_the_model_card_states_the_figure_and_its_protocol(tmp_path, prepared_dir):
    import json

    model = GPT(model_config_from_preset("tiny", vocab_size=load_prepared(prepared_dir).tokenizer.vocab_size))
    run = tmp_path / "run"
    ckpt = save_checkpoint(
        run / "checkpoints" / "step_000007", model, meta={"step": 7, "task": {"data": str(prepared_dir)}}
    )
    (run / "metrics.jsonl").write_text(json.dumps({"step": 7, "val_bpb": 2.5}) + "\n")
    card = (export_hf(ckpt, tmp_path / "hf") / "README.md").read_text()
    assert "- val_bpb: 2.5000" in card and "disjoint windows" in card and "--protocol sliding" in card
