"""A synthetic knowledge corpus in the spirit of the knowledge-capacity studies
("Physics of Language Models, Part 3.3"): N fictional individuals, each with K
attributes drawn from fixed value sets, written as sentences.

Every sentence is  [opener] <name> <relation cue> <value> .
The openers are the paraphrase templates: the training text uses all but the
last opener for every fact, the test prompts use only the held-out opener, so
recall is measured in a context never seen in training - of a stored fact, not
of a memorised sentence. Values are single tokens; the tokenizer is word-level,
so a name is exactly as many tokens as it was built from:
    name_tokens = 1   every name is its own token (token-indexed memory can hold
                      the person's facts in that token's rows)
    name_tokens = 2+  names are sequences of syllables shared by many people (no
                      single token identifies a person)
Seeded and reproducible: the same (individuals, name_tokens, seed) gives the
same people, facts and text.
"""

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from move.config import SerialConfig
from move.errors import ConfigError
from move.files import existing_data
from move.text.prepare import write_prepared
from move.text.tokenizer import Tokenizer

SYLLABLES = [
    "ka",
    "lo",
    "ri",
    "ta",
    "mi",
    "no",
    "su",
    "ve",
    "da",
    "ro",
    "pe",
    "zu",
    "fa",
    "ni",
    "go",
    "le",
    "ba",
    "xo",
    "wi",
    "ju",
    "ke",
    "so",
    "ma",
    "te",
    "vi",
    "ha",
    "du",
    "ly",
    "qo",
    "ne",
    "bi",
    "co",
    "fe",
    "gu",
    "hi",
    "jo",
    "ku",
    "lu",
    "mo",
    "pa",
]
ATTRIBUTES = {  # attribute -> (relation cue, value set)
    "city": ("was born in", [f"city{i}" for i in range(32)]),
    "year": ("was born in the year", [str(1900 + i) for i in range(64)]),
    "employer": ("works for", [f"company{i}" for i in range(32)]),
    "field": ("studied", [f"field{i}" for i in range(16)]),
    "pet": ("owns a", ["cat", "dog", "horse", "parrot", "rabbit", "turtle", "snake", "goat"]),
}
OPENERS = ["", "we know that", "records show that", "it is said that"]  # the last one is held out
HELD_OUT_OPENER = OPENERS[-1]
KNOWLEDGE_FILE = "knowledge.json"


@dataclass
class KnowledgeConfig(SerialConfig):
    individuals: int = 1000
    name_tokens: int = 1
    seed: int = 0

    def validate(self) -> "KnowledgeConfig":
        if self.individuals < 1:
            raise ConfigError(f"individuals must be >= 1, got {self.individuals}")
        if self.name_tokens < 1:
            raise ConfigError(f"name_tokens must be >= 1, got {self.name_tokens}")
        if self.name_tokens > 1 and len(SYLLABLES) ** self.name_tokens < self.individuals:
            raise ConfigError(f"{self.individuals} unique names need more than {self.name_tokens} syllables each")
        return self


@dataclass(frozen=True)
class Fact:
    person: int
    attribute: str
    value: str


def make_names(config: KnowledgeConfig) -> list[str]:
    rng = np.random.default_rng([config.seed, 1])
    if config.name_tokens == 1:
        return [f"person{i}" for i in rng.permutation(config.individuals)]
    combos = list(itertools.product(SYLLABLES, repeat=config.name_tokens))
    chosen = rng.choice(len(combos), size=config.individuals, replace=False)
    return [" ".join(combos[i]).title() for i in chosen]


def make_facts(config: KnowledgeConfig) -> list[Fact]:
    rng = np.random.default_rng([config.seed, 2])
    return [
        Fact(p, a, values[rng.integers(len(values))])
        for p in range(config.individuals)
        for a, (_, values) in ATTRIBUTES.items()
    ]


def sentence(opener: str, name: str, attribute: str, value: str | None = None) -> str:
    """The sentence of a fact; without a value, the prompt that asks for it."""
    cue = ATTRIBUTES[attribute][0]
    words = [opener, name, cue] if opener else [name, cue]
    return " ".join(words) + ("" if value is None else f" {value} .")


def training_documents(config: KnowledgeConfig) -> list[tuple[str, str]]:
    """One document per person: every fact under every training opener, shuffled."""
    names, facts = make_names(config), make_facts(config)
    rng = np.random.default_rng([config.seed, 3])
    docs = []
    for p in range(config.individuals):
        lines = [
            sentence(o, names[p], f.attribute, f.value)
            for f in facts[p * len(ATTRIBUTES) : (p + 1) * len(ATTRIBUTES)]
            for o in OPENERS[:-1]
        ]
        docs.append((f"person{p}", "\n".join(lines[i] for i in rng.permutation(len(lines))) + "\n"))
    return docs


def held_out_documents(config: KnowledgeConfig) -> list[tuple[str, str]]:
    """The held-out phrasing of every fact (for validation loss)."""
    names, facts = make_names(config), make_facts(config)
    return [
        (
            f"test{p}",
            "\n".join(
                sentence(HELD_OUT_OPENER, names[p], f.attribute, f.value)
                for f in facts[p * len(ATTRIBUTES) : (p + 1) * len(ATTRIBUTES)]
            )
            + "\n",
        )
        for p in range(config.individuals)
    ]


def vocabulary(config: KnowledgeConfig) -> list[str]:
    words = [w for o in OPENERS for w in o.split()]
    words += [w for name in make_names(config) for w in name.split()]
    for cue, values in ATTRIBUTES.values():
        words += cue.split() + values
    return [*words, "."]


def prepare_knowledge(config: KnowledgeConfig, out_dir, force: bool = False) -> dict:
    """A prepared text directory (train: training openers; val: the held-out
    opener) plus knowledge.json, the facts and names the recall probe asks about."""

    config.validate()
    out_dir = Path(out_dir)
    options = {"source": "knowledge", **asdict(config)}
    kept = existing_data(out_dir, force, options, lambda manifest: manifest["options"])
    if kept is not None:
        return kept
    tokenizer = Tokenizer.word_level(vocabulary(config))
    docs = lambda: training_documents(config) + held_out_documents(config)
    split_of = lambda doc_id: "val" if doc_id.startswith("test") else "train"
    record = {"options": options, "split_rule": "val = every fact under the held-out opener; train = the other openers"}
    facts = make_facts(config)
    knowledge = {
        "config": asdict(config),
        "names": make_names(config),
        "held_out_opener": HELD_OUT_OPENER,
        "facts": [[f.person, f.attribute, f.value] for f in facts],
    }
    return write_prepared(
        docs, split_of, tokenizer, 256, out_dir, record, extra_files={KNOWLEDGE_FILE: json.dumps(knowledge, indent=2)}
    )
