"""A MoVE bank added to Hugging Face causal LMs (move.export.retrofit), on tiny
random configurations built here (no download): the original function at step 0,
cached decoding and padded batches after training, save/load, accounting."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from move import api  # noqa: E402
from move.errors import ConfigError  # noqa: E402

VOCAB = 96


def llama_family(config_class, vocab=VOCAB, layers=2, kv_heads=2, **extra):
    """A tiny configuration of a Llama-family architecture (width 32, 4 query heads)."""
    return config_class(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        **extra,
    )


CONFIGS = {
    "llama-gqa": lambda: llama_family(transformers.LlamaConfig, layers=3),
    "qwen2": lambda: llama_family(transformers.Qwen2Config),
    "qwen3-wide-heads": lambda: llama_family(transformers.Qwen3Config, kv_heads=1, head_dim=16),
    "mistral": lambda: llama_family(transformers.MistralConfig),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128),
}


def random_model(name):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name]())
    model.generation_config.pad_token_id = 0
    return model.eval()


def ids(rows=2, length=12, seed=1):
    return torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


class Corpus:
    """What the retrofit's measures read of prepared data: its tokens."""

    def __init__(self, tokens):
        self._tokens = tokens

    def tokens(self, split):
        return self._tokens


def train_a_little(model, steps=5):
    """Dense weights and memory trained together, so the bank and gates are far from zero."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    model.train()
    for step in range(steps):
        x = ids(4, 16, seed=10 + step)
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_retrofitted_model_computes_the_original_function(name):
    model = random_model(name)
    x = ids()
    with torch.no_grad():
        before = model(input_ids=x).logits
        api.retrofit(model, density=2)
        after = model(input_ids=x).logits
    assert torch.equal(after, before)
    assert torch.equal(model(input_ids=x).logits.detach(), before)  # the training path (autograd) too
    memory = model.move_memory
    layers = model.config.num_hidden_layers if name != "gpt2" else model.config.n_layer
    assert memory.bank.weight.shape[2] == 2 * ((layers + 1) // 2) and len(memory.routers) == layers


@pytest.mark.parametrize("name", list(CONFIGS))
def test_after_training_cached_generation_and_padded_batches_are_right(name):
    model = train_a_little(api.retrofit(random_model(name), density=2))
    assert model.move_memory.bank.weight.abs().sum() > 0  # the memory learned something
    x = ids(1, 8)
    common = dict(max_new_tokens=10, do_sample=False, output_scores=True, return_dict_in_generate=True)
    cached = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **common)
    uncached = model.generate(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False, **common)
    assert cached.sequences.tolist() == uncached.sequences.tolist()
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), rtol=1e-4, atol=1e-4)
    # a left-padded batch: every row generates what it generates alone
    short, long = ids(1, 5, seed=3), ids(1, 9, seed=4)
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = (torch.arange(9) >= torch.tensor([[4], [0]])).long()
    together = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for row, alone_ids in zip(together, (short, long)):
        alone = model.generate(
            input_ids=alone_ids, attention_mask=torch.ones_like(alone_ids), max_new_tokens=6, do_sample=False
        )
        assert row[-6:].tolist() == alone[0, -6:].tolist()


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_save_and_load_round_trip_with_the_bank_in_safetensors(name, tmp_path):
    from safetensors import safe_open

    model = train_a_little(api.retrofit(random_model(name), density=1))
    model.save_pretrained(tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), framework="pt") as f:
        assert "move_memory.bank.weight" in set(f.keys())
    loaded = api.load_retrofitted(tmp_path / "saved").eval()
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)
    with pytest.raises(ConfigError, match="move_retrofit"):
        random_model(name).save_pretrained(tmp_path / "plain")
        api.load_retrofitted(tmp_path / "plain")


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_the_lave_layout_keeps_the_function_decodes_cached_and_round_trips(name, tmp_path):
    """nanochat's layout: a table per alternate layer ending at the last, no g0."""
    model = random_model(name)
    x = ids()
    with torch.no_grad():
        before = model(input_ids=x).logits
        api.retrofit(model, density=2, layout="lave")
        assert torch.equal(model(input_ids=x).logits, before)
    memory = model.move_memory
    layers = 3 if name == "llama-gqa" else 2
    assert memory.memory_layers == list(range(layers))[(layers - 1) % 2 :: 2]
    assert [t.weight.shape[2] for t in memory.tables] == [2] * len(memory.memory_layers)
    assert not hasattr(memory, "bank") and not memory.gate_g0
    model = train_a_little(model)
    assert all(t.weight.abs().sum() > 0 for t in memory.tables)
    common = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    prompt = ids(1, 6)
    cached = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **common)
    uncached = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=False, **common)
    assert cached.sequences.tolist() == uncached.sequences.tolist()
    model.save_pretrained(tmp_path / "saved")
    loaded = api.load_retrofitted(tmp_path / "saved").eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)


