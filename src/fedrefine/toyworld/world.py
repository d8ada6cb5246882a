"""A synthetic world of made-up entities and their facts, split into public and private knowledge.

Every entity has one value per attribute (``colour``, ``city``, ...). A fact is rendered as a
statement (``The colour of Zorbix is red.``) and as four multiple-choice questions in the
OpenBookQA schema, the correct option once at each label A-D (position-balanced scoring).

Knowledge split (all deterministic from :attr:`WorldConfig.seed`)::

    entities -> public                        every participant knows these
             -> private group 0, 1, ...       each known to the senders given that group
                  -> fuser_train(group)       fusers train on these
                  -> held_out(group)          no fuser ever trains on these; evaluation only

Adding a sender that knows another group adds knowledge the receiver can borrow.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from fedrefine.multiple_choice import AnswerStyle, MultipleChoiceItem, correct_answer, question_text

LABELS = ("A", "B", "C", "D")
#: Toy participants answer by the option's text and are scored by cloze likelihood
#: (``answer_mode: cloze``): tiny models learn facts quickly but binding a fact to an option
#: letter only very slowly, and letters invite transferring the sender's chosen slot instead of the fact.
ANSWER_STYLE: AnswerStyle = "text"
Split = Literal["public", "fuser_train", "held_out"]

#: Candidate values per attribute (the first ``values_per_attribute`` after a seeded shuffle are used).
VALUE_POOLS: dict[str, tuple[str, ...]] = {
    "colour": ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown", "grey", "gold"),
    "city": ("Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Delhi", "Rome", "Sydney", "Berlin", "Nairobi", "Quito", "Seoul"),
    "animal": ("cat", "dog", "horse", "rabbit", "parrot", "goat", "owl", "fox", "turtle", "camel", "otter", "swan"),
    "food": ("bread", "rice", "cheese", "apples", "noodles", "soup", "beans", "honey", "olives", "plums", "carrots", "figs"),
    "instrument": ("drum", "flute", "harp", "violin", "piano", "guitar", "trumpet", "cello", "banjo", "oboe", "lute", "horn"),
    "season": ("spring", "summer", "autumn", "winter", "dawn", "dusk", "noon", "midnight", "monsoon", "harvest", "frost", "thaw"),
}
#: How a fact is stated and asked, per attribute; ``{name}`` is the entity, ``{value}`` the value.
STATEMENT_TEMPLATES: dict[str, str] = {
    "colour": "The favourite colour of {name} is {value}.",
    "city": "{name} lives in the city of {value}.",
    "animal": "The favourite animal of {name} is the {value}.",
    "food": "The favourite food of {name} is {value}.",
    "instrument": "{name} plays the {value}.",
    "season": "The favourite season of {name} is {value}.",
}
QUESTION_TEMPLATES: dict[str, str] = {
    "colour": "What is the favourite colour of {name}?",
    "city": "In which city does {name} live?",
    "animal": "What is the favourite animal of {name}?",
    "food": "What is the favourite food of {name}?",
    "instrument": "Which instrument does {name} play?",
    "season": "What is the favourite season of {name}?",
}
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "st", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "", "n", "r", "x", "k", "s", "l")


@dataclass(frozen=True)
class WorldConfig:
    """Size and knowledge split of a toy world; everything in it is drawn from ``seed``."""

    seed: int = 0
    num_entities: int = 384
    attributes: tuple[str, ...] = ("colour", "city", "animal", "food")
    values_per_attribute: int = 8
    public_fraction: float = 1 / 3
    num_private_groups: int = 2
    held_out_fraction: float = 0.25

    def __post_init__(self) -> None:
        unknown = [a for a in self.attributes if a not in VALUE_POOLS]
        if unknown:
            raise ValueError(f"Unknown attribute(s) {unknown}; choose from {sorted(VALUE_POOLS)}.")
        if not 4 <= self.values_per_attribute <= min(len(VALUE_POOLS[a]) for a in self.attributes):
            raise ValueError(f"values_per_attribute must be in [4, 12] (4 options per question), got {self.values_per_attribute}.")
        if not 0 < self.public_fraction < 1 or not 0 < self.held_out_fraction < 1:
            raise ValueError("public_fraction and held_out_fraction must be strictly between 0 and 1.")
        if self.num_private_groups < 1:
            raise ValueError(f"num_private_groups must be at least 1, got {self.num_private_groups}.")
        object.__setattr__(self, "attributes", tuple(self.attributes))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Fact:
    """One entity's value for one attribute, with the distractors its questions offer."""

    entity: str
    attribute: str
    value: str
    distractors: tuple[str, str, str]

    def statement(self) -> str:
        return STATEMENT_TEMPLATES[self.attribute].format(name=self.entity, value=self.value)

    def question_rows(self) -> list[dict[str, Any]]:
        """Four OpenBookQA rows, the correct value once under each label (A, B, C, D)."""
        stem = QUESTION_TEMPLATES[self.attribute].format(name=self.entity)
        rows = []
        for position, label in enumerate(LABELS):
            options = list(self.distractors)
            options.insert(position, self.value)
            rows.append(
                {
                    "id": f"{self.entity}-{self.attribute}-{label}",
                    "question_stem": stem,
                    "choices": {"text": options, "label": list(LABELS)},
                    "answerKey": label,
                }
            )
        return rows


