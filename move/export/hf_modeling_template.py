"""Hugging Face `transformers` wrapper of a MoVE-project GPT (exported by
`move export-hf`). Loaded with trust_remote_code=True from the exported folder,
next to copies of the project's model files (move_*.py), so nothing outside the
folder is needed but torch and transformers.

Generation uses the project's own KV cache, which holds what the project's sampler
holds: the *mixed* keys and values (MHA/GQA), the *mixed* latent and RoPE key (MLA),
so a value-memory model decodes each token with one forward of that token. The
cache is a transformers `Cache`: beam search reorders it, assisted decoding crops
it. Batches padded on the left (a tokenizer with padding_side="left") give every
row exactly what it would give alone: each row's positions count from its first
real token and padding keys are masked.

This file is a template inside the `move` package: it only works once copied."""

import warnings

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .move_config import ModelConfig
from .move_gpt import GPT
from .move_value_tables import ValueTable

# transformers 5 passes the cache between generation steps as `cache`; 4.x as `past_key_values`
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class MoveConfig(PretrainedConfig):
    """The project's ModelConfig (move_config) plus the standard names transformers
    and its tools read (hidden_size, num_hidden_layers, ...), derived from it."""

    model_type = "move"

    def __init__(self, move_config: dict | None = None, use_cache: bool = True, **kwargs):
        self.move_config = move_config or {}
        self.use_cache = use_cache
        if self.move_config:
            kwargs.update(ModelConfig.from_dict(self.move_config).standard_names())
        kwargs["tie_word_embeddings"] = False  # the model's embedding and head are separate matrices
        super().__init__(**kwargs)


class MoveGenerationCache(Cache):
    """The project's KV cache (created at the first forward, when the batch is known)
    and how many tokens of the sequence it holds, with what transformers' decoding
    strategies ask of a Cache. It keeps no transformers layer objects, so the base
    class's constructor (whose arguments changed between versions) is not called."""

    def __init__(self):
        self.layers = []
        self.offloading = False
        self.kv = None
        self.tokens_seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.tokens_seen

    @property
    def is_compileable(self) -> bool:
        return False  # positions are Python ints and buffers grow: decoded eagerly

    @property
    def is_croppable(self) -> bool:
        return True

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.kv is not None:
            self.kv.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.kv is not None:
            self.kv.repeat_rows(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        """transformers 5: crop(-n) drops the last n tokens; 4.x: crop(n) keeps n."""
        keep = self.tokens_seen + tokens_to_remove if tokens_to_remove <= 0 else min(tokens_to_remove, self.tokens_seen)
        if self.kv is not None:
            self.kv.truncate(keep)
        self.tokens_seen = keep


def padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Each token's position within its own row of a left-padded batch."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class MoveForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MoveConfig
    base_model_prefix = "gpt"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True

    def __init__(self, config: MoveConfig):
        super().__init__(config)
        self.gpt = GPT(ModelConfig.from_dict(config.move_config))
        # set by gradient_checkpointing_enable(); the blocks are then recomputed in the
        # backward, always non-reentrant (the value memory's fast path needs it), so the
        # checkpoint function transformers passes is not used
        self.gradient_checkpointing = False
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model brings its own cache (_prepare_cache_for_generation)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() calls this before decoding: a cache the caller passed is kept,
        else (unless use_cache=False) the model's own is made."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if generation_config.use_cache is not False and model_kwargs.get(CACHE_FIELD) is None:
            model_kwargs[CACHE_FIELD] = MoveGenerationCache()

    def _init_weights(self, module):
        """The weights come from the checkpoint; GPT.init_weights already ran. Rows that
        resize_token_embeddings adds are set there."""

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.gpt.wte

    def set_input_embeddings(self, embedding: torch.nn.Embedding) -> None:
        self.gpt.wte = embedding

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.gpt.lm_head

    def set_output_embeddings(self, head: torch.nn.Linear) -> None:
        self.gpt.lm_head = head

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """transformers resizes the embedding and the head; the value-memory tables
        (the MoVE bank, LaVE's tables) get as many rows, new ones zero, so a new token
        starts with no memory (v' = g0 * v) and every old token computes what it did."""
        embedding = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        rows = embedding.num_embeddings
        for table in (m for m in self.gpt.modules() if isinstance(m, ValueTable)):
            old = table.weight.data
            grown = old.new_zeros((rows, *old.shape[1:]))
            grown[: min(rows, old.shape[0])] = old[:rows]
            table.weight = torch.nn.Parameter(grown, requires_grad=table.weight.requires_grad)
        self.gpt.config.vocab_size = rows
        self.config.move_config = {**self.config.move_config, "vocab_size": rows}
        return embedding

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask=None,
        labels=None,
        use_cache=None,
        output_hidden_states=None,
        inputs_embeds=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Without a cache: logits for every position. With one (generation): only the
        tokens the cache has not seen are run, and their logits returned; generate may
        pass the whole sequence or just the new tokens, both work."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("this model's value memory is looked up by token id: pass input_ids, not inputs_embeds")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()  # (B, all tokens so far): padding to mask
        self.gpt.activation_checkpointing = self.gradient_checkpointing and self.training
        hidden_states = []
        hooks = []
        if output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states:
            # the residual stream entering each block, and leaving the last (before the final norm)
            blocks = self.gpt.blocks
            hooks = [b.register_forward_pre_hook(lambda _, args: hidden_states.append(args[0])) for b in blocks]
            hooks.append(blocks[-1].register_forward_hook(lambda _m, _a, out: hidden_states.append(out)))
        try:
            if cache is None:
                positions = padded_positions(mask) if mask is not None else None
                logits = self.gpt(input_ids, positions=positions, key_mask=mask)
            else:
                logits = self.decode(input_ids, cache, mask)
        finally:
            for hook in hooks:
                hook.remove()
        loss = None
        if labels is not None:
            # transformers' loss convention: with num_items_in_batch (the Trainer passes the
            # target count of all micro-batches of a step) the sum over this batch divided by
            # it, so accumulated micro-batches add up to the step's mean; else the mean
            items = kwargs.get("num_items_in_batch")
            pairs = (logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(logits.device))
            if items is None:
                loss = F.cross_entropy(*pairs, ignore_index=-100)
            else:
                loss = F.cross_entropy(*pairs, ignore_index=-100, reduction="sum") / items
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=tuple(hidden_states) or None, **{CACHE_FIELD: cache}
        )

    def decode(self, input_ids, cache: MoveGenerationCache, mask) -> torch.Tensor:
        """Logits of the tokens the cache has not seen yet, which it then holds."""
        seen = cache.tokens_seen
        new = input_ids[:, seen:] if input_ids.size(1) > seen else input_ids
        total = seen + new.size(1)
        if mask is not None and mask.size(1) != total:
            raise ValueError(f"attention_mask covers {mask.size(1)} tokens, the sequence has {total}")
        context = self.gpt.config.seq_len
        if seen <= context < total:
            warnings.warn(
                f"generating past the {context}-token context the model was trained on: rotary positions "
                "extrapolate there and the quality of what follows was never measured",
                stacklevel=2,
            )
        if cache.kv is None:
            cache.kv = self.gpt.new_cache(new.size(0), max(total, context))
        positions = padded_positions(mask)[:, seen:] if mask is not None else None
        logits = self.gpt(new, cache=cache.kv, positions=positions, key_mask=mask)
        cache.tokens_seen = total
        return logits

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """The whole sequence each step: forward runs only what the cache has not seen."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        return {"input_ids": input_ids, "attention_mask": attention_mask, CACHE_FIELD: cache}