def test_accounting_counts_the_added_parts_by_hand():
    model = api.retrofit(random_model("llama-gqa"), density=1)  # 3 layers: M = 2, 2 KV heads of 8
    counts = api.retrofit_accounting(model)
    assert counts["params"]["value_memory"] == VOCAB * 2 * 2 * 8
    assert counts["params"]["routers"] == 3 * 32 * 2 * (2 + 1)
    assert counts["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert counts["flops_per_token"]["routers"] == 2 * 3 * 32 * 6
    assert counts["flops_per_token"]["mix"] == 3 * 2 * 6 * 8
    assert len(api.memory_parameters(model)) == 1 + 3
    lave = api.retrofit(random_model("llama-gqa"), density=1, layout="lave")  # layers 0 and 2, a table each
    counts = api.retrofit_accounting(lave)
    assert counts["params"]["value_memory"] == 2 * VOCAB * 2 * 1 * 8
    assert counts["params"]["routers"] == 2 * 32 * 2 * 1  # no g0
    assert counts["flops_per_token"]["mix"] == 2 * 2 * 2 * 8
    assert counts["params"]["total"] == sum(p.numel() for p in lave.parameters())


def test_a_plain_training_loop_teaches_the_memory_with_its_own_learning_rate():
    """The loop of docs/retrofit.md: dense weights frozen, only the bank and gates learn."""
    model = api.retrofit(random_model("llama-gqa"), density=2)
    dense_before = {n: p.detach().clone() for n, p in model.named_parameters() if "move_memory" not in n}
    for p in model.parameters():
        p.requires_grad_(False)
    memory = api.memory_parameters(model)
    for p in memory:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(memory, lr=0.1, weight_decay=0.0)
    x = ids(4, 24, seed=7)
    losses = []
    model.train()
    for _ in range(60):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.equal(p, dense_before[n]) for n, p in model.named_parameters() if "move_memory" not in n)
    assert losses[-1] < losses[0] - 0.25  # the memory alone lowers the loss


def test_unsupported_models_and_embeddings_are_refused():
    with pytest.raises(ConfigError, match="Llama family"):
        api.retrofit(torch.nn.Module())
    model = api.retrofit(random_model("llama-gqa"))
    with pytest.raises(ConfigError, match="already"):
        api.retrofit(model)
    with pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=torch.zeros(1, 3, 32))


def test_memory_trains_beside_peft_lora_and_under_gradient_checkpointing():
    """peft calls the model's forward directly (no hooks of the model itself run) and
    wraps v_proj: the bank still sees the ids and mixes into the base projection's
    values. HF gradient checkpointing recomputes the layers: the same gradients."""
    peft = pytest.importorskip("peft")
    model = api.retrofit(random_model("llama-gqa"), density=2)
    with torch.no_grad():
        for p in api.memory_parameters(model):
            p.normal_(0, 0.1)
    x = ids(2, 10)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad(set_to_none=True)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        model(input_ids=x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "move_memory.bank.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-7, msg=name)
    model.gradient_checkpointing_disable()
    with torch.no_grad():
        expected = model(input_ids=x).logits
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for p in api.memory_parameters(model):  # peft freezes everything it did not add
        p.requires_grad_(True)
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=x).logits, expected)  # LoRA starts at zero
    model.zero_grad(set_to_none=True)
    lora(input_ids=x, labels=x).loss.backward()
    assert model.move_memory.bank.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in lora.named_parameters() if "lora_" in n)


