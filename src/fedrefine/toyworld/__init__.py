"""The offline toy world: synthetic facts split into public and private knowledge, and tiny participants pretrained on it."""

from fedrefine.toyworld.pretrain import (
    DEFAULT_PARTICIPANTS,
    PretrainConfig,
    ToyParticipantConfig,
    build_toy_world,
    default_cache_dir,
    load_toy_participants,
    read_toy_metadata,
    toyworld_key,
)
from fedrefine.toyworld.world import (
    Entity,
    Fact,
    ToyWorld,
    WorldConfig,
    conversation_row,
    export_world,
    read_jsonl,
    write_jsonl,
)

__all__ = [
    "DEFAULT_PARTICIPANTS",
    "Entity",
    "Fact",
    "PretrainConfig",
    "ToyParticipantConfig",
    "ToyWorld",
    "WorldConfig",
    "build_toy_world",
    "conversation_row",
    "default_cache_dir",
    "export_world",
    "load_toy_participants",
    "read_jsonl",
    "read_toy_metadata",
    "toyworld_key",
    "write_jsonl",
]
