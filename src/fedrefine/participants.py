"""Participants: frozen causal LMs with their tokenizers and exact identities.

A participant is loaded from the Hugging Face hub or a local directory
(:func:`load_participant`), built tiny with random weights from a real architecture
class (:func:`build_tiny_participant`), or built at the full shape of one of the
paper's models with random weights (:func:`build_random_participant`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from fedrefine.hub import hub_offline
from fedrefine.tokenizer import ChatStyle, TokenizerKind, build_tokenizer

Architecture = Literal["qwen3", "qwen2", "llama"]

#: The FedRefine case study's models: hub id -> file of its config (shapes only) in the package.
REAL_MODELS: dict[str, str] = {
    "Qwen/Qwen3-0.6B": "Qwen--Qwen3-0.6B.json",
    "Qwen/Qwen2.5-0.5B-Instruct": "Qwen--Qwen2.5-0.5B-Instruct.json",
    "Qwen/Qwen2.5-Coder-0.5B-Instruct": "Qwen--Qwen2.5-Coder-0.5B-Instruct.json",
    "Qwen/Qwen2.5-1.5B-Instruct": "Qwen--Qwen2.5-1.5B-Instruct.json",
    "meta-llama/Llama-3.2-1B-Instruct": "meta-llama--Llama-3.2-1B-Instruct.json",
}

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


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        resolved = getattr(torch, dtype)
    except AttributeError:
        resolved = None
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or 'float16'.")
    return resolved


def _chat_kwargs_for(config: PreTrainedConfig) -> dict[str, Any]:
    return dict(DEFAULT_CHAT_TEMPLATE_KWARGS.get(getattr(config, "model_type", ""), {}))


#: Tokenizer classes that mean "exactly the saved tokenizer.json", whatever the model type.
_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _load_tokenizer(name_or_path: str, is_local: bool, load_kwargs: dict[str, Any]) -> PreTrainedTokenizerBase:
    """AutoTokenizer, except for a local generic tokenizer: transformers 5 picks the tokenizer class from the
    model type (e.g. Qwen2Tokenizer for a qwen2 config), which rebuilds the pipeline and ignores a custom
    tokenizer.json; a tokenizer saved as a generic fast tokenizer is loaded as exactly that."""
    config_file = Path(name_or_path) / "tokenizer_config.json"
    if is_local and config_file.is_file():
        if json.loads(config_file.read_text()).get("tokenizer_class") in _GENERIC_TOKENIZERS:
            return PreTrainedTokenizerFast.from_pretrained(name_or_path)
    return AutoTokenizer.from_pretrained(name_or_path, **load_kwargs)


#: Any one of these holds a model's weights.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
#: Any one of these sets of files holds a tokenizer (fast, sentencepiece, byte-level BPE, WordPiece).
TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("vocab.txt",))
DOWNLOAD_HINT = "hf download {id} --local-dir <DIR>"


def check_model_directory(directory: Path, weights: bool = True, tokenizer: bool = True) -> None:
    """A local model directory must hold config.json, and (when asked) weights and tokenizer files.

    Without this check transformers builds a one-token tokenizer from a directory without tokenizer
    files, and every route then scores 0% for reasons nobody can see.
    """
    present = sorted(p.name for p in directory.iterdir())
    listing = ", ".join(present[:8]) + (" ..." if len(present) > 8 else "") if present else "nothing"
    if "config.json" not in present:
        raise ParticipantLoadError(
            f"{directory} has no config.json (it holds {listing}); a model directory is what `save_pretrained` or "
            f"`{DOWNLOAD_HINT.format(id='<hub id>')}` writes. Point name_or_path at such a directory or a hub id."
        )
    missing = []
    if weights and not any(name in present for name in WEIGHT_FILES):
        missing.append(f"weights (one of {', '.join(WEIGHT_FILES)})")
    if tokenizer and not any(all(name in present for name in files) for files in TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json, or tokenizer.model, or vocab.json + merges.txt)")
    if missing:
        raise ParticipantLoadError(
            f"{directory} lacks {' and '.join(missing)} (it holds {listing}). Copy them from the model's hub repo "
            f"(`{DOWNLOAD_HINT.format(id='<hub id>')}`) or save the model and its tokenizer with `save_pretrained`."
        )


def locate_model(name_or_path: str, revision: str | None = None, weights: bool = True, tokenizer: bool = True) -> dict[str, Any]:
    """Check that a model can be loaded and return the ``from_pretrained`` arguments that load it.

    A local directory is checked (:func:`check_model_directory`); a hub id is read from the local
    Hugging Face cache when it is there (works offline), else needs the hub, and fails at once with
    the download command when the hub is unreachable.
    """
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        check_model_directory(local, weights=weights, tokenizer=tokenizer)
        return {"revision": revision}
    if name_or_path.startswith((".", "/", "~")):
        raise ParticipantLoadError(f"Model directory {name_or_path!r} does not exist; pass an existing directory or a hub id.")
    try:
        AutoConfig.from_pretrained(name_or_path, revision=revision, local_files_only=True)
        return {"revision": revision, "local_files_only": True}
    except OSError:
        if hub_offline():
            raise ParticipantLoadError(
                f"Cannot load {name_or_path!r}: it is not a local directory, it is not in the Hugging Face "
                f"cache, and the hub is not reachable (offline). Download it on a connected machine "
                f"(`{DOWNLOAD_HINT.format(id=name_or_path)}`) and pass the local directory instead, e.g. "
                f"`name_or_path: <DIR>` (optionally `name: {name_or_path}` to keep its identity)."
            ) from None
    return {"revision": revision}


def load_model_config(name_or_path: str, revision: str | None = None) -> PreTrainedConfig:
    """The transformers config of a local directory or hub id (no weights or tokenizer needed), with clear errors."""
    kwargs = locate_model(name_or_path, revision, weights=False, tokenizer=False)
    try:
        return AutoConfig.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise ParticipantLoadError(f"Cannot read the config of {name_or_path!r}: {str(err).splitlines()[0]}") from None


def load_participant(
    name_or_path: str,
    revision: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    name: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> Participant:
    """Load a frozen causal LM and its tokenizer from a hub id or a local directory.

    Args:
        name_or_path: a Hugging Face hub id (``Qwen/Qwen3-0.6B``) or a local directory
            written by ``save_pretrained`` (config.json, weights and tokenizer files).
        revision: hub revision (branch, tag or commit); recorded in the identity.
        dtype: weights' dtype.
        device: where the model lives.
        name: identity name to record instead of ``name_or_path`` (e.g. the hub id of a local copy).
        chat_template_kwargs: extra arguments for the chat template; defaults pin Qwen3's
            thinking off and Llama's date.
    """
    is_local = Path(name_or_path).expanduser().is_dir()
    load_kwargs = locate_model(name_or_path, revision)
    try:
        config = AutoConfig.from_pretrained(name_or_path, **load_kwargs)
        tokenizer = _load_tokenizer(name_or_path, is_local, load_kwargs)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_resolve_dtype(dtype), **load_kwargs)
    except OSError as err:
        raise ParticipantLoadError(
            f"Cannot load {name_or_path!r} (revision {revision or 'default'}): {str(err).splitlines()[0]}. Pass a "
            f"local directory that holds config.json, the weights and the tokenizer files, or a hub id."
        ) from err
    model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    identity = ParticipantIdentity.from_config(
        config, name_or_path=name or name_or_path, revision=revision or ("local" if is_local else "main")
    )
    kwargs = _chat_kwargs_for(config) | dict(chat_template_kwargs or {})
    return Participant(freeze(model), tokenizer, identity, kwargs)


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
    text = resources.files("fedrefine.model_configs").joinpath(REAL_MODELS[hub_id]).read_text()
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
        model_type = json.loads(resources.files("fedrefine.model_configs").joinpath(REAL_MODELS[hub_id]).read_text())
        style: ChatStyle = "llama3" if model_type["model_type"] == "llama" else "chatml"
        tokenizer = build_tokenizer("byte_bpe", style)
        overrides.setdefault("vocab_size", len(tokenizer))
    config = real_model_config(hub_id, **overrides)
    config.dtype = torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    identity = ParticipantIdentity.from_config(config, hub_id, f"random-{seed}")
    return Participant(freeze(model), tokenizer, identity, _chat_kwargs_for(config))