@pytest.mark.parametrize(
    "bank", [["--bank-optimizer", "exact"], ["--bank-optimizer", "lazy", "--bank-dtype", "bfloat16"]]
)
def test_move_retrofit_trains_a_local_model_on_prepared_data_in_one_command(tmp_path, prepared_dir, capsys, bank):
    """The one command: a transformers folder, data prepared with a vocabulary it
    covers; the memory learns (validation bpb falls), the dense weights stay, and the
    saved folder loads back with the memory."""
    import json

    from move.cli import main
    from move.text.prepare import load_prepared

    vocab = load_prepared(prepared_dir).tokenizer.vocab_size
    config = llama_family(transformers.LlamaConfig, vocab=vocab)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    flags = ["--data", str(prepared_dir), "--out", str(tmp_path / "out"), "--steps", "30", "--batch-size", "4"]
    flags += ["--seq-len", "32", "--lr-memory", "0.05", "--lr-router", "0.01", "--eval-tokens", "2048", *bank]
    assert main(["retrofit", str(tmp_path / "base"), *flags]) == 0
    summary = json.loads((tmp_path / "out" / "retrofit.json").read_text())
    assert summary["after"]["val_bpb"] < summary["before"]["val_bpb"] - 0.02  # a random frozen model: the memory alone
    assert summary["accounting"]["params"]["value_memory"] == vocab * 2 * 1 * 8
    loaded = api.load_retrofitted(tmp_path / "out")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    for name, p in base.named_parameters():
        assert torch.equal(loaded.get_parameter(name), p), name  # frozen by default
    assert loaded.move_memory.bank.weight.abs().sum() > 0
    assert main(["retrofit", str(tmp_path / "base"), *flags]) == 2  # an existing --out is never overwritten
    assert "already exists" in capsys.readouterr().err


