"""Loading a participant from a Hugging Face hub id or a local directory, offline-aware, with errors that name the fix."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from fedrefine.participants.hub import hub_offline
from fedrefine.participants.participant import (
    Participant,
    ParticipantIdentity,
    ParticipantLoadError,
    chat_kwargs_for,
    freeze,
)


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


#: Files whose names and sizes stand for a local model's weights in its identity.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
#: config.json fields that say where or with what a model was saved, not what it is.
UNSTABLE_CONFIG_FIELDS = ("_name_or_path", "transformers_version")


def identity_name(name_or_path: str) -> str:
    """The name a participant is known by: a hub id as given; a local directory by its own name (so that a
    relative or absolute path, with or without a trailing slash, names the same model)."""
    local = Path(name_or_path).expanduser()
    return local.resolve().name if local.is_dir() else name_or_path


def local_revision(directory: str | Path) -> str:
    """A local model's revision in its identity: ``local-`` and a digest of its config (less where and with
    which library version it was saved) and of its weight files' names, sizes and 16 sampled blocks of each. The
    same files anywhere give the same revision; other weights at the same path give another."""
    directory = Path(directory).expanduser()
    config = json.loads((directory / "config.json").read_text())
    for field in UNSTABLE_CONFIG_FIELDS:
        config.pop(field, None)
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in directory.glob(pattern)})
    weights = [(p.name, p.stat().st_size, _sampled_digest(p)) for p in files]
    text = json.dumps({"config": config, "weights": weights}, sort_keys=True)
    return "local-" + hashlib.sha256(text.encode()).hexdigest()[:12]


#: Blocks of a weight file read into its identity: retrained weights of the same shape differ in every block,
#: and reading 16 x 64 KiB stays instant for multi-gigabyte files.
SAMPLED_BLOCKS, BLOCK_BYTES = 16, 1 << 16


def _sampled_digest(path: Path) -> str:
    size, digest = path.stat().st_size, hashlib.sha256()
    with path.open("rb") as file:
        for k in range(SAMPLED_BLOCKS):
            file.seek(max(0, size - BLOCK_BYTES) * k // max(1, SAMPLED_BLOCKS - 1))
            digest.update(file.read(BLOCK_BYTES))
    return digest.hexdigest()[:16]


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
        name: identity name to record instead of ``name_or_path`` (e.g. the hub id of a local copy); a local
            directory is otherwise known by its directory name, and its revision is a digest of its config and
            weight files (:func:`local_revision`), whatever the path it is given by.
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
        config, name_or_path=name or identity_name(name_or_path), revision=revision or (local_revision(name_or_path) if is_local else "main")
    )
    kwargs = chat_kwargs_for(config) | dict(chat_template_kwargs or {})
    return Participant(freeze(model), tokenizer, identity, kwargs)
