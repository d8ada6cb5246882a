"""Adaptive-route profiles: the measured route options and the held-out questions they were measured on,
read and validated from JSON (errors name the file and the field)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from fedrefine.settings import documented

PROFILE_FORMAT = "fedrefine.adaptive_profile"
PROFILE_VERSION = 1
RouteFamily = Literal["receiver", "t2t", "c2c"]
ROUTE_FAMILIES: tuple[str, ...] = get_args(RouteFamily)
FLOAT_SLACK = 1e-12  # when comparing shares and accuracies


class ProfileError(ValueError):
    """A profile file that does not follow the format; the message names the file and the field."""


# ----------------------------------------------------------------------------- profile


@documented
@dataclass(frozen=True)
class ProfileQuestion:
    """One held-out question of a profile (token counts explain the bytes; the policy does not need them)."""

    id: str = field(metadata={"help": "the question's id in its data set"})
    receiver_tokens: int = field(metadata={"help": "tokens of the receiver's prompt"})
    sender_tokens: dict[str, int] = field(metadata={"help": "tokens each sender prefills, by sender name"})


@documented
@dataclass(frozen=True)
class RouteOption:
    """One way to answer: a route family with its codec and layer budget, as measured for a profile."""

    name: str = field(metadata={"help": 'unique label, e.g. "receiver", "t2t", "c2c/int4/all", "c2c/int8/0.3"'})
    route: RouteFamily = field(metadata={"help": "receiver (alone), t2t (text hints) or c2c (KV caches)"})
    codec: str | None = field(metadata={"help": "the KV-message codec (e.g. fp32, int8, int4); null without one"})
    layer_budget: float | None = field(metadata={"help": "fraction of the sender's layers sent, in (0, 1]; null = all"})
    dev_accuracy: float = field(
        metadata={"help": "accuracy on a development split: the only accuracy the policy may use"}
    )
    correct: tuple[bool, ...] = field(
        metadata={"help": "per held-out question, answered correctly; scores the sweep, never read by the policy"}
    )
    bytes: tuple[int, ...] = field(
        metadata={"help": "per held-out question, bytes on the wire over all senders (known before sending)"}
    )
    compute_s: float = field(
        metadata={"help": "median compute seconds per question excluding transfer (the critical path of the stages)"}
    )
    round_trips: int = field(metadata={"help": "network round trips: 0 for the receiver alone, 1 for c2c / t2t"})


@dataclass(frozen=True)
class AdaptiveProfile:
    """A loaded profile: the held-out questions and the options measured on them."""

    questions: tuple[ProfileQuestion, ...]
    options: tuple[RouteOption, ...]
    synthetic: bool = False
    notes: Any = None
    source: str = "<profile>"

    def option(self, name: str) -> RouteOption:
        for option in self.options:
            if option.name == name:
                return option
        raise KeyError(f"{self.source}: no option named {name!r}; options: {[o.name for o in self.options]}.")


_TOP_LEVEL_REQUIRED = ("format", "version", "questions", "options")
_TOP_LEVEL_OPTIONAL = ("synthetic", "notes")
_QUESTION_FIELDS = ("id", "receiver_tokens", "sender_tokens")
_OPTION_FIELDS = ("name", "route", "codec", "layer_budget", "dev_accuracy", "correct", "bytes", "compute_s",
                  "round_trips")


class _Reader:
    """Typed field access that raises :class:`ProfileError` naming the file and the field's path."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, problem: str) -> ProfileError:
        return ProfileError(f"{self.source}: {where}: {problem}")

    def object(self, value: Any, where: str, required: Sequence[str], optional: Sequence[str] = ()) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a JSON object, got {type(value).__name__}.")
        missing = [key for key in required if key not in value]
        if missing:
            raise self.fail(f"{where}.{missing[0]}" if where else missing[0],
                            f"missing field (required: {', '.join(required)}).")
        unknown = [key for key in value if key not in (*required, *optional)]
        if unknown:
            raise self.fail(f"{where}.{unknown[0]}" if where else unknown[0],
                            f"unknown field (known: {', '.join((*required, *optional))}).")
        return value

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"expected a non-empty string, got {value!r}.")
        return value

    def integer(self, value: Any, where: str, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(where, f"expected an integer >= {minimum}, got {value!r}.")
        return value

    def number(self, value: Any, where: str, low: float, high: float = math.inf, low_open: bool = False) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value > low if low_open else value >= low) and value <= high
        if not ok:
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
            raise self.fail(where, f"expected a number in {bounds}, got {value!r}.")
        return float(value)

    def array(self, value: Any, where: str, length: int | None = None, length_of: str = "") -> list:
        if not isinstance(value, list):
            raise self.fail(where, f"expected a JSON array, got {type(value).__name__}.")
        if length is not None and len(value) != length:
            raise self.fail(where, f"has {len(value)} entries but {length_of} has {length}; give one per question.")
        return value


