"""Participants with random weights: tiny ones of a real architecture class (tests, the toy world) and ones at
the full shape of the FedRefine case study's models (timing, no download)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any, Literal

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PreTrainedConfig, PreTrainedTokenizerBase

from fedrefine.participants.participant import Participant, ParticipantIdentity, chat_kwargs_for, freeze
from fedrefine.participants.tokenizers import ChatStyle, TokenizerKind, build_tokenizer

Architecture = Literal["qwen3", "qwen2", "llama"]

#: The FedRefine case study's models: hub id -> file of its config (shapes only) in the package.
REAL_MODELS: dict[str, str] = {
    "Qwen/Qwen3-0.6B": "Qwen--Qwen3-0.6B.json",
    "Qwen/Qwen2.5-0.5B-Instruct": "Qwen--Qwen2.5-0.5B-Instruct.json",
    "Qwen/Qwen2.5-Coder-0.5B-Instruct": "Qwen--Qwen2.5-Coder-0.5B-Instruct.json",
    "Qwen/Qwen2.5-1.5B-Instruct": "Qwen--Qwen2.5-1.5B-Instruct.json",
    "meta-llama/Llama-3.2-1B-Instruct": "meta-llama--Llama-3.2-1B-Instruct.json",
}


@dataclass
class TinySpec:
    """Shape of a tiny participant built from a real architecture class with random weights."""

    name: str
    architecture: Architecture = "qwen3"
    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    rope_theta: float = 10000.0
    tokenizer_kind: TokenizerKind = "byte_bpe"
    chat_style: ChatStyle = "chatml"
    vocab_size: int = 512
    seed: int = 0


_ARCH_MODEL_TYPE = {"qwen3": "qwen3", "qwen2": "qwen2", "llama": "llama"}


def tiny_config(spec: TinySpec, vocab_size: int, tokenizer: PreTrainedTokenizerBase) -> PreTrainedConfig:
    """A transformers config of the spec's architecture class at tiny size."""
    if spec.architecture not in _ARCH_MODEL_TYPE:
        raise ValueError(f"Unknown architecture {spec.architecture!r}; choose 'qwen3', 'qwen2' or 'llama'.")
    if spec.num_heads % spec.num_kv_heads:
        raise ValueError(f"num_heads ({spec.num_heads}) must be a multiple of num_kv_heads ({spec.num_kv_heads}).")
    config_cls = CONFIG_MAPPING[_ARCH_MODEL_TYPE[spec.architecture]]
    return config_cls(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=2048,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        architectures=[config_cls.__name__.replace("Config", "ForCausalLM")],
    )


def _spec_revision(spec: TinySpec, tokenizer: PreTrainedTokenizerBase) -> str:
    payload = json.dumps(asdict(spec), sort_keys=True) + json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def build_tiny_participant(
    spec: TinySpec,
    tokenizer: PreTrainedTokenizerBase | None = None,
    corpus: list[str] | None = None,
) -> Participant:
    """Build a tiny frozen participant of a real architecture class with seeded random weights.

    The tokenizer is trained locally from ``corpus`` (a default corpus when omitted) unless given.
    """
    if tokenizer is None:
        kwargs = {"corpus": corpus} if corpus is not None else {}
        tokenizer = build_tokenizer(spec.tokenizer_kind, spec.chat_style, vocab_size=spec.vocab_size, **kwargs)
    config = tiny_config(spec, len(tokenizer), tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config)
    identity = ParticipantIdentity.from_config(config, f"tiny:{spec.name}", _spec_revision(spec, tokenizer))
    return Participant(freeze(model), tokenizer, identity, {})


def real_model_config(hub_id: str, **overrides: Any) -> PreTrainedConfig:
    """The shipped config (shapes only) of one of :data:`REAL_MODELS`, with optional overrides."""
    if hub_id not in REAL_MODELS:
        raise KeyError(f"No shipped config for {hub_id!r}; known: {', '.join(REAL_MODELS)}.")
    text = resources.files("fedrefine.participants.model_configs").joinpath(REAL_MODELS[hub_id]).read_text()
    data = json.loads(text) | overrides
    return CONFIG_MAPPING[data.pop("model_type")](**data)


def build_random_participant(
    hub_id: str, tokenizer: PreTrainedTokenizerBase | None = None, seed: int = 0, **overrides: Any
) -> Participant:
    """A participant with the real shapes of ``hub_id`` and random weights (no download).

    Overrides (e.g. ``num_hidden_layers=2``) shrink it for tests. With no tokenizer given,
    a small local one is trained and the vocabulary is cut to its size.
    """
    if tokenizer is None:
        model_type = json.loads(resources.files("fedrefine.participants.model_configs").joinpath(REAL_MODELS[hub_id]).read_text())
        style: ChatStyle = "llama3" if model_type["model_type"] == "llama" else "chatml"
        tokenizer = build_tokenizer("byte_bpe", style)
        overrides.setdefault("vocab_size", len(tokenizer))
    config = real_model_config(hub_id, **overrides)
    config.dtype = torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    identity = ParticipantIdentity.from_config(config, hub_id, f"random-{seed}")
    return Participant(freeze(model), tokenizer, identity, chat_kwargs_for(config))
