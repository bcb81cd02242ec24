"""Recall of stored facts, and the knowledge stored in bits.

For every (person, attribute) the model reads the held-out phrasing up to the
value, "it is said that <name> <cue>", and is scored on the attribute's value set
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
from move.knowledge.corpus import ATTRIBUTES, KNOWLEDGE_FILE, sentence
from move.readers import read_json_object

PROMPT_BATCH = 512


def load_knowledge(data_dir) -> dict:
    path = Path(data_dir) / KNOWLEDGE_FILE
    if not path.is_file():
        raise DataError(f"{path}: missing or unreadable knowledge file (no such file)")
    return read_json_object(path, "knowledge file")


@torch.no_grad()
def recall(model, tokenizer, knowledge: dict) -> dict:
    with evaluating(model):
        device = next(model.parameters()).device
        names, opener = knowledge["names"], knowledge["held_out_opener"]
        totals = {"facts": 0, "correct": 0, "probability": 0.0, "bits": 0.0, "bits_exact": 0.0, "chance": 0.0}
        per_attribute = {}
        for attribute, (_, values) in ATTRIBUTES.items():
            facts = [(p, v) for p, a, v in knowledge["facts"] if a == attribute]
            value_ids = torch.tensor([tokenizer.encode(v)[0] for v in values], device=device)
            index = {v: i for i, v in enumerate(values)}
            prompts = [[tokenizer.bos_id, *tokenizer.encode(sentence(opener, names[p], attribute))] for p, _ in facts]
            target = torch.tensor([index[v] for _, v in facts], device=device)
            log_p = []
            for i in range(0, len(prompts), PROMPT_BATCH):
                x = torch.tensor(prompts[i : i + PROMPT_BATCH], device=device)  # equal lengths within an attribute
                log_p.append(torch.log_softmax(model(x)[:, -1, value_ids].float(), dim=-1))
            log_p = torch.cat(log_p)
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