def parse_profile(data: Any, source: str = "<profile>") -> AdaptiveProfile:
    """Validate a decoded profile; errors name ``source`` (the file) and the offending field."""
    read = _Reader(source)
    top = read.object(data, "", _TOP_LEVEL_REQUIRED, _TOP_LEVEL_OPTIONAL)
    if top["format"] != PROFILE_FORMAT:
        raise read.fail("format", f"expected {PROFILE_FORMAT!r}, got {top['format']!r}; is this an adaptive profile?")
    if isinstance(top["version"], bool) or top["version"] != PROFILE_VERSION:
        raise read.fail("version", f"this fedrefine reads version {PROFILE_VERSION}, got {top['version']!r}.")
    synthetic = top.get("synthetic", False)
    if not isinstance(synthetic, bool):
        raise read.fail("synthetic", f"expected true or false, got {synthetic!r}.")

    raw_questions = read.array(top["questions"], "questions")
    if not raw_questions:
        raise read.fail("questions", "is empty; a profile needs at least one held-out question.")
    questions, seen_ids = [], set()
    for i, raw in enumerate(raw_questions):
        where = f"questions[{i}]"
        q = read.object(raw, where, _QUESTION_FIELDS)
        qid = read.string(q["id"], f"{where}.id")
        if qid in seen_ids:
            raise read.fail(f"{where}.id", f"{qid!r} appears twice; question ids must be unique.")
        seen_ids.add(qid)
        senders = q["sender_tokens"]
        if not isinstance(senders, dict):
            raise read.fail(f"{where}.sender_tokens", f"expected an object of sender name -> tokens, got {senders!r}.")
        questions.append(ProfileQuestion(
            id=qid,
            receiver_tokens=read.integer(q["receiver_tokens"], f"{where}.receiver_tokens"),
            sender_tokens={read.string(name, f"{where}.sender_tokens"): read.integer(
                count, f"{where}.sender_tokens.{name}") for name, count in senders.items()},
        ))

    raw_options = read.array(top["options"], "options")
    if not raw_options:
        raise read.fail("options", "is empty; a profile needs at least one route option.")
    options, seen_names = [], set()
    for i, raw in enumerate(raw_options):
        label = raw.get("name") if isinstance(raw, dict) else None
        where = f"options[{i}] ({label})" if isinstance(label, str) and label else f"options[{i}]"
        o = read.object(raw, where, _OPTION_FIELDS)
        name = read.string(o["name"], f"{where}.name")
        if name in seen_names:
            raise read.fail(f"{where}.name", f"{name!r} appears twice; option names must be unique.")
        seen_names.add(name)
        if o["route"] not in ROUTE_FAMILIES:
            raise read.fail(f"{where}.route", f"{o['route']!r} is not one of {', '.join(ROUTE_FAMILIES)}.")
        codec = None if o["codec"] is None else read.string(o["codec"], f"{where}.codec")
        layer_budget = None if o["layer_budget"] is None else read.number(
            o["layer_budget"], f"{where}.layer_budget", 0.0, 1.0, low_open=True)
        correct = read.array(o["correct"], f"{where}.correct", len(questions), "questions")
        for j, value in enumerate(correct):
            if not isinstance(value, bool):
                raise read.fail(f"{where}.correct[{j}]", f"expected true or false, got {value!r}.")
        nbytes = read.array(o["bytes"], f"{where}.bytes", len(questions), "questions")
        options.append(RouteOption(
            name=name,
            route=o["route"],
            codec=codec,
            layer_budget=layer_budget,
            dev_accuracy=read.number(o["dev_accuracy"], f"{where}.dev_accuracy", 0.0, 1.0),
            correct=tuple(correct),
            bytes=tuple(read.integer(b, f"{where}.bytes[{j}]") for j, b in enumerate(nbytes)),
            compute_s=read.number(o["compute_s"], f"{where}.compute_s", 0.0),
            round_trips=read.integer(o["round_trips"], f"{where}.round_trips"),
        ))
    return AdaptiveProfile(tuple(questions), tuple(options), synthetic, top.get("notes"), source)


def load_profile(path: str | Path) -> AdaptiveProfile:
    """Read and validate a profile file (see the module docstring for the format)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such profile file; write one with the latency benchmark.") from None
    except json.JSONDecodeError as error:
        raise ProfileError(f"{path}: not valid JSON ({error}).") from None
    return parse_profile(data, str(path))


def profile_to_dict(profile: AdaptiveProfile) -> dict[str, Any]:
    """The JSON object of a profile (what :func:`parse_profile` reads back)."""
    data: dict[str, Any] = {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "synthetic": profile.synthetic}
    if profile.notes is not None:
        data["notes"] = profile.notes
    data["questions"] = [
        {"id": q.id, "receiver_tokens": q.receiver_tokens, "sender_tokens": dict(q.sender_tokens)}
        for q in profile.questions
    ]
    data["options"] = [
        {"name": o.name, "route": o.route, "codec": o.codec, "layer_budget": o.layer_budget,
         "dev_accuracy": o.dev_accuracy, "correct": list(o.correct), "bytes": list(o.bytes),
         "compute_s": o.compute_s, "round_trips": o.round_trips}
        for o in profile.options
    ]
    return data


