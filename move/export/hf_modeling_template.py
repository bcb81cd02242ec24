"""Hugging Face `transformers` wrapper of a MoVE-project GPT (exported by
`move export-hf`). Loaded with trust_remote_code=True from the exported folder,
next to copies of the project's model files (move_*.py), so nothing outside the
folder is needed but torch and transformers.

This file is a template inside the `move` package: it only works once copied."""

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .move_config import ModelConfig
from .move_gpt import GPT


class MoveConfig(PretrainedConfig):
    model_type = "move"

    def __init__(self, move_config: dict | None = None, **kwargs):
        self.move_config = move_config or {}
        kwargs.setdefault("use_cache", False)  # every step re-reads the whole context
        super().__init__(**kwargs)


class MoveForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MoveConfig
    base_model_prefix = "gpt"
    main_input_name = "input_ids"

    def __init__(self, config: MoveConfig):
        super().__init__(config)
        self.gpt = GPT(ModelConfig.from_dict(config.move_config))
        self.post_init()

    def _init_weights(self, module):
        """The weights come from the checkpoint; GPT.init_weights already ran."""

    def forward(self, input_ids: torch.Tensor, attention_mask=None, labels=None, **kwargs) -> CausalLMOutput:
        logits = self.gpt(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids}