def test_the_study_arms_bank_lora_and_full_fine_tuning_measure_facts_and_forgetting(tmp_path, text_folder):
    """A knowledge corpus and a general corpus under one tokenizer (GPT-2's): every arm
    starts from the same untouched model (same numbers before), trains only its part,
    and reports recall and both bpb figures after."""
    import json

    from move.cli import main
    from move.knowledge.corpus import KnowledgeConfig, prepare_knowledge
    from move.text.prepare import PrepareOptions, load_prepared, prepare
    from move.text.tokenizer import Tokenizer

    gpt2 = Tokenizer.gpt2()
    prepare_knowledge(KnowledgeConfig(individuals=20, relations=2, values=4), tmp_path / "facts", pretrained=gpt2)
    prepare(
        PrepareOptions(source="txt", path=str(text_folder), tokenizer="gpt2", passage_tokens=64), tmp_path / "general"
    )
    config = llama_family(transformers.LlamaConfig, vocab=gpt2.vocab_size)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    common = ["--data", str(tmp_path / "facts"), "--general-data", str(tmp_path / "general"), "--no-save"]
    common += ["--steps", "6", "--batch-size", "4", "--seq-len", "32", "--eval-tokens", "1024"]
    common += ["--kl-tokens", "256", "--untouched", str(tmp_path / "untouched.json")]
    arms = {
        "bank": ["--slots", "2"],
        "lora": ["--memory", "none", "--lora-rank", "4", "--lr-lora", "1e-2"],
        "bank+lora": ["--slots", "2", "--lora-rank", "4"],
        "full": ["--memory", "none", "--lr-dense", "1e-3"],
        "lave": ["--memory", "lave"],
        "bank-mixed": ["--slots", "2", "--mix-data", str(tmp_path / "general"), "--mix-fraction", "0.5"],
    }
    summaries = {}
    for arm, flags in arms.items():
        assert main(["retrofit", str(tmp_path / "base"), *common, *flags, "--out", str(tmp_path / arm)]) == 0
        summaries[arm] = json.loads((tmp_path / arm / "retrofit.json").read_text())
        assert not (tmp_path / arm / "model.safetensors").exists()
        assert summaries[arm]["after"]["general_kl"] > 0  # each arm moved the model's predictions on general text
        assert summaries[arm]["cost"]["decode_tok_s"] > 0 and summaries[arm]["cost"]["decode_tok_s_untouched"] > 0
    befores = [s["before"] for s in summaries.values()]
    assert all(b == befores[0] for b in befores)  # the untouched model, whatever is added
    kept = json.loads((tmp_path / "untouched.json").read_text())
    assert kept["measures"] == befores[0]  # measured by the first arm, reused by the others
    other_setting = [*common, "--seq-len", "16", "--slots", "2", "--out", str(tmp_path / "refused")]
    assert main(["retrofit", str(tmp_path / "base"), *other_setting]) == 2  # the file is not overwritten
    assert json.loads((tmp_path / "untouched.json").read_text()) == kept
    assert summaries["lave"]["cost"]["rows_moved"] > 0 and summaries["lora"]["cost"]["lora_flops_per_token"] > 0
    # what the memory does, per memory layer and corpus: every layer of a bank, the last of LaVE's alternates
    assert set(summaries["bank"]["memory_use"]) == {"val", "general"} and "memory_use" not in summaries["lora"]
    assert set(summaries["bank"]["memory_use"]["val"]) == {"0", "1"}
    assert set(summaries["lave"]["memory_use"]["val"]) == {"1"}
    assert summaries["bank"]["memory_use"]["val"]["1"]["memory_share"] > 0
    norms = [row["norm"] for row in summaries["bank"]["rows_moved_most"]]
    assert len(norms) == 20 and norms == sorted(norms, reverse=True) and norms[0] > 0
    facts_tokens = {gpt2.decode([i]) for i in load_prepared(tmp_path / "facts").tokens("train").tolist()}
    assert {row["token"] for row in summaries["bank"]["rows_moved_most"]} <= facts_tokens  # rows it trained on
    # half of every batch from the general corpus: the rows its own loader would give
    from move.config import RetrofitRun
    from move.export.retrofit_trainable import training_batches
    from move.text.loader import BatchLoader

    facts, general = load_prepared(tmp_path / "facts"), load_prepared(tmp_path / "general")
    run = RetrofitRun(batch_size=4, seq_len=32, mix_data=str(tmp_path / "general"), mix_fraction=0.5, seed=2)
    x, _ = training_batches(facts, run).next_batch()
    own = BatchLoader(facts.tokens("train"), facts.tokenizer.bos_id, 2, 32, 2).next_batch()[0]
    mixed = BatchLoader(general.tokens("train"), general.tokenizer.bos_id, 2, 32, 2).next_batch()[0]
    assert torch.equal(x, torch.cat([own, mixed]))
    with pytest.raises(ConfigError, match="at least one row"):
        RetrofitRun(batch_size=4, mix_data="x", mix_fraction=0.1).validate()
    assert set(befores[0]) == {
        "val_bpb",
        "general_bpb",
        "recall_accuracy",
        "knowledge_bits",
        "chance_accuracy",
        "facts",
    }
    bank = gpt2.vocab_size * 2 * 2 * 8 + 2 * 32 * 2 * 3
    lora = 2 * 4 * ((32 + 32) + (32 + 16) * 2 + (32 + 32) + (32 + 64) * 2 + (64 + 32))  # A and B of 7 projections
    assert summaries["bank"]["trainable_params"] == bank
    assert summaries["lora"]["trainable_params"] == lora
    assert summaries["bank+lora"]["trainable_params"] == bank + lora
    assert summaries["lave"]["trainable_params"] == gpt2.vocab_size * 2 * 1 * 8 + 32 * 2  # 2 layers: the last; no g0
    assert summaries["full"]["trainable_params"] == sum(
        p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").parameters()
    )
    for s in summaries.values():
        assert s["after"] != s["before"]


def test_the_kl_from_the_untouched_model_is_the_textbook_divergence():
    """mean_kl against torch's kl_div on the same windows; zero for the model itself."""
    from move.export.retrofit_measures import log_probs, mean_kl

    corpus = Corpus(torch.randint(1, VOCAB, (200,), generator=torch.Generator().manual_seed(3)).numpy())
    untouched, changed = random_model("llama-gqa"), train_a_little(random_model("llama-gqa"))
    score = lambda model: lambda x: model(input_ids=x).logits
    reference = log_probs(score(untouched), corpus, 16, 128, 4)
    assert reference.shape == (128, VOCAB)
    assert mean_kl(reference, score(untouched), corpus, 16, 128, 4) == pytest.approx(0, abs=1e-6)
    x = torch.from_numpy(corpus.tokens("val")[:128].astype("int64")).view(8, 16)
    with torch.no_grad():
        p0 = torch.log_softmax(untouched(input_ids=x).logits, -1).flatten(0, 1)
        p1 = torch.log_softmax(changed(input_ids=x).logits, -1).flatten(0, 1)
    expected = torch.nn.functional.kl_div(p1, p0, log_target=True, reduction="batchmean").item()
    assert mean_kl(reference, score(changed), corpus, 16, 128, 4) == pytest.approx(expected, rel=1e-5)
    assert expected > 1e-3


