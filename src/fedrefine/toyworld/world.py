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

Options are dealt per split in blocks of four (:func:`_deal_option_blocks`): the four facts of a block
share one option set, and each has a different member of it as its answer. A reader that does not
know the facts and always prefers some values over others therefore scores exactly chance (25%) on
every split, so a control or a receiver alone is compared against chance, not against the luck of
the draw.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from fedrefine.tasks.multiple_choice import AnswerStyle, MultipleChoiceItem, correct_answer, question_text

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
#: Wordings of each attribute's question; the first is the one evaluation and fuser training ask, the
#: others are what a rephrasing rewrites it into (and what participants read in private mode).
QUESTION_VARIANTS: dict[str, tuple[str, ...]] = {
    "colour": ("What is the favourite colour of {name}?", "Which colour does {name} like best?",
               "Tell me the colour that {name} likes most."),
    "city": ("In which city does {name} live?", "Where does {name} live?", "Which city is {name} living in?"),
    "animal": ("What is the favourite animal of {name}?", "Which animal does {name} like best?",
               "What animal is {name} fondest of?"),
    "food": ("What is the favourite food of {name}?", "Which food does {name} like best?",
             "What does {name} most like to eat?"),
    "instrument": ("Which instrument does {name} play?", "What instrument is played by {name}?",
                   "What does {name} play?"),
    "season": ("What is the favourite season of {name}?", "Which season does {name} like best?",
               "What season is {name} fondest of?"),
}
QUESTION_TEMPLATES: dict[str, str] = {attribute: variants[0] for attribute, variants in QUESTION_VARIANTS.items()}
#: A user's private preamble, irrelevant to the question (no word of it occurs in any question wording).
PREAMBLE_TEMPLATE = "I am {first} {last}, account {account}, from {town}, and I have {condition}."
CONDITIONS = ("asthma", "diabetes", "migraines", "insomnia", "eczema", "arthritis", "anaemia", "bronchitis")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "st", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_WORD = re.compile(r"\w+")
_CODAS = ("", "", "", "n", "r", "x", "k", "s", "l")


@dataclass(frozen=True)
class WorldConfig:
    """Size and knowledge split of a toy world; everything in it is drawn from ``seed``."""

    seed: int = 0
    num_entities: int = 640
    attributes: tuple[str, ...] = ("colour", "city", "animal", "food")
    values_per_attribute: int = 8
    public_fraction: float = 0.2
    num_private_groups: int = 4
    held_out_fraction: float = 0.375
    #: Made-up entities outside every split: no participant knows their facts; the receiver learns to
    #: read hints (and to rephrase) on them, so that it answers from the text rather than from memory.
    num_fictional: int = 128

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
        if self.num_fictional < 0:
            raise ValueError(f"num_fictional must be >= 0, got {self.num_fictional}.")
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

    def question(self, variant: int = 0) -> str:
        """The question in wording ``variant`` of :data:`QUESTION_VARIANTS`."""
        return QUESTION_VARIANTS[self.attribute][variant].format(name=self.entity)

    def question_rows(self, variant: int = 0, preamble: str | None = None) -> list[dict[str, Any]]:
        """Four OpenBookQA rows, the correct value once under each label (A, B, C, D).

        ``variant`` picks the wording; a ``preamble`` (the user's private details) opens the stem and is
        named in the row's ``private_text``, so privacy reports can count what of it reached a sender.
        """
        stem = self.question(variant)
        suffix = (f"-v{variant}" if variant else "") + ("-p" if preamble else "")
        if preamble:
            stem = f"{preamble} {stem}"
        rows = []
        for position, label in enumerate(LABELS):
            options = list(self.distractors)
            options.insert(position, self.value)
            row = {
                "id": f"{self.entity}-{self.attribute}{suffix}-{label}",
                "question_stem": stem,
                "choices": {"text": options, "label": list(LABELS)},
                "answerKey": label,
            }
            if preamble:
                row["private_text"] = preamble
            rows.append(row)
        return rows


@dataclass(frozen=True)
class Entity:
    """A made-up entity and its facts, one per attribute (in the world's attribute order)."""

    name: str
    facts: tuple[Fact, ...] = field(repr=False)


def make_names(rng: random.Random, count: int, reserved: set[str]) -> list[str]:
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
    wordings = [*STATEMENT_TEMPLATES.values(), *(q for qs in QUESTION_VARIANTS.values() for q in qs), PREAMBLE_TEMPLATE]
    return {w.lower() for w in _WORD.findall(" ".join(wordings))} | {v for pool in VALUE_POOLS.values() for v in pool} | set(
        CONDITIONS
    )


def _pattern(template: str) -> re.Pattern[str]:
    """``template`` as a regex with a named group per field (``{name}`` and ``{value}`` are single words)."""
    parts = re.split(r"\{(name|value)\}", template)
    pattern = "".join(re.escape(part) if i % 2 == 0 else rf"(?P<{part}>\w+)" for i, part in enumerate(parts))
    return re.compile(rf"^\s*{pattern}\s*$")


