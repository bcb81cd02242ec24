"""Hugging Face `transformers` wrapper of a MoVE-project GPT (exported by
`move export-hf`). Loaded with trust_remote_code=True from the exported folder,
next to copies of the project's model files (move_*.py), so nothing outside the
folder is needed but torch and transformers.

Generation uses the project's own KV cache, which holds what the project's sampler
holds: the *mixed* keys and values (MHA/GQA), the *mixed* latent and RoPE key (MLA),
so a value-memory model decodes each token with one forward of that token. Batches
padded on the left (a tokenizer with padding_side="left") give every row exactly
what it would give alone: each row's positions count from its first real token and
padding keys are masked.

This file is a template inside the `move` package: it only works once copied."""

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .move_config import ModelConfig
from .move_gpt import GPT

# transformers 5 passes the cache between generation steps as `cache`; 4.x as `past_key_values`
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class MoveConfig(PretrainedConfig):
    model_type = "move"

    def __init__(self, move_config: dict | None = None, use_cache: bool = True, **kwargs):
        self.move_config = move_config or {}
        self.use_cache = use_cache
        super().__init__(**kwargs)


class MoveGenerationCache:
    """The project's KV cache and how many tokens of the sequence it holds."""

    def __init__(self):
        self.kv = None
        self.tokens_seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.tokens_seen


def padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Each token's position within its own row of a left-padded batch."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class MoveForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MoveConfig
    base_model_prefix = "gpt"
    main_input_name = "input_ids"

    def __init__(self, config: MoveConfig):
        super().__init__(config)
        self.gpt = GPT(ModelConfig.from_dict(config.move_config))
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model brings its own cache (prepare_inputs_for_generation)

    def _init_weights(self, module):
        """The weights come from the checkpoint; GPT.init_weights already ran."""

    def forward(
        self, input_ids: torch.Tensor, attention_mask=None, labels=None, use_cache=None, **kwargs
    ) -> CausalLMOutputWithPast:
        """Without a cache: logits for every position. With one (generation): only the
        tokens the cache has not seen are run, and their logits returned; generate may
        pass the whole sequence or just the new tokens, both work."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()  # (B, all tokens so far): padding to mask
        if cache is None:
            positions = padded_positions(mask) if mask is not None else None
            logits = self.gpt(input_ids, positions=positions, key_mask=mask)
        else:
            seen = cache.tokens_seen
            new = input_ids[:, seen:] if input_ids.size(1) > seen else input_ids
            total = seen + new.size(1)
            if mask is not None and mask.size(1) != total:
                raise ValueError(f"attention_mask covers {mask.size(1)} tokens, the sequence has {total}")
            if cache.kv is None:
                cache.kv = self.gpt.new_cache(new.size(0), max(total, self.gpt.config.seq_len))
            positions = padded_positions(mask)[:, seen:] if mask is not None else None
            logits = self.gpt(new, cache=cache.kv, positions=positions, key_mask=mask)
            cache.tokens_seen = total
        loss = None
        if labels is not None:
            # transformers' loss convention: with num_items_in_batch (the Trainer passes the
            # target count of all micro-batches of a step) the sum over this batch divided by
            # it, so accumulated micro-batches add up to the step's mean; else the mean
            items = kwargs.get("num_items_in_batch")
            pairs = (logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
            if items is None:
                loss = F.cross_entropy(*pairs, ignore_index=-100)
            else:
                loss = F.cross_entropy(*pairs, ignore_index=-100, reduction="sum") / items
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None and kwargs.get("use_cache", self.config.use_cache):
            cache = MoveGenerationCache()
        return {"input_ids": input_ids, "attention_mask": attention_mask, CACHE_FIELD: cache}
