"""The toy world as CLI building blocks: a participant source and a data module.

``configs/toyworld.yaml`` uses them with the same :class:`~fedrefine.modules.C2CModule` and
:class:`~fedrefine.data.module.C2CDataModule` machinery as the real models.
"""

from __future__ import annotations

from pathlib import Path

from fedrefine.data.module import C2CDataModule
from fedrefine.participants import Participant
from fedrefine.sources import ParticipantSource
from fedrefine.toyworld.pretrain import DEFAULT_PARTICIPANTS, PretrainConfig, load_toy_participants
from fedrefine.toyworld.world import ToyWorld, WorldConfig, export_world, write_jsonl


class ToyParticipant(ParticipantSource):
    """One pretrained participant of the toy world (built on first use, then loaded from the cache).

    Args:
        name: ``receiver``, ``llama-sender`` or ``qwen2-sender`` (see ``DEFAULT_PARTICIPANTS``).
        world: the world's seed and size.
        pretrain: the pretraining recipe.
        cache_dir: where pretrained participants are kept (default ``$FEDREFINE_CACHE/toyworld``
            or ``~/.cache/fedrefine/toyworld``).
    """

    def __init__(
        self,
        name: str,
        world: WorldConfig | None = None,
        pretrain: PretrainConfig | None = None,
        cache_dir: str | None = None,
    ) -> None:
        known = [p.name for p in DEFAULT_PARTICIPANTS]
        if name not in known:
            raise ValueError(f"Unknown toy participant {name!r}; choose one of {known}.")
        self.name, self.world, self.pretrain, self.cache_dir = name, world or WorldConfig(), pretrain or PretrainConfig(), cache_dir

    def load(self) -> Participant:
        return load_toy_participants(self.world, DEFAULT_PARTICIPANTS, self.pretrain, self.cache_dir)[self.name]


class ToyWorldDataModule(C2CDataModule):
    """Fuser training and evaluation data of one private group of the toy world.

    ``fit`` trains on questions about the public entities and the group's fuser-train entities;
    validation uses a sample of those; ``test`` asks about the group's held-out entities, which
    no fuser ever trains on (``test_split: public`` evaluates the public entities instead).

    Args:
        group: the private group the sender knows.
        world: the world's seed and size.
        data_dir: where the JSONL files are written.
        val_questions: how many fuser-train questions validation uses.
    """

    def __init__(
        self,
        group: int = 0,
        world: WorldConfig | None = None,
        data_dir: str = "runs/toyworld/data",
        val_questions: int = 128,
        test_split: str = "held_out",
        num_questions: int | None = None,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        self.world_config = world or WorldConfig()
        self.group, self.val_questions = group, val_questions
        directory = Path(data_dir) / f"seed{self.world_config.seed}"
        super().__init__(
            train_path=str(directory / f"train_group{group}.jsonl"),
            train_samples=10**9,
            eval_path=str(directory / "{split}.jsonl"),
            eval_config=None,
            val_split=f"val_group{group}",
            test_split=test_split if test_split == "public" else f"eval_group{group}",
            num_questions=num_questions,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
        )
        self.directory = directory

    def prepare_data(self) -> None:
        """Write the world's JSONL files (cheap and deterministic, so always rewritten)."""
        world = ToyWorld(self.world_config)
        export_world(world, self.directory)
        rows = world.question_rows(world.fuser_train(self.group))
        step = max(1, len(rows) // self.val_questions)
        write_jsonl(rows[::step][: self.val_questions], self.directory / f"val_group{self.group}.jsonl")
        write_jsonl(world.question_rows(world.public), self.directory / "public.jsonl")
