"""The knowledge-capacity probe: generator, recall evaluator, a tiny run."""

import math

import numpy as np
import pytest
import torch

from move.knowledge.corpus import (
    ATTRIBUTES,
    HELD_OUT_OPENER,
    KnowledgeConfig,
    held_out_documents,
    make_facts,
    make_names,
    prepare_knowledge,
    sentence,
    training_documents,
)
from move.knowledge.recall import load_knowledge, recall
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
        assert sentence("we know that", names[f.person], f.attribute, f.value) in train


@pytest.fixture(scope="module")
def knowledge_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("kc") / "data"
    prepare_knowledge(KnowledgeConfig(individuals=40, name_tokens=1), out)
    return load_prepared(out), load_knowledge(out)


class LookupModel(torch.nn.Module):
    """A hand-built model that knows every fact (or nothing, with uniform=True)."""

    def __init__(self, data, knowledge, uniform=False):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # recall() reads the device from a parameter
        self.vocab, self.uniform, self.answers = data.tokenizer.vocab_size, uniform, {}
        tok = data.tokenizer
        for person, attribute, value in knowledge["facts"]:
            prompt = [
                tok.bos_id,
                *tok.encode(sentence(knowledge["held_out_opener"], knowledge["names"][person], attribute)),
            ]
            self.answers[tuple(prompt)] = tok.encode(value)[0]

    def forward(self, x):
        logits = torch.zeros(*x.shape, self.vocab)
        if not self.uniform:
            for i, row in enumerate(x.tolist()):
                logits[i, -1, self.answers[tuple(row)]] = 50.0
        return logits


def test_perfect_model_scores_every_fact(knowledge_data):
    data, knowledge = knowledge_data
    result = recall(LookupModel(data, knowledge), data.tokenizer, knowledge)
    assert result["recall_accuracy"] == 1.0 and result["facts"] == 40 * len(ATTRIBUTES)
    assert result["knowledge_bits"] == pytest.approx(40 * PRIOR_BITS_PER_PERSON, rel=1e-4)
    assert result["knowledge_bits_exact"] == pytest.approx(40 * PRIOR_BITS_PER_PERSON)


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