def _fraction(key: str) -> float:
    """A stable number in [0, 1) from ``key`` (a deterministic coin for which questions carry a preamble)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32


def _deal_option_blocks(rng: random.Random, facts: Sequence[Fact], values: Sequence[str]) -> dict[str, Fact]:
    """``facts`` (one attribute, one split) with their distractors dealt in blocks of four; by entity.

    The facts, in a seeded order and then sorted by value, go round-robin into ``ceil(n / 4)`` blocks, so
    the facts of a block have different values whenever no value holds more than a quarter of them (true
    of the default world's every split). A block's values are its option set, each fact's distractors the
    others: within a block every option is the answer once, and a fixed preference among the values picks
    the right one exactly once in four. A block with fewer than four values (a split whose size is not a
    multiple of four, or a value holding more than a quarter of it) is topped up from the attribute's other
    values, and is only balanced on average.
    """
    facts = list(facts)
    rng.shuffle(facts)
    facts.sort(key=lambda fact: fact.value)  # stable: the seeded order breaks ties
    num_blocks = math.ceil(len(facts) / 4)
    dealt = {}
    for block in (facts[b::num_blocks] for b in range(num_blocks)):
        options = sorted({fact.value for fact in block})
        options += rng.sample([v for v in values if v not in options], max(0, 4 - len(options)))
        for fact in block:
            distractors = rng.sample([v for v in options if v != fact.value], 3)
            dealt[fact.entity] = replace(fact, distractors=tuple(distractors))
    return dealt


def _facts_of(rng: random.Random, name: str, values: Mapping[str, tuple[str, ...]], assigned: Mapping[str, str]) -> Entity:
    facts = []
    for attribute, value in assigned.items():
        others = [v for v in values[attribute] if v != value]
        facts.append(Fact(name, attribute, value, tuple(rng.sample(others, 3))))
    return Entity(name, tuple(facts))


class ToyWorld:
    """Entities, facts and the knowledge split of one :class:`WorldConfig`."""

    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = config or WorldConfig()
        cfg = self.config
        rng = random.Random(f"fedrefine-toyworld-{cfg.seed}")
        names = make_names(rng, cfg.num_entities, _template_words())
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
        self.entities: tuple[Entity, ...] = tuple(
            _facts_of(rng, name, self.values, {a: assignment[a][index] for a in cfg.attributes})
            for index, name in enumerate(names)
        )
        # Drawn apart from the entities, so that they do not change what a config's entities are.
        extra = random.Random(f"fedrefine-toyworld-{cfg.seed}-extra")
        reserved = _template_words() | {n.lower() for n in names}
        fictional = make_names(extra, cfg.num_fictional, reserved)
        self.fictional: tuple[Entity, ...] = tuple(
            _facts_of(extra, name, self.values, {a: extra.choice(self.values[a]) for a in cfg.attributes})
            for name in fictional
        )
        people = make_names(extra, 96 + 24, reserved | {n.lower() for n in fictional})
        self._first_names, self._last_names, self._towns = people[:48], people[48:96], people[96:]

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
        # The entities above drew their distractors at random (the split is drawn after those draws, so they
        # stay); here every split's options are dealt in blocks instead, from a stream of their own.
        blocks = random.Random(f"fedrefine-toyworld-{cfg.seed}-option-blocks")
        dealt: dict[str, list[Fact]] = {e.name: list(e.facts) for e in self.entities}
        for split in (self.public, *self._fuser_train, *self._held_out):
            for index, attribute in enumerate(cfg.attributes):
                column = [dealt[name][index] for name in split]
                for name, fact in _deal_option_blocks(blocks, column, self.values[attribute]).items():
                    dealt[name][index] = fact
        self.entities = tuple(Entity(e.name, tuple(dealt[e.name])) for e in self.entities)
        self._by_name = {e.name: e for e in (*self.entities, *self.fictional)}

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

    @property
    def fictional_names(self) -> tuple[str, ...]:
        """Made-up entities outside every split (see :attr:`WorldConfig.num_fictional`)."""
        return tuple(e.name for e in self.fictional)

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

    def question_rows(self, names: Iterable[str], preamble_fraction: float = 0.0) -> list[dict[str, Any]]:
        """OpenBookQA rows (four per fact, position-balanced) about the given entities.

        With ``preamble_fraction`` > 0 that share of the facts (a fixed, seeded choice) is asked with a
        private preamble about a made-up user (:meth:`preamble`) before the question.
        """
        if not 0.0 <= preamble_fraction <= 1.0:
            raise ValueError(f"preamble_fraction must be in [0, 1], got {preamble_fraction}.")
        rows = []
        for fact in self.facts(names):
            key = f"{fact.entity}-{fact.attribute}"
            with_preamble = _fraction(f"{self.config.seed}-{key}") < preamble_fraction
            rows += fact.question_rows(preamble=self.preamble(key) if with_preamble else None)
        return rows

    def preamble(self, key: str) -> str:
        """A made-up user's private details (name, account, home town, condition), fixed by ``key``."""
        rng = random.Random(f"fedrefine-toyworld-{self.config.seed}-preamble-{key}")
        return PREAMBLE_TEMPLATE.format(
            first=rng.choice(self._first_names), last=rng.choice(self._last_names),
            account=f"{rng.randint(10, 99)}-{rng.randint(1000, 9999)}", town=rng.choice(self._towns),
            condition=rng.choice(CONDITIONS),
        )

    @property
    def preamble_words(self) -> tuple[str, ...]:
        """Every word a preamble may contain but its account number's digits."""
        words = _WORD.findall(PREAMBLE_TEMPLATE.replace("{account}", ""))
        return tuple(w for w in (*words, *self._first_names, *self._last_names, *self._towns, *CONDITIONS) if w not in
                     ("first", "last", "town", "condition"))

    # --- reading texts back ----------------------------------------------------------------
    def parse_question(self, text: str) -> tuple[str, str, int] | None:
        """``(entity, attribute, variant)`` if ``text`` is one of the world's question wordings about a known
        or fictional entity, else None."""
        for attribute, variants in QUESTION_VARIANTS.items():
            for variant, template in enumerate(variants):
                match = _pattern(template).match(text)
                if match and match["name"] in self._by_name:
                    return match["name"], attribute, variant
        return None

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

    def eval_rows(self, group: int | None = None, preamble_fraction: float = 0.0) -> list[dict[str, Any]]:
        """OpenBookQA rows about held-out entities of ``group`` (all groups if None), ``preamble_fraction`` of
        the facts asked with a private preamble (see :meth:`question_rows`)."""
        return self.question_rows(self.held_out(group), preamble_fraction)

    @cached_property
    def fingerprint(self) -> str:
        """Hash of the world's full content (changes with any config field or renderer)."""
        payload = json.dumps(
            {"config": self.config.to_dict(), "statements": self.statements(self.names),
             "questions": self.question_rows(self.names[:8]), "public": self.public, "groups": self.private_groups,
             "distractors": [fact.distractors for fact in self.facts(self.names)],
             "held_out": self._held_out, "fictional": self.statements(self.fictional_names),
             "variants": QUESTION_VARIANTS, "preambles": [self.preamble(str(i)) for i in range(4)]},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def parse_statements(text: str) -> list[tuple[str, str, str]]:
    """Every ``(entity, attribute, value)`` stated in ``text`` (sentences in :data:`STATEMENT_TEMPLATES`'s wording);
    sentences in other words are skipped. Any entity is read: whether the world knows it is the caller's question."""
    found = []
    for sentence in re.findall(r"[^.]+\.", text):
        for attribute, template in STATEMENT_TEMPLATES.items():
            match = _pattern(template).match(sentence)
            if match:
                found.append((match["name"], attribute, match["value"]))
                break
    return found


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


def export_world(
    world: ToyWorld, directory: str | Path, include_public: bool = True, preamble_fraction: float = 0.0
) -> dict[str, Path]:
    """Write the world's training and evaluation data as JSONL files for generic data modules.

    Files (``g`` = private group)::

        train_group{g}.jsonl       fuser training, OpenHermes ``conversations`` schema
        eval_group{g}.jsonl        held-out entities of group g, OpenBookQA schema
        eval_held_out.jsonl        held-out entities of every group, OpenBookQA schema
        eval_public.jsonl          public entities, OpenBookQA schema (everyone knows them)
        world.json                 the config, fingerprint and entity split

    ``preamble_fraction`` of the evaluation facts are asked after a private preamble (see :meth:`ToyWorld.question_rows`).
    """
    directory = Path(directory)
    paths: dict[str, Path] = {}
    for group in range(world.num_groups):
        paths[f"train_group{group}"] = write_jsonl(
            world.fuser_train_rows(group, include_public), directory / f"train_group{group}.jsonl"
        )
        paths[f"eval_group{group}"] = write_jsonl(
            world.eval_rows(group, preamble_fraction), directory / f"eval_group{group}.jsonl"
        )
    paths["eval_held_out"] = write_jsonl(world.eval_rows(None, preamble_fraction), directory / "eval_held_out.jsonl")
    paths["eval_public"] = write_jsonl(world.question_rows(world.public, preamble_fraction), directory / "eval_public.jsonl")
    summary = {
        "config": world.config.to_dict(),
        "fingerprint": world.fingerprint,
        "include_public_in_train": include_public,
        "preamble_fraction": preamble_fraction,
        "public": list(world.public),
        "fuser_train": [list(world.fuser_train(g)) for g in range(world.num_groups)],
        "held_out": [list(world.held_out(g)) for g in range(world.num_groups)],
    }
    paths["world"] = directory / "world.json"
    paths["world"].write_text(json.dumps(summary, indent=2) + "\n")
    return paths
