"""The knowledge-capacity probe: generator, recall evaluator, a tiny run."""

import hashlib
import math

import numpy as np
import pytest
import torch

from move.errors import ConfigError
from move.knowledge.corpus import (
    ATTRIBUTES,
    HELD_OUT_OPENER,
    KnowledgeConfig,
    classic_relations,
    held_out_documents,
    make_facts,
    make_names,
    prepare_knowledge,
    relations_of,
    training_documents,
    vocabulary,
)
from move.knowledge.recall import facts_in, load_knowledge, recall, relations_in
from move.text.prepare import load_prepared

PRIOR_BITS_PER_PERSON = sum(math.log2(len(values)) for _, values in ATTRIBUTES.values())


@pytest.mark.parametrize("name_tokens", [1, 2])
def test_generator_is_deterministic_and_names_are_unique(name_tokens):
    config = KnowledgeConfig(individuals=200, name_tokens=name_tokens, seed=3)
    assert training_documents(config) == training_documents(KnowledgeConfig(200, name_tokens, 3))
    assert training_documents(config) != training_documents(KnowledgeConfig(200, name_tokens, 4))
    names = make_names(config)
    assert len(set(names)) == 200 and all(len(n.split()) == name_tokens for n in names)


def test_train_and_test_phrasings_are_disjoint():
    config = KnowledgeConfig(individuals=50, name_tokens=2)
    train = {line for _, doc in training_documents(config) for line in doc.splitlines()}
    test = {line for _, doc in held_out_documents(config) for line in doc.splitlines()}
    assert len(train) == 50 * len(ATTRIBUTES) * 3 and len(test) == 50 * len(ATTRIBUTES)
    assert not train & test
    assert all(line.startswith(HELD_OUT_OPENER) for line in test)
    # every fact is in the training text, only under other phrasings
    names = make_names(config)
    for f in make_facts(config):
        assert classic_relations()[f.attribute].phrase("we know that", names[f.person], "key-first", f.value) in train


# sha256 of repr((training_documents, held_out_documents, vocabulary)) for
# KnowledgeConfig(20, name_tokens, seed=5), computed with the code before relations
# and orders were configurable: the default corpus must stay the same, token for token
DEFAULT_CORPUS_SHA256 = {
    1: "59b6a335a7587186a94f2c48d3497fa93f55279349c353411aeaff26947febfb",
    2: "05dadbff045d9a6fc75ba89b20ab0dfcb4065e54b51f107c2a1384b15050f471",
}


@pytest.mark.parametrize("name_tokens", [1, 2])
def test_default_corpus_is_the_first_studies_corpus(name_tokens):
    config = KnowledgeConfig(individuals=20, name_tokens=name_tokens, seed=5)
    text = repr((training_documents(config), held_out_documents(config), vocabulary(config)))
    assert hashlib.sha256(text.encode()).hexdigest() == DEFAULT_CORPUS_SHA256[name_tokens]


def test_query_first_writes_the_same_facts_with_the_query_before_the_name():
    key_first = KnowledgeConfig(individuals=30, relations=6, values=8, order="key-first")
    query_first = KnowledgeConfig(individuals=30, relations=6, values=8, order="query-first")
    assert make_facts(key_first) == make_facts(query_first) and make_names(key_first) == make_names(query_first)
    names = make_names(query_first)
    train = {line for _, doc in training_documents(query_first) for line in doc.splitlines()}
    assert len(train) == 30 * 6 * 3
    for f in make_facts(query_first):
        relation = f.attribute
        assert f"records show that the {relation} of {names[f.person]} is {f.value} ." in train
        assert f.value.startswith(relation + "v")  # each relation has values of its own
    held_out = [line for _, doc in held_out_documents(query_first) for line in doc.splitlines()]
    assert all(line.startswith("it is said that the r") for line in held_out)


def test_mixed_order_uses_both_and_records_each_prompts_order(tmp_path):
    config = KnowledgeConfig(individuals=40, relations=4, values=4, cue_tokens=2, order="mixed")
    prepare_knowledge(config, tmp_path / "data")
    knowledge = load_knowledge(tmp_path / "data")
    orders = [order for *_, order in facts_in(knowledge)]
    assert {"key-first", "query-first"} == set(orders)
    held_out = [line for _, doc in held_out_documents(config) for line in doc.splitlines()]
    names = knowledge["names"]
    relations = relations_in(knowledge)
    assert relations == relations_of(config) and relations["r2"].key_cue == "r2 r2w1"
    for line, (person, relation, value, order) in zip(held_out, facts_in(knowledge), strict=True):
        assert line == relations[relation].phrase("it is said that", names[person], order, value)
    train = [line for _, doc in training_documents(config) for line in doc.splitlines()]
    query_lines = sum(" of person" in line for line in train)
    assert 0.35 < query_lines / len(train) < 0.65