def test_memory_use_reports_the_gates_and_the_share_computed_by_hand():
    """One layer, so the value projection's input is the normed embedding whatever the
    memory does: the gates 2 sigmoid(router(x)) and ||v' - v|| / ||v|| computed from the
    model's parts, against memory_use; silent memory at step 0 reads gates 1, share 0."""
    from move.export.retrofit_measures import memory_use

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(llama_family(transformers.LlamaConfig, layers=1)).eval()
    api.retrofit(model, slots=3)
    memory = model.move_memory
    score = lambda x: model(input_ids=x).logits
    corpus = Corpus(torch.randint(1, VOCAB, (65,), generator=torch.Generator().manual_seed(5)).numpy())
    silent = memory_use(memory, score, corpus, 16, 64, 2)
    assert silent == {"0": {"g0_mean": 1.0, "slot_gate_mean": 1.0, "memory_share": 0.0}}
    with torch.no_grad():
        memory.bank.weight.normal_()
        memory.routers[0].weight.normal_(std=0.3)
    x = torch.from_numpy(corpus.tokens("val")[:64].astype("int64")).view(4, 16)
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(x))
        v = torch.nn.functional.linear(hidden, attention.v_proj.weight).view(4, 16, 2, 8)
        gates = 2 * torch.sigmoid(memory.routers[0](hidden)).view(4, 16, 2, 4)
        slots = memory.bank.weight[x]  # (4, 16, heads, slots, width)
        mixed = gates[..., :1] * v + (gates[..., 1:, None] * slots).sum(-2)
    used = memory_use(memory, score, corpus, 16, 64, 2)["0"]
    assert used["g0_mean"] == pytest.approx(gates[..., 0].mean().item(), rel=1e-5)
    assert used["slot_gate_mean"] == pytest.approx(gates[..., 1:].mean().item(), rel=1e-5)
    assert used["memory_share"] == pytest.approx(((mixed - v).norm() / v.norm()).item(), rel=1e-4)


def test_a_zero_bank_keeps_its_slots_identical_unless_the_layer_start_sets_them_apart(tmp_path):
    """Every slot of a retrofitted bank starts at zero and every gate at 1, so the slots
    of a row get the same gradient and the same Adam step: after training they are still
    equal (up to rounding), M slots training as one. The layer-assigned start (a gate bias: 0 for g0 and
    a layer's own slots, -b for the rest) keeps the original function at step 0 (the
    bank is zero) and trains the slots apart. It is saved and loaded with the bank."""

    def trained(start):
        model = random_model("llama-gqa")  # 3 layers: layers 0 and 2 take LaVE turns
        x = ids()
        with torch.no_grad():
            before = model(input_ids=x).logits
        api.retrofit(model, slots=4, layer_start_bias=start)
        with torch.no_grad():
            assert torch.equal(model(input_ids=x).logits, before)  # the original function at step 0
        memory = model.move_memory
        optimizer = torch.optim.AdamW([*memory.parameters()], lr=3e-2)
        for step in range(4):
            batch = ids(4, 16, seed=10 + step)
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return model

    plain = trained(0.0).move_memory.bank.weight.detach()  # (vocab, heads, slots, width)
    moved = plain.flatten(1).ne(0).any(1)
    # equal up to rounding (the gates' gradients <m_i, dL/dv'> are summed in other orders): 1e-8 against 0.1
    assert moved.sum() > 10 and all(torch.allclose(plain[:, :, m], plain[:, :, 0], rtol=0, atol=1e-6) for m in range(4))
    model = trained(3.0)
    memory = model.move_memory
    first, last = [memory.routers[i].bias.detach().view(2, 5) for i in (0, 2)]
    # LaVE turns: layer 0 owns slots 0 and 2, layer 2 owns 1 and 3 (m mod 2); layer 1 owns none
    expected_first = torch.tensor([0.0, 0, -3, 0, -3])
    assert torch.allclose(first, expected_first.expand(2, 5), atol=0.2)  # (trained 4 steps at 3e-2)
    assert (last[:, [2, 4]] > -0.2).all() and (last[:, [1, 3]] < -2.8).all()
    assert (memory.routers[1].bias.detach().view(2, 5)[:, 1:] < -2.8).all()
    bank = memory.bank.weight.detach()
    assert (bank[:, :, 0] - bank[:, :, 1]).abs().max() > 1e-2
    from move.export.retrofit_measures import memory_use

    corpus = Corpus(ids(1, 65).flatten().numpy())
    used = memory_use(memory, lambda x: model(input_ids=x).logits, corpus, 16, 64, 2)
    assert used["1"]["slot_gate_mean"] < 0.5 < used["1"]["g0_mean"]  # the gates as mixed: the bias included
    assert api.retrofit_accounting(model)["params"]["routers"] == 3 * (32 * 10 + 10)  # weights and biases
    model.save_pretrained(tmp_path / "saved")
    loaded = api.load_retrofitted(tmp_path / "saved").eval()
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model.eval()(input_ids=x).logits)
    with pytest.raises(ConfigError, match="layer-assigned start"):
        api.retrofit(random_model("llama-gqa"), layout="lave", layer_start_bias=3.0)
    from move.config import RetrofitRun

    with pytest.raises(ConfigError, match="bank option"):  # refused before a model is loaded
        RetrofitRun(memory="lave", layer_start_bias=3.0).validate()