@dataclass(frozen=True)
class Entity:
    """A made-up entity and its facts, one per attribute (in the world's attribute order)."""

    name: str
    facts: tuple[Fact, ...] = field(repr=False)


def _make_names(rng: random.Random, count: int, reserved: set[str]) -> list[str]:
    names: list[str] = []
    seen = {word.lower() for word in reserved}
    while len(names) < count:
        syllables = rng.choice((2, 2, 3))
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
        if word not in seen and 4 <= len(word) <= 10:
            seen.add(word)
            names.append(word.capitalize())
    return names


def _template_words() -> set[str]:
    text = " ".join([*STATEMENT_TEMPLATES.values(), *QUESTION_TEMPLATES.values()]).replace("{name}", "").replace("{value}", "")
    return {w.strip(".?,") for w in text.split()} | {v for pool in VALUE_POOLS.values() for v in pool}


class ToyWorld:
    """Entities, facts and the knowledge split of one :class:`WorldConfig`."""

    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = config or WorldConfig()
        cfg = self.config
        rng = random.Random(f"fedrefine-toyworld-{cfg.seed}")
        names = _make_names(rng, cfg.num_entities, _template_words())
        self.values: dict[str, tuple[str, ...]] = {}
        for attribute in cfg.attributes:
            pool = list(VALUE_POOLS[attribute])
            rng.shuffle(pool)
            self.values[attribute] = tuple(pool[: cfg.values_per_attribute])
        # Balanced assignment: every value of an attribute is used (almost) equally often.
        assignment = {}
        for attribute, values in self.values.items():
            column = [values[i % len(values)] for i in range(cfg.num_entities)]
            rng.shuffle(column)
            assignment[attribute] = column
        entities = []
        for index, name in enumerate(names):
            facts = []
            for attribute in cfg.attributes:
                value = assignment[attribute][index]
                others = [v for v in self.values[attribute] if v != value]
                facts.append(Fact(name, attribute, value, tuple(rng.sample(others, 3))))
            entities.append(Entity(name, tuple(facts)))
        self.entities: tuple[Entity, ...] = tuple(entities)
        self._by_name = {e.name: e for e in self.entities}

        order = list(names)
        rng.shuffle(order)
        num_public = round(cfg.public_fraction * cfg.num_entities)
        self.public: tuple[str, ...] = tuple(sorted(order[:num_public]))
        private = order[num_public:]
        groups = [private[g :: cfg.num_private_groups] for g in range(cfg.num_private_groups)]
        self.private_groups: tuple[tuple[str, ...], ...] = tuple(tuple(sorted(g)) for g in groups)
        self._held_out: tuple[tuple[str, ...], ...] = tuple(
            tuple(sorted(g[: round(cfg.held_out_fraction * len(g))])) for g in groups
        )
        self._fuser_train: tuple[tuple[str, ...], ...] = tuple(
            tuple(sorted(g[round(cfg.held_out_fraction * len(g)) :])) for g in groups
        )

    # --- the split ------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return len(self.private_groups)

    def _check_group(self, group: int) -> None:
        if not 0 <= group < self.num_groups:
            raise IndexError(f"Private group {group} does not exist; this world has {self.num_groups}.")

    def fuser_train(self, group: int) -> tuple[str, ...]:
        """Private entities of ``group`` that fusers may train on."""
        self._check_group(group)
        return self._fuser_train[group]

    def held_out(self, group: int | None = None) -> tuple[str, ...]:
        """Private entities of ``group`` (all groups if None) that no fuser trains on."""
        if group is None:
            return tuple(sorted(n for g in self._held_out for n in g))
        self._check_group(group)
        return self._held_out[group]

    def known_by(self, private_groups: Iterable[int]) -> tuple[str, ...]:
        """Entities a participant knowing the public set and ``private_groups`` knows."""
        names = list(self.public)
        for group in private_groups:
            self._check_group(group)
            names.extend(self.private_groups[group])
        return tuple(names)

    def split_of(self, name: str) -> tuple[Split, int | None]:
        """Which split an entity is in, and its private group (None for public)."""
        if name in self.public:
            return "public", None
        for group in range(self.num_groups):
            if name in self._held_out[group]:
                return "held_out", group
            if name in self._fuser_train[group]:
                return "fuser_train", group
        raise KeyError(f"No entity named {name!r}.")

    # --- renderings -------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entities)

    def entity(self, name: str) -> Entity:
        return self._by_name[name]

    def facts(self, names: Iterable[str]) -> list[Fact]:
        return [fact for name in names for fact in self._by_name[name].facts]

    def statements(self, names: Iterable[str]) -> list[str]:
        """One statement per fact of the given entities."""
        return [fact.statement() for fact in self.facts(names)]

    def question_rows(self, names: Iterable[str]) -> list[dict[str, Any]]:
        """OpenBookQA rows (four per fact, position-balanced) about the given entities."""
        return [row for fact in self.facts(names) for row in fact.question_rows()]

    def questions(self, names: Iterable[str]) -> list[MultipleChoiceItem]:
        """The :meth:`question_rows` as validated items."""
        return [MultipleChoiceItem.from_row(row) for row in self.question_rows(names)]

    def fuser_train_rows(self, group: int, include_public: bool = True) -> list[dict[str, Any]]:
        """Chat rows (OpenHermes-2.5 ``conversations`` schema) to train the fuser of a sender knowing ``group``.

        Questions about ``group``'s fuser-train entities (which only the sender knows) and, with
        ``include_public``, about the public entities (which the fused receiver must keep right).
        """
        names = [*(self.public if include_public else ()), *self.fuser_train(group)]
        return [conversation_row(item) for item in self.questions(names)]

    def eval_rows(self, group: int | None = None) -> list[dict[str, Any]]:
        """OpenBookQA rows about held-out entities of ``group`` (all groups if None)."""
        return self.question_rows(self.held_out(group))

    @cached_property
    def fingerprint(self) -> str:
        """Hash of the world's full content (changes with any config field or renderer)."""
        payload = json.dumps(
            {"config": self.config.to_dict(), "statements": self.statements(self.names),
             "questions": self.question_rows(self.names[:8]), "public": self.public, "groups": self.private_groups,
             "held_out": self._held_out},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def conversation_row(item: MultipleChoiceItem, style: AnswerStyle = ANSWER_STYLE) -> dict[str, Any]:
    """One OpenHermes-2.5-style row: the multiple-choice prompt and its full correct answer."""
    return {
        "id": item.id,
        "conversations": [
            {"from": "human", "value": question_text(item, style)},
            {"from": "gpt", "value": correct_answer(item, style)},
        ],
    }


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write rows as JSON lines (UTF-8)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read JSON lines written by :func:`write_jsonl`."""
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def export_world(world: ToyWorld, directory: str | Path, include_public: bool = True) -> dict[str, Path]:
    """Write the world's training and evaluation data as JSONL files for generic data modules.

    Files (``g`` = private group)::

        train_group{g}.jsonl       fuser training, OpenHermes ``conversations`` schema
        eval_group{g}.jsonl        held-out entities of group g, OpenBookQA schema
        eval_held_out.jsonl        held-out entities of every group, OpenBookQA schema
        eval_public.jsonl          public entities, OpenBookQA schema (everyone knows them)
        world.json                 the config, fingerprint and entity split
    """
    directory = Path(directory)
    paths: dict[str, Path] = {}
    for group in range(world.num_groups):
        paths[f"train_group{group}"] = write_jsonl(
            world.fuser_train_rows(group, include_public), directory / f"train_group{group}.jsonl"
        )
        paths[f"eval_group{group}"] = write_jsonl(world.eval_rows(group), directory / f"eval_group{group}.jsonl")
    paths["eval_held_out"] = write_jsonl(world.eval_rows(), directory / "eval_held_out.jsonl")
    paths["eval_public"] = write_jsonl(world.question_rows(world.public), directory / "eval_public.jsonl")
    summary = {
        "config": world.config.to_dict(),
        "fingerprint": world.fingerprint,
        "include_public_in_train": include_public,
        "public": list(world.public),
        "fuser_train": [list(world.fuser_train(g)) for g in range(world.num_groups)],
        "held_out": [list(world.held_out(g)) for g in range(world.num_groups)],
    }
    paths["world"] = directory / "world.json"
    paths["world"].write_text(json.dumps(summary, indent=2) + "\n")
    return paths