@pytest.mark.parametrize(
    "fields",
    [{"order": "backwards"}, {"relations": -1}, {"relations": 2, "values": 1}, {"values": 8}, {"cue_tokens": 0}],
)
def test_bad_corpus_options_are_refused(fields):
    with pytest.raises(ConfigError):
        KnowledgeConfig(individuals=10, **fields).validate()


@pytest.fixture(scope="module")
def knowledge_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("kc") / "data"
    prepare_knowledge(KnowledgeConfig(individuals=40, name_tokens=1), out)
    return load_prepared(out), load_knowledge(out)


class LookupModel(torch.nn.Module):
    """A hand-built model that knows every fact (or nothing, with uniform=True): after
    each prompt, and after each prefix of the value's tokens, it puts its mass on the
    value's next token."""

    def __init__(self, data, knowledge, uniform=False):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # recall() reads the device from a parameter
        self.vocab, self.uniform, self.answers = data.tokenizer.vocab_size, uniform, {}
        tok = data.tokenizer
        relations = relations_in(knowledge)
        for person, relation, value, order in facts_in(knowledge):
            phrase = relations[relation].phrase(knowledge["held_out_opener"], knowledge["names"][person], order)
            prompt, sentence = tok.encode(phrase), tok.encode(f"{phrase} {value}")
            for end in range(len(prompt), len(sentence)):
                self.answers[(tok.bos_id, *sentence[:end])] = sentence[end]

    def forward(self, x):
        logits = torch.zeros(*x.shape, self.vocab)
        if not self.uniform:
            for i, row in enumerate(x.tolist()):
                for t in range(len(row)):
                    if (answer := self.answers.get(tuple(row[: t + 1]))) is not None:
                        logits[i, t, answer] = 50.0
        return logits


def test_perfect_model_scores_every_fact(knowledge_data):
    data, knowledge = knowledge_data
    result = recall(LookupModel(data, knowledge), data.tokenizer, knowledge)
    assert result["recall_accuracy"] == 1.0 and result["facts"] == 40 * len(ATTRIBUTES)
    assert result["knowledge_bits"] == pytest.approx(40 * PRIOR_BITS_PER_PERSON, rel=1e-4)
    assert result["knowledge_bits_exact"] == pytest.approx(40 * PRIOR_BITS_PER_PERSON)


def test_perfect_model_scores_every_fact_in_either_order(tmp_path):
    config = KnowledgeConfig(individuals=25, relations=3, values=16, cue_tokens=2, order="mixed")
    prepare_knowledge(config, tmp_path / "data")
    data, knowledge = load_prepared(tmp_path / "data"), load_knowledge(tmp_path / "data")
    result = recall(LookupModel(data, knowledge), data.tokenizer, knowledge)
    assert result["recall_accuracy"] == 1.0 and result["facts"] == 25 * 3
    assert result["knowledge_bits"] == pytest.approx(25 * 3 * 4, rel=1e-4)  # log2 16 bits a fact


def test_uniform_model_is_at_chance_and_stores_nothing(knowledge_data):
    data, knowledge = knowledge_data
    result = recall(LookupModel(data, knowledge, uniform=True), data.tokenizer, knowledge)
    chance = np.mean([1 / len(v) for _, v in ATTRIBUTES.values()])
    assert result["recall_probability"] == pytest.approx(chance) == pytest.approx(result["chance_accuracy"])
    assert result["knowledge_bits"] == pytest.approx(0, abs=1e-3)


def test_tiny_run_stores_knowledge(knowledge_data, tmp_path):
    from move.cli import main

    data, _ = knowledge_data
    assert (
        main(
            [
                "train",
                "--data",
                str(data.directory),
                "--out",
                str(tmp_path / "run"),
                "--preset",
                "tiny",
                "--variant",
                "move",
                "--steps",
                "40",
                "--batch-size",
                "16",
                "--eval-every",
                "40",
                "--eval-tokens",
                "2048",
                "--checkpoint-every",
                "40",
            ]
        )
        == 0
    )
    import json

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["task"]["modality"] == "knowledge"
    assert summary["recall_accuracy"] > summary["chance_accuracy"] and summary["knowledge_bits"] > 0
    # asked under a training opener: the sentences it was trained on score at least as well here
    import contextlib
    import io

    for opener in ("we know that", "it is said that"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["knowledge-eval", str(tmp_path / "run"), "--opener", opener]) == 0
        result = json.loads(out.getvalue())
        assert result["facts"] == summary["facts"]
        if opener == "it is said that":  # the held-out opener: what training reported
            assert result["knowledge_bits"] == pytest.approx(summary["knowledge_bits"], rel=1e-6)