def test_the_trainer_trains_a_retrofit_as_a_plain_loop_of_its_optimisers_does(tmp_path, prepared_dir):
    """Bank + LoRA + dense weights through the project's Trainer equal, bit for bit, the
    plain loop written here: the same batches, each part's own AdamW (the bank's
    TableAdamW), constant rates, no clipping. The checkpoint holds what trains."""
    import torch.nn.functional as F

    from move.config import RetrofitRun
    from move.export.retrofit_trainable import RetrofitTask, TrainableRetrofit, train_config, training_batches
    from move.export.retrofit_training import add_lora
    from move.text.prepare import load_prepared
    from move.training.checkpoint import load_state_dict
    from move.training.table_adamw import TableAdamW
    from move.training.trainer import Trainer

    data = load_prepared(prepared_dir)
    run = RetrofitRun(slots=2, lora_rank=4, lr_memory=0.05, lr_router=0.01, lr_lora=1e-2, lr_dense=1e-3)
    run = RetrofitRun(**{**run.to_dict(), "steps": 4, "batch_size": 2, "seq_len": 16, "eval_tokens": 64})
    run.checkpoint_every = 2

    def build():  # twice the same model (a retrofitted model's hooks do not survive deepcopy)
        torch.manual_seed(0)
        base = api.retrofit(transformers.LlamaForCausalLM(llama_family(transformers.LlamaConfig, vocab=512)), slots=2)
        return add_lora(base, 4)

    ours, theirs = build(), build()
    net = TrainableRetrofit(ours, run)
    task = RetrofitTask(data, {"val": data}, None, run, {})
    Trainer(net, task, train_config(run), tmp_path / "run", quiet=True, keep_steps=frozenset({2})).run()

    named = dict(theirs.named_parameters())
    for p in theirs.parameters():
        p.requires_grad_(True)
    memory = theirs.move_memory
    parts = {
        "dense": [p for n, p in named.items() if "move_memory" not in n and "lora_" not in n],
        "lora": [p for n, p in named.items() if "lora_" in n],
    }
    optimizers = [
        torch.optim.AdamW(parts["dense"], lr=1e-3, weight_decay=0.0),
        torch.optim.AdamW(parts["lora"], lr=1e-2, weight_decay=0.0),
        TableAdamW([t.weight for t in memory.value_tables()], lr=0.05),
        torch.optim.AdamW(memory.routers.parameters(), lr=0.01, weight_decay=0.0),
    ]
    loader = training_batches(data, run)
    theirs.train()
    for _ in range(run.steps):
        x, y = loader.next_batch()
        logits = theirs(input_ids=x).logits.float()
        F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1).backward()
        for optimizer in optimizers:
            optimizer.step()
        theirs.zero_grad(set_to_none=True)
    for name, p in ours.named_parameters():
        assert torch.equal(p, named[name]), name
    assert not torch.equal(memory.bank.weight, torch.zeros_like(memory.bank.weight))
    weights, _ = load_state_dict(tmp_path / "run" / "checkpoints" / "step_000002")
    assert set(weights) == {f"model.{n}" for n, p in ours.named_parameters() if p.requires_grad}
    frozen = TrainableRetrofit(build(), RetrofitRun(slots=2, lora_rank=4))
    assert {k for k in frozen.state_dict() if "move_memory" not in k and "lora_" not in k} == set()
    with pytest.raises(RuntimeError, match="exactly the trained parameters"):
        frozen.load_state_dict(weights)  # holds dense weights the frozen one does not train


