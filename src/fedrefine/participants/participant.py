"""A participant: a frozen causal LM, its tokenizer, its exact identity and its chat-template arguments."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

#: Chat-template arguments that keep prompts reproducible: Qwen3 without thinking, Llama's date pinned.
DEFAULT_CHAT_TEMPLATE_KWARGS: dict[str, dict[str, Any]] = {
    "qwen3": {"enable_thinking": False},
    "llama": {"date_string": "26 Jul 2024"},
}


class ParticipantLoadError(RuntimeError):
    """A participant's weights or tokenizer could not be loaded."""


@dataclass(frozen=True)
class ParticipantIdentity:
    """What names a participant exactly: where it came from and the shape of its KV cache."""

    name_or_path: str
    revision: str
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int

    @property
    def key(self) -> str:
        """Short unique key, ``name@revision``."""
        return f"{self.name_or_path}@{self.revision}"

    def kv_bytes_per_token(self, num_layers: int | None = None, element_size: int = 2) -> int:
        """Bytes of K and V for one token over ``num_layers`` layers (default: all), at ``element_size``
        bytes per element (2: bf16/fp16)."""
        layers = self.num_layers if num_layers is None else num_layers
        return 2 * layers * self.num_kv_heads * self.head_dim * element_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParticipantIdentity:
        return cls(**data)

    @classmethod
    def from_config(cls, config: PreTrainedConfig, name_or_path: str, revision: str) -> ParticipantIdentity:
        text = config.get_text_config(decoder=True)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(
            name_or_path=name_or_path,
            revision=revision,
            architecture=(text.architectures or [type(text).__name__])[0],
            num_layers=text.num_hidden_layers,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            head_dim=head_dim,
            hidden_size=text.hidden_size,
            vocab_size=text.vocab_size,
        )


@dataclass(eq=False)
class Participant:
    """A frozen causal LM, its tokenizer, its identity and the arguments its chat template needs."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    identity: ParticipantIdentity
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.identity.name_or_path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def rotary_embedding(self) -> nn.Module:
        """The decoder's rotary embedding module (gives cos/sin for any positions)."""
        return self.model.get_decoder().rotary_emb

    @property
    def end_of_turn_token_id(self) -> int:
        """Token that closes an assistant turn (the tokenizer's eos)."""
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"Tokenizer of {self.name} has no eos token; set one to mark the end of a response.")
        return self.tokenizer.eos_token_id


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Eval mode and no gradients: participants never train."""
    model.eval()
    model.requires_grad_(False)
    return model


def chat_kwargs_for(config: PreTrainedConfig) -> dict[str, Any]:
    """The default chat-template arguments of a model type (see :data:`DEFAULT_CHAT_TEMPLATE_KWARGS`)."""
    return dict(DEFAULT_CHAT_TEMPLATE_KWARGS.get(getattr(config, "model_type", ""), {}))
