"""Participants: the frozen LLMs and everything read off them before any cache is shared.

- :mod:`~fedrefine.participants.participant`: a model, its tokenizer and its exact identity;
- :mod:`~fedrefine.participants.loading`: from a hub id or a local directory (offline-aware);
- :mod:`~fedrefine.participants.random_weights`: tiny ones of a real architecture, or real shapes, random weights;
- :mod:`~fedrefine.participants.sources`: where a participant comes from, as config objects;
- :mod:`~fedrefine.participants.tokenizers`: small local tokenizers with real-style chat templates;
- :mod:`~fedrefine.participants.chat`: a conversation rendered with a participant's own template, with offsets;
- :mod:`~fedrefine.participants.align`: token alignment between two participants by character spans;
- :mod:`~fedrefine.participants.padding`: token-id rows into padded batches;
- :mod:`~fedrefine.participants.generation`: batched greedy / seeded / beam-search replies;
- :mod:`~fedrefine.participants.hub`: whether the Hugging Face hub is reachable.
"""

from fedrefine.participants.loading import load_model_config, load_participant
from fedrefine.participants.participant import Participant, ParticipantIdentity, ParticipantLoadError, freeze
from fedrefine.participants.random_weights import (
    REAL_MODELS,
    TinySpec,
    build_random_participant,
    build_tiny_participant,
    real_model_config,
)

__all__ = [
    "REAL_MODELS", "Participant", "ParticipantIdentity", "ParticipantLoadError", "TinySpec", "build_random_participant",
    "build_tiny_participant", "freeze", "load_model_config", "load_participant", "real_model_config",
]
