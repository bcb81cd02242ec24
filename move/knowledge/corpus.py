"""A synthetic knowledge corpus in the spirit of the knowledge-capacity studies
("Physics of Language Models, Part 3.3"): N fictional individuals, each with one
value per relation, drawn from the relation's value set, written as sentences.

Relations: by default the five classic attributes (city, year, employer, field,
pet, with multi-word cues such as "was born in"); with `relations = R` instead R
synthetic relations "r<i>" of `values` single-token values each, cued by
`cue_tokens` words.

Order: every sentence is  [opener] <fact> .  with the fact written
    key-first     <name> <relation cue> <value>        (the default)
    query-first   the <relation> of <name> is <value>
    mixed         each sentence (and each test prompt) one of the two, seeded.
The order matters to a token-indexed memory read by causal gates: key-first, the
gates at the name cannot know which relation will be asked, so the name's rows can
only contribute one fixed mixture per layer and head; query-first, they can pick a
slot per relation (docs/knowledge.md derives the bound).

The openers are the paraphrase templates: the training text uses all but the
last opener for every fact, the test prompts use only the held-out opener, so
recall is measured in a context never seen in training - of a stored fact, not
of a memorised sentence. Values are single tokens; the tokenizer is word-level,
so a name is exactly as many tokens as it was built from:
    name_tokens = 1   every name is its own token (token-indexed memory can hold
                      the person's facts in that token's rows)
    name_tokens = 2+  names are sequences of syllables shared by many people (no
                      single token identifies a person)
Seeded and reproducible: the same config gives the same people, facts and text;
the default config gives the corpus of the first probe studies, token for token.
"""

import itertools
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from move.config import SerialConfig
from move.errors import ConfigError, DataError
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
ORDERS = ("key-first", "query-first", "mixed")
MAX_RELATIONS = 256
MAX_VALUES = 4096


@dataclass(frozen=True)
class Relation:
    key_cue: str  # key-first: "<name> <key_cue> <value>"
    query_cue: str  # query-first: "the <query_cue> of <name> is <value>"
    values: tuple[str, ...]

    def phrase(self, opener: str, name: str, order: str, value: str | None = None) -> str:
        """The sentence of a fact in the given order; without a value, the prompt
        that asks for it."""
        words = [opener] if opener else []
        words += [name, self.key_cue] if order == "key-first" else ["the", self.query_cue, "of", name, "is"]
        return " ".join(words) + ("" if value is None else f" {value} .")


@dataclass
class KnowledgeConfig(SerialConfig):
    individuals: int = 1000
    name_tokens: int = 1
    seed: int = 0
    relations: int = 0  # 0: the five classic attributes; R > 0: R synthetic relations
    values: int = 32  # values per synthetic relation
    cue_tokens: int = 1  # words in a synthetic relation's cue
    order: str = "key-first"  # key-first | query-first | mixed
    # words the values are drawn from instead of the invented ones (city5, r3v12), in
    # order: one token each under a pretrained tokenizer (single_token_words), so that
    # recall scores a value with one forward pass
    value_words: list[str] = field(default_factory=list)

    def validate(self) -> "KnowledgeConfig":
        if self.individuals < 1:
            raise ConfigError(f"individuals must be >= 1, got {self.individuals}")
        if self.name_tokens < 1:
            raise ConfigError(f"name_tokens must be >= 1, got {self.name_tokens}")
        if self.name_tokens > 1 and len(SYLLABLES) ** self.name_tokens < self.individuals:
            raise ConfigError(f"{self.individuals} unique names need more than {self.name_tokens} syllables each")
        if self.order not in ORDERS:
            raise ConfigError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if not 0 <= self.relations <= MAX_RELATIONS:
            raise ConfigError(f"relations must lie in [0, {MAX_RELATIONS}] (0: the classic five), got {self.relations}")
        if not 2 <= self.values <= MAX_VALUES:
            raise ConfigError(f"values must lie in [2, {MAX_VALUES}], got {self.values}")
        if not 1 <= self.cue_tokens <= 8:
            raise ConfigError(f"cue_tokens must lie in [1, 8], got {self.cue_tokens}")
        if self.relations == 0 and (self.values, self.cue_tokens) != (32, 1):
            raise ConfigError("values and cue_tokens set synthetic relations: give relations > 0 too")
        if self.value_words:
            needed = value_count(self)
            words = self.value_words
            if len(words) < needed or len(set(words)) != len(words) or not all(w.isalpha() for w in words):
                raise ConfigError(f"value_words must be {needed} or more distinct alphabetic words")
        return self


def classic_relations() -> dict[str, Relation]:
    """The five attributes of the first probe studies; asked query-first by their name
    ("the city of <name> is")."""
    return {a: Relation(cue, a, tuple(values)) for a, (cue, values) in ATTRIBUTES.items()}


def value_count(config: KnowledgeConfig) -> int:
    """The values of all relations together."""
    return (
        sum(len(values) for _, values in ATTRIBUTES.values())
        if config.relations == 0
        else config.relations * config.values
    )


def relations_of(config: KnowledgeConfig) -> dict[str, Relation]:
    """The relations a corpus asks about, by name, in the order facts are drawn; with
    value_words, their values are those words, relation after relation."""
    relations = invented_relations(config)
    if not config.value_words:
        return relations
    words = iter(config.value_words)
    return {a: replace(r, values=tuple(next(words) for _ in r.values)) for a, r in relations.items()}


