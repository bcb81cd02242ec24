"""Recall of stored facts, and the knowledge stored in bits.

For every (person, relation) the model reads the held-out phrasing up to the
value, "it is said that <name> <cue>" (key-first) or "it is said that the
<relation> of <name> is" (query-first), and is scored on the relation's value set
only (the probe asks which value, not whether the next word is a value):
    probability   p(correct value), softmax over the value set
    accuracy      the correct value is the most likely one
    bits (exact)  sum over correctly recalled facts of log2 |value set|
    bits          sum over facts of max(0, log2 |value set| + log2 p(correct)):
                  the information the model holds about the value beyond the
                  uniform prior - the cross-entropy estimate of the capacity
                  studies; 0 for a model at chance, log2 |V| per perfectly
                  stored fact.
"""

import math
from pathlib import Path

import torch

from move.device import evaluating
from move.errors import DataError
from move.knowledge.corpus import KNOWLEDGE_FILE, Relation, classic_relations
from move.readers import read_json_object

PROMPT_BATCH = 512


def load_knowledge(data_dir) -> dict:
    path = Path(data_dir) / KNOWLEDGE_FILE
    if not path.is_file():
        raise DataError(f"{path}: missing or unreadable knowledge file (no such file)")
    return read_json_object(path, "knowledge file")


def relations_in(knowledge: dict) -> dict[str, Relation]:
    """The relations of a knowledge file; files written before relations were
    configurable hold the five classic attributes."""
    if "relations" not in knowledge:
        return classic_relations()
    try:
        return {
            a: Relation(str(r["key_cue"]), str(r["query_cue"]), tuple(map(str, r["values"])))
            for a, r in knowledge["relations"].items()
        }
    except (TypeError, KeyError, AttributeError) as error:
        raise DataError(f"knowledge file: malformed relations ({error!r})") from None


def facts_in(knowledge: dict) -> list[tuple[int, str, str, str]]:
    """(person, relation, value, order of its prompt) per fact; key-first where a file
    written before orders were configurable does not say."""
    try:
        return [(int(f[0]), str(f[1]), str(f[2]), str(f[3]) if len(f) > 3 else "key-first") for f in knowledge["facts"]]
    except (TypeError, KeyError, IndexError, ValueError) as error:
        raise DataError(f"knowledge file: malformed facts ({error!r})") from None


def value_tokens(tokenizer, prompt: str, values) -> list[list[int]]:
    """Each value's tokens as they follow the prompt (one each under the word-level
    tokenizer; several under a pretrained BPE, whose pre-tokenizer splits at the
    space before the value, so they do not depend on the prompt)."""
    start = len(tokenizer.encode(prompt))
    tokens = []
    for value in values:
        full = tokenizer.encode(f"{prompt} {value}")
        if len(full) <= start:
            raise DataError(f"the tokenizer merges the value {value!r} into the prompt before it")
        tokens.append(full[start:])
    return tokens


def log_p_over_values(model, prompts: torch.Tensor, candidates: list[list[int]]) -> torch.Tensor:
    """(B, V) log-probabilities over the value set of each prompt (B, T): the model's
    probability of each value's tokens after the prompt, normalised over the set.
    Single-token values need one forward (the last position's logits over the set)."""
    if all(len(c) == 1 for c in candidates):
        ids = torch.tensor([c[0] for c in candidates], device=prompts.device)
        return torch.log_softmax(model(prompts)[:, -1, ids].float(), dim=-1)
    length = prompts.size(1)
    scores = []
    for tokens in candidates:  # prompt + the value but its last token; score each of its tokens
        value = torch.tensor(tokens, device=prompts.device).expand(prompts.size(0), -1)
        logits = model(torch.cat([prompts, value[:, :-1]], dim=1))[:, length - 1 :].float()
        scores.append(torch.log_softmax(logits, dim=-1).gather(2, value[..., None]).sum((1, 2)))
    return torch.log_softmax(torch.stack(scores, dim=1), dim=-1)


@torch.no_grad()
def recall(model, tokenizer, knowledge: dict) -> dict:
    with evaluating(model):
        device = next(model.parameters()).device
        names, opener = knowledge["names"], knowledge["held_out_opener"]
        totals = {"facts": 0, "correct": 0, "probability": 0.0, "bits": 0.0, "bits_exact": 0.0, "chance": 0.0}
        per_attribute = {}
        all_facts = facts_in(knowledge)
        for attribute, relation in relations_in(knowledge).items():
            values = relation.values
            facts = [(p, v, order) for p, a, v, order in all_facts if a == attribute]
            index = {v: i for i, v in enumerate(values)}
            texts = [relation.phrase(opener, names[p], order) for p, _, order in facts]
            prompts = [[tokenizer.bos_id, *tokenizer.encode(text)] for text in texts]
            candidates = value_tokens(tokenizer, texts[0], values)
            target = torch.tensor([index[v] for _, v, _ in facts], device=device)
            log_p = torch.empty(len(prompts), len(values), device=device)
            for length in sorted({len(x) for x in prompts}):  # batches of equal-length prompts
                rows = [i for i, x in enumerate(prompts) if len(x) == length]
                for i in range(0, len(rows), PROMPT_BATCH):
                    batch = rows[i : i + PROMPT_BATCH]
                    x = torch.tensor([prompts[j] for j in batch], device=device)
                    log_p[batch] = log_p_over_values(model, x, candidates)
            p_correct = log_p.gather(1, target[:, None]).squeeze(1)
            correct = log_p.argmax(dim=1) == target
            prior = math.log2(len(values))
            bits = (prior + p_correct / math.log(2)).clamp(min=0)
            per_attribute[attribute] = {
                "accuracy": correct.float().mean().item(),
                "chance": 1 / len(values),
                "bits": bits.sum().item(),
            }
            totals["facts"] += len(facts)
            totals["correct"] += int(correct.sum())
            totals["probability"] += p_correct.exp().sum().item()
            totals["bits"] += bits.sum().item()
            totals["bits_exact"] += prior * int(correct.sum())
            totals["chance"] += len(facts) / len(values)
    n = totals["facts"]
    return {
        "recall_accuracy": totals["correct"] / n,
        "recall_probability": totals["probability"] / n,
        "chance_accuracy": totals["chance"] / n,
        "knowledge_bits": totals["bits"],
        "knowledge_bits_exact": totals["bits_exact"],
        "facts": n,
        "per_attribute": per_attribute,
    }
