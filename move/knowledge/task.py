"""The knowledge task: text training on a knowledge corpus, evaluated also by recall
of the stored facts under the held-out phrasing."""

from move.knowledge.recall import load_knowledge, recall
from move.text.prepare import PreparedData
from move.text.task import TextTask


class KnowledgeTask(TextTask):
    """Text training on a knowledge corpus (move/knowledge), evaluated also by
    recall of the stored facts under the held-out phrasing."""

    def __init__(self, data: PreparedData, *args, **kwargs):
        super().__init__(data, *args, **kwargs)
        self.knowledge = load_knowledge(data.directory)

    def evaluate(self, model) -> dict:
        result = recall(model, self.data.tokenizer, self.knowledge)
        return {**super().evaluate(model), **{k: v for k, v in result.items() if k != "per_attribute"}}

    def describe(self) -> dict:
        return {**super().describe(), "modality": "knowledge", "knowledge": self.knowledge["config"]}
