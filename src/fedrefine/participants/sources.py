"""Where a participant comes from, as config objects (``class_path`` + ``init_args`` in YAML)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, is_dataclass
from typing import Any

from fedrefine.participants.loading import load_participant
from fedrefine.participants.participant import Participant
from fedrefine.participants.precision import cast_model, load_dtype
from fedrefine.participants.random_weights import (
    TinySpec,
    build_random_participant,
    build_tiny_participant,
    real_model_config,
)


class ParticipantSource(ABC):
    """Builds or loads one participant on demand."""

    @abstractmethod
    def load(self) -> Participant:
        """The frozen participant."""

    def describe(self) -> dict[str, Any]:
        """``class_path`` and ``init_args`` as plain values (for hyper-parameters and logs)."""
        init_args = {k: asdict(v) if is_dataclass(v) else v for k, v in vars(self).items()}
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": init_args}


class HubParticipant(ParticipantSource):
    """A model from the Hugging Face hub or a local directory.

    Args:
        name_or_path: hub id (e.g. ``Qwen/Qwen3-0.6B``) or a local directory.
        revision: hub revision (branch, tag or commit).
        dtype: weight dtype, e.g. ``bfloat16`` on GPU, ``float32`` on CPU; ``auto`` follows ``trainer.precision``
            under ``fedrefine`` (elsewhere: ``bfloat16`` when a GPU is there, else ``float32``).
        name: the name the model is known by (fusers are trained for it): set it to keep the same identity when
            the model moves to another directory name (default: the hub id, or the local directory's name).
        chat_template_kwargs: extra chat-template arguments.
    """

    def __init__(
        self,
        name_or_path: str,
        revision: str | None = None,
        dtype: str = "auto",
        name: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.name_or_path, self.revision, self.dtype = name_or_path, revision, dtype
        self.name, self.chat_template_kwargs = name, chat_template_kwargs

    def load(self) -> Participant:
        return load_participant(
            self.name_or_path, self.revision, load_dtype(self.dtype), name=self.name,
            chat_template_kwargs=self.chat_template_kwargs,
        )


class TinyParticipant(ParticipantSource):
    """A tiny random-weight model of a real architecture class with a locally trained tokenizer.

    Args:
        spec: the model's shape, tokenizer and chat style.
        dtype: weight dtype (``auto``: as :class:`HubParticipant`'s).
    """

    def __init__(self, spec: TinySpec, dtype: str = "auto") -> None:
        self.spec, self.dtype = spec, dtype

    def load(self) -> Participant:
        participant = build_tiny_participant(self.spec)
        cast_model(participant.model, load_dtype(self.dtype))
        return participant


class RandomRealParticipant(ParticipantSource):
    """One of the case study's models at its real shape with random weights (no download), optionally shallower.

    Args:
        hub_id: one of the shipped configs (``fedrefine.participants.REAL_MODELS``).
        num_hidden_layers: fewer layers than the real model (tests).
        seed: the weights' seed.
        real_vocabulary: keep the model's real vocabulary size (timing at real shapes); otherwise it is cut to
            the small local tokenizer that makes the token ids.
        dtype: weight dtype (``auto``: as :class:`HubParticipant`'s).
    """

    def __init__(
        self, hub_id: str, num_hidden_layers: int | None = None, seed: int = 0, real_vocabulary: bool = False,
        dtype: str = "auto",
    ) -> None:
        self.hub_id, self.num_hidden_layers, self.seed = hub_id, num_hidden_layers, seed
        self.real_vocabulary, self.dtype = real_vocabulary, dtype

    def load(self) -> Participant:
        overrides = {} if self.num_hidden_layers is None else {"num_hidden_layers": self.num_hidden_layers}
        if self.real_vocabulary:
            overrides["vocab_size"] = real_model_config(self.hub_id).vocab_size
        participant = build_random_participant(self.hub_id, seed=self.seed, **overrides)
        cast_model(participant.model, load_dtype(self.dtype))
        return participant