def single_token_words(tokenizer: Tokenizer, count: int, seed: int) -> list[str]:
    """`count` distinct lowercase words of 4-10 letters that the tokenizer writes as one
    token after a space, drawn by seed: real words, invented facts."""
    words = sorted(
        word
        for word in (tokenizer.hf.decode([i]) for i in range(tokenizer.vocab_size))
        if word.startswith(" ")
        and word[1:].isascii()
        and word[1:].isalpha()
        and word[1:].islower()
        and 4 <= len(word) - 1 <= 10
        and len(tokenizer.encode(word)) == 1
    )
    if len(words) < count:
        raise DataError(f"the tokenizer has {len(words)} one-token words, the corpus needs {count}")
    rng = np.random.default_rng([seed, 6])
    return [words[i][1:] for i in rng.choice(len(words), size=count, replace=False)]


def invented_relations(config: KnowledgeConfig) -> dict[str, Relation]:
    if config.relations == 0:
        return classic_relations()
    cues = [" ".join([f"r{i}", *(f"r{i}w{j}" for j in range(1, config.cue_tokens))]) for i in range(config.relations)]
    return {f"r{i}": Relation(cue, cue, tuple(f"r{i}v{k}" for k in range(config.values))) for i, cue in enumerate(cues)}


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
        Fact(p, a, r.values[rng.integers(len(r.values))])
        for p in range(config.individuals)
        for a, r in relations_of(config).items()
    ]


def sentence_orders(config: KnowledgeConfig, count: int, stream: int) -> list[str]:
    """The order of each of `count` sentences: the config's, or (mixed) one of the two
    per sentence, from its own seeded stream so that the other draws are unchanged."""
    if config.order != "mixed":
        return [config.order] * count
    rng = np.random.default_rng([config.seed, stream])
    return [ORDERS[i] for i in rng.integers(2, size=count)]


def held_out_orders(config: KnowledgeConfig) -> list[str]:
    """The order of each fact's held-out sentence (and recall prompt), fact by fact."""
    return sentence_orders(config, config.individuals * len(relations_of(config)), 5)


def training_documents(config: KnowledgeConfig) -> list[tuple[str, str]]:
    """One document per person: every fact under every training opener, shuffled."""
    names, facts, relations = make_names(config), make_facts(config), relations_of(config)
    per_person = len(relations)
    orders = iter(sentence_orders(config, len(facts) * (len(OPENERS) - 1), 4))
    rng = np.random.default_rng([config.seed, 3])
    docs = []
    for p in range(config.individuals):
        lines = [
            relations[f.attribute].phrase(o, names[p], next(orders), f.value)
            for f in facts[p * per_person : (p + 1) * per_person]
            for o in OPENERS[:-1]
        ]
        docs.append((f"person{p}", "\n".join(lines[i] for i in rng.permutation(len(lines))) + "\n"))
    return docs


def held_out_documents(config: KnowledgeConfig) -> list[tuple[str, str]]:
    """The held-out phrasing of every fact (for validation loss)."""
    names, facts, relations = make_names(config), make_facts(config), relations_of(config)
    orders = held_out_orders(config)
    per_person = len(relations)
    return [
        (
            f"test{p}",
            "\n".join(
                relations[f.attribute].phrase(HELD_OUT_OPENER, names[p], orders[i], f.value)
                for i, f in enumerate(facts[p * per_person : (p + 1) * per_person], start=p * per_person)
            )
            + "\n",
        )
        for p in range(config.individuals)
    ]


def vocabulary(config: KnowledgeConfig) -> list[str]:
    words = [w for o in OPENERS for w in o.split()]
    words += [w for name in make_names(config) for w in name.split()]
    relations = relations_of(config).values()
    for r in relations:
        words += r.key_cue.split() + list(r.values)
    if config.order != "key-first":
        words += ["the", "of", "is"] + [w for r in relations for w in r.query_cue.split()]
    return [*words, "."]


def prepare_knowledge(
    config: KnowledgeConfig, out_dir, force: bool = False, pretrained: Tokenizer | None = None, tokenizer_name: str = ""
) -> dict:
    """A prepared text directory (train: training openers; val: the held-out
    opener) plus knowledge.json, the facts and names the recall probe asks about.
    The tokenizer is word-level (a name is exactly name_tokens tokens), or a pretrained
    model's (`pretrained`, named tokenizer_name in the manifest), under which names and
    values are as many tokens as its merges make them."""

    config.validate()
    out_dir = Path(out_dir)
    options = {"source": "knowledge", **asdict(config)}
    if pretrained is not None:
        options["tokenizer"] = tokenizer_name or "pretrained"
    kept = existing_data(out_dir, force, options, lambda manifest: manifest["options"], asdict(KnowledgeConfig()))
    if kept is not None:
        return kept
    tokenizer = pretrained or Tokenizer.word_level(vocabulary(config))
    docs = lambda: training_documents(config) + held_out_documents(config)
    split_of = lambda doc_id: "val" if doc_id.startswith("test") else "train"
    record = {"options": options, "split_rule": "val = every fact under the held-out opener; train = the other openers"}
    facts = make_facts(config)
    knowledge = {
        "config": asdict(config),
        "names": make_names(config),
        "held_out_opener": HELD_OUT_OPENER,
        "relations": {a: asdict(r) for a, r in relations_of(config).items()},
        "facts": [[f.person, f.attribute, f.value, order] for f, order in zip(facts, held_out_orders(config))],
    }
    return write_prepared(
        docs, split_of, tokenizer, 256, out_dir, record, extra_files={KNOWLEDGE_FILE: json.dumps(knowledge, indent=2)}
    )