def test_knowledge_files_from_before_relations_read_as_the_classic_five():
    knowledge = {"facts": [[3, "city", "city7"], [3, "pet", "dog"]]}
    assert relations_in(knowledge) == classic_relations()
    assert facts_in(knowledge) == [(3, "city", "city7", "key-first"), (3, "pet", "dog", "key-first")]


def test_a_corpus_made_before_an_option_existed_is_kept_not_refused(tmp_path):
    """A manifest written before an option was added lacks it; the corpus was made with
    its default, so preparing the same corpus again keeps it (an experiment's set-up
    reruns its data commands every time); another value is still refused."""
    import json

    from move.cli import main
    from move.errors import DataError
    from move.knowledge.corpus import KnowledgeConfig, prepare_knowledge

    out = tmp_path / "facts"
    assert main(["knowledge-prepare", "--individuals", "20", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["options"]["value_words"], manifest["options"]["order"]  # as older versions wrote it
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert prepare_knowledge(KnowledgeConfig(individuals=20), out)["options"] == manifest["options"]
    with pytest.raises(DataError, match="order: 'key-first', not 'query-first'"):
        prepare_knowledge(KnowledgeConfig(individuals=20, order="query-first"), out)


@pytest.mark.parametrize("knowledge", [{"facts": [[1]]}, {"facts": 5}, {"relations": {"r0": {"key_cue": "x"}}}])
def test_malformed_knowledge_files_are_one_line_errors(knowledge):
    from move.errors import DataError

    with pytest.raises(DataError, match="malformed"):
        relations_in(knowledge) if "relations" in knowledge else facts_in(knowledge)


def test_a_pretrained_tokenizer_gives_multi_token_values_and_recall_scores_them(tmp_path):
    """GPT-2's vocabulary (shipped offline) cuts names and values into several tokens:
    recall scores a value by all of its tokens, and a model that knows every fact
    stores every bit."""
    from move.cli import main
    from move.text.tokenizer import Tokenizer

    Tokenizer.gpt2().save(tmp_path)
    flags = ["--individuals", "12", "--relations", "3", "--values", "8", "--order", "mixed"]
    assert (
        main(
            [
                "knowledge-prepare",
                *flags,
                "--tokenizer",
                str(tmp_path / "tokenizer.json"),
                "--out",
                str(tmp_path / "kc"),
            ]
        )
        == 0
    )
    data, knowledge = load_prepared(tmp_path / "kc"), load_knowledge(tmp_path / "kc")
    assert data.tokenizer.vocab_size == 50257
    assert len(data.tokenizer.encode(" r1v7")) > 1  # really multi-token
    result = recall(LookupModel(data, knowledge), data.tokenizer, knowledge)
    assert result["recall_accuracy"] == 1.0 and result["knowledge_bits"] == pytest.approx(12 * 3 * 3, rel=1e-4)
    wrong = LookupModel(data, knowledge)
    wrong.answers = {k: (v + 1) % 50257 for k, v in wrong.answers.items()}  # confidently wrong on every token
    assert recall(wrong, data.tokenizer, knowledge)["knowledge_bits"] == pytest.approx(0, abs=1e-3)


def test_word_values_are_one_token_each_under_the_pretrained_tokenizer(tmp_path, capsys):
    from move.cli import main
    from move.knowledge.recall import value_tokens
    from move.text.tokenizer import Tokenizer

    Tokenizer.gpt2().save(tmp_path)
    tokenizer = str(tmp_path / "tokenizer.json")
    flags = ["--individuals", "15", "--name-tokens", "2", "--word-values", "--out", str(tmp_path / "kc")]
    assert main(["knowledge-prepare", *flags, "--tokenizer", tokenizer]) == 0
    data, knowledge = load_prepared(tmp_path / "kc"), load_knowledge(tmp_path / "kc")
    relations = relations_in(knowledge)
    values = [v for r in relations.values() for v in r.values]
    assert len(values) == len(set(values)) == sum(len(v) for _, v in ATTRIBUTES.values())
    assert all(v.isalpha() and v.islower() for v in values)
    for name, relation in relations.items():
        prompt = relation.phrase("it is said that", knowledge["names"][0], "key-first")
        assert all(len(t) == 1 for t in value_tokens(data.tokenizer, prompt, relation.values)), name
    result = recall(LookupModel(data, knowledge), data.tokenizer, knowledge)
    assert result["recall_accuracy"] == 1.0 and result["knowledge_bits"] == pytest.approx(15 * PRIOR_BITS_PER_PERSON)
    assert main(["knowledge-prepare", "--individuals", "5", "--word-values", "--out", str(tmp_path / "kc2")]) == 2
    assert "--tokenizer" in capsys.readouterr().err