def test_a_retrofit_stopped_by_a_signal_resumes_to_the_uninterrupted_result(tmp_path, prepared_dir, monkeypatch):
    """`move retrofit` stopped by SIGTERM mid-run saves a checkpoint; --resume ends with
    the same bank, measures and losses as a run never stopped; a finished run's
    checkpoints are removed, and --resume of it returns its summary untouched."""
    import json
    import os
    import signal

    from safetensors.torch import load_file

    from move.cli import main
    from move.export import retrofit_trainable
    from move.text.prepare import load_prepared

    vocab = load_prepared(prepared_dir).tokenizer.vocab_size
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(llama_family(transformers.LlamaConfig, vocab=vocab)).save_pretrained(
        tmp_path / "base"
    )
    flags = ["--data", str(prepared_dir), "--steps", "6", "--batch-size", "2", "--seq-len", "16"]
    flags += ["--eval-tokens", "256", "--slots", "2", "--lr-memory", "0.05", "--checkpoint-every", "2"]
    assert main(["retrofit", str(tmp_path / "base"), *flags, "--out", str(tmp_path / "whole")]) == 0
    assert not (tmp_path / "whole" / "checkpoints").exists()

    batches = retrofit_trainable.training_batches

    class StopAtThird:
        def __init__(self, loader):
            self.loader, self.calls = loader, 0

        def next_batch(self):
            self.calls += 1
            if self.calls == 3:  # the signal arrives during step 3: it ends, is saved, the run stops
                os.kill(os.getpid(), signal.SIGTERM)
            return self.loader.next_batch()

        def state_dict(self):
            return self.loader.state_dict()

        def load_state_dict(self, state):
            self.loader.load_state_dict(state)

    monkeypatch.setattr(retrofit_trainable, "training_batches", lambda *a: StopAtThird(batches(*a)))
    stopped = str(tmp_path / "stopped")
    assert main(["retrofit", str(tmp_path / "base"), *flags, "--out", stopped]) == 0
    assert [p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()] == ["step_000003"]
    assert not (tmp_path / "stopped" / "retrofit.json").exists()
    monkeypatch.setattr(retrofit_trainable, "training_batches", batches)
    assert main(["retrofit", str(tmp_path / "base"), *flags, "--out", stopped]) == 2  # neither --resume nor --force
    assert main(["retrofit", str(tmp_path / "base"), *flags, "--out", stopped, "--resume"]) == 0
    whole = json.loads((tmp_path / "whole" / "retrofit.json").read_text())
    resumed = json.loads((tmp_path / "stopped" / "retrofit.json").read_text())
    assert resumed["after"] == whole["after"] and resumed["before"] == whole["before"]
    assert [resumed[k] for k in ("train_loss_first", "train_loss_last")] == [
        whole[k] for k in ("train_loss_first", "train_loss_last")
    ]
    bank = {k: v for k, v in load_file(tmp_path / "whole" / "model.safetensors").items() if "move_memory" in k}
    again = load_file(tmp_path / "stopped" / "model.safetensors")
    assert bank and all(torch.equal(v, again[k]) for k, v in bank.items())
    written = (tmp_path / "stopped" / "retrofit.json").stat().st_mtime_ns
    assert main(["retrofit", str(tmp_path / "base"), *flags, "--out", stopped, "--resume"]) == 0
    assert api.train_retrofit(tmp_path / "base", prepared_dir, stopped, api.RetrofitRun(), resume=True) == resumed
    assert (tmp_path / "stopped" / "retrofit.json").stat().st_mtime_ns == written
    assert main(["retrofit", str(tmp_path / "base"), *flags, "--out", stopped, "--force"]) == 0  # a run anew
    assert json.loads((tmp_path / "stopped" / "retrofit.json").read_text())["after"] == whole["after"]
    assert (tmp_path / "stopped" / "retrofit.json").stat().st_mtime_ns != written
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["retrofit", str(tmp_path / "base"), *flags, "--out", str(tmp_path / "other"), "--force"]) == 2
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"  # not a run: never replaced
