"""The toy world as CLI building blocks: a participant source and a data module.

``configs/toyworld.yaml`` uses them with the same :class:`~fedrefine.recipes.C2CModule` and
:class:`~fedrefine.data.datamodule.C2CDataModule` machinery as the real models.
"""

from __future__ import annotations

from pathlib import Path

from fedrefine.data.datamodule import C2CDataModule
from fedrefine.participants import Participant
from fedrefine.participants.precision import cast_model, load_dtype
from fedrefine.participants.sources import ParticipantSource
from fedrefine.settings import SettingsError
from fedrefine.toyworld.pretrain import DEFAULT_PARTICIPANTS, PretrainConfig, load_toy_participants
from fedrefine.toyworld.world import ToyWorld, WorldConfig, conversation_row, export_world, write_jsonl


class ToyParticipant(ParticipantSource):
    """One pretrained participant of the toy world (built on first use, then loaded from the cache).

    Args:
        name: ``receiver`` or a sender: ``llama-sender``, ``qwen2-sender``, ``qwen3-sender``, ``deep-llama-sender``
            (see ``DEFAULT_PARTICIPANTS``).
        world: the world's seed and size.
        pretrain: the pretraining recipe.
        cache_dir: where pretrained participants are kept (default ``$FEDREFINE_CACHE/toyworld``
            or ``~/.cache/fedrefine/toyworld``).
        dtype: weight dtype: ``auto`` follows ``trainer.precision`` under ``fedrefine`` (elsewhere: ``bfloat16`` when a
            GPU is there, else ``float32``), or ``float32``, ``bfloat16``, ``float16``.
    """

    def __init__(
        self,
        name: str,
        world: WorldConfig | None = None,
        pretrain: PretrainConfig | None = None,
        cache_dir: str | None = None,
        dtype: str = "auto",
    ) -> None:
        known = [p.name for p in DEFAULT_PARTICIPANTS]
        if name not in known:
            raise SettingsError(f"Unknown toy participant {name!r}; choose one of {known}.")
        self.name, self.world, self.pretrain, self.cache_dir = name, world or WorldConfig(), pretrain or PretrainConfig(), cache_dir
        self.dtype = dtype

    def load(self) -> Participant:
        participant = load_toy_participants(self.world, DEFAULT_PARTICIPANTS, self.pretrain, self.cache_dir)[self.name]
        cast_model(participant.model, load_dtype(self.dtype))
        return participant


class ToyWorldDataModule(C2CDataModule):
    """Fuser training and evaluation data of one private group of the toy world.

    ``fit`` trains on questions about the group's fuser-train entities (and the public ones with
    ``include_public``), except ``val_entities`` of them kept apart as a development split that
    validation asks about (tune on these); ``test`` asks about the group's held-out entities, which
    no fuser ever sees (``test_split: all_held_out``: every group's held-out entities; ``all_val``:
    every group's development entities, to tune a federation on; ``val``: this group's development
    entities; ``fit``: the entities the fuser trains on, to measure the train/development gap;
    ``public``: the public entities).

    Args:
        group: the private group the sender knows (validated and tested on).
        train_groups: train on the fuser-train entities of these groups (default ``[group]``): several
            when the participants know different groups (Co-C2C between two senders, a gating network).
        world: the world's seed and size.
        data_dir: where the JSONL files are written.
        val_entities: fuser-train entities of each group held apart for validation.
        include_public: also train on public entities (the receiver must stay right on them).
        response_prefill: train with the answer's fixed start as an assistant prefill (see ``C2CDataModule``).
        preamble_fraction: share of the validation and test facts asked after a private preamble about a made-up
            user (``private_text`` of the rows; what private mode must keep from senders). Training never has one.
    """

    def __init__(
        self,
        group: int = 0,
        train_groups: list[int] | None = None,
        world: WorldConfig | None = None,
        data_dir: str = "runs/toyworld/data",
        val_entities: int = 16,
        include_public: bool = True,
        test_split: str = "held_out",
        num_questions: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        response_prefill: str | None = None,
        preamble_fraction: float = 0.0,
    ) -> None:
        if not 0.0 <= preamble_fraction <= 1.0:
            raise SettingsError(f"preamble_fraction must be in [0, 1], got {preamble_fraction}.")
        self.world_config = world or WorldConfig()
        self.group, self.val_entities, self.include_public = group, val_entities, include_public
        self.train_groups = list(train_groups) if train_groups else [group]
        self.preamble_fraction = preamble_fraction
        directory = Path(data_dir) / (f"seed{self.world_config.seed}" + (f"-preambles{preamble_fraction:g}" if preamble_fraction else ""))
        super().__init__(
            train_path=str(directory / f"fit_group{'+'.join(map(str, self.train_groups))}.jsonl"),
            train_samples=10**9,
            eval_path=str(directory / "{split}.jsonl"),
            eval_config=None,
            val_split=f"val_group{group}",
            test_split={"public": "public", "all_held_out": "eval_held_out", "all_val": "val_all", "val": f"val_group{group}",
                        "fit": f"fit_questions_group{group}"}.get(test_split, f"eval_group{group}"),
            num_questions=num_questions,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
            response_prefill=response_prefill,
        )
        self.directory = directory

    def prepare_data(self) -> None:
        """Write the world's JSONL files (cheap and deterministic, so always rewritten)."""
        world = ToyWorld(self.world_config)
        export_world(world, self.directory, preamble_fraction=self.preamble_fraction)
        names = list(world.public) if self.include_public else []
        every_dev = []
        for group in range(world.num_groups):
            private = world.fuser_train(group)
            dev, fit = private[: self.val_entities], private[self.val_entities :]
            names.extend(fit if group in self.train_groups else ())
            write_jsonl(world.question_rows(fit), self.directory / f"fit_questions_group{group}.jsonl")
            write_jsonl(world.question_rows(dev, self.preamble_fraction), self.directory / f"val_group{group}.jsonl")
            every_dev.extend(dev)
        write_jsonl(world.question_rows(every_dev, self.preamble_fraction), self.directory / "val_all.jsonl")
        write_jsonl([conversation_row(q) for q in world.questions(names)], Path(self.train_path))
        write_jsonl(world.question_rows(world.public, self.preamble_fraction), self.directory / "public.jsonl")
