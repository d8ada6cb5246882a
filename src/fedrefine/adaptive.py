"""Adaptive route: per query, receiver alone / T2T / C2C (with a codec and layer budget) within a latency budget.

A *profile* (JSON, :func:`load_profile`) lists held-out questions and the route *options* measured on
them: each option's accuracy on a development split, its bytes on the wire per question, its compute
time and its round trips. A :class:`LinkProfile` (bandwidth, round-trip time) turns an option into a
predicted latency per question::

    latency = compute_s + round_trips * rtt_s + bytes * 8 / (mbit_per_s * 1e6)

:class:`AdaptivePolicy` picks, per question, the option with the highest *development* accuracy whose
predicted latency fits the budget (ties: fewer bytes, then lower latency); when none fits, the fastest.
It never reads the held-out ``correct`` answers: those only score :func:`sweep`, which compares the
policy with every fixed option over link rates and budgets and checks the issue's bar per link rate.

Profile format (``"format": "fedrefine.adaptive_profile", "version": 1``)::

    {"format": "fedrefine.adaptive_profile", "version": 1,
     "synthetic": false,                      # optional: true for a made-up smoke-run profile
     "notes": ...,                            # optional: any JSON (how it was measured)
     "questions": [{"id": "q0", "receiver_tokens": 57, "sender_tokens": {"llama": 61}}, ...],
     "options": [{"name": "c2c/int4/all", "route": "c2c", "codec": "int4", "layer_budget": null,
                  "dev_accuracy": 0.84, "correct": [true, false, ...], "bytes": [81920, ...],
                  "compute_s": 0.061, "round_trips": 1}, ...]}

This module needs no torch: it reads a profile that the latency benchmark wrote.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from fedrefine.field_help import documented

PROFILE_FORMAT = "fedrefine.adaptive_profile"
PROFILE_VERSION = 1
RouteFamily = Literal["receiver", "t2t", "c2c"]
ROUTE_FAMILIES: tuple[str, ...] = get_args(RouteFamily)
#: The issue's link rates.
LINK_RATES_MBIT_PER_S: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)
#: The bar's accuracy tolerance: 1 point.
ACCURACY_TOLERANCE = 0.01
_EPS = 1e-12  # float slack when comparing shares and accuracies


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


# ----------------------------------------------------------------------------- link and policy


@documented
@dataclass(frozen=True)
class LinkProfile:
    """The network between the receiver and its senders (one link: ``bytes`` counts all senders)."""

    mbit_per_s: float = field(metadata={"help": "bandwidth in Mbit/s (10^6 bits per second)"})
    rtt_s: float = field(default=0.02, metadata={"help": "round-trip time in seconds"})

    def __post_init__(self):
        if not (self.mbit_per_s > 0 and math.isfinite(self.mbit_per_s)):
            raise ValueError(f"LinkProfile.mbit_per_s must be a positive number, got {self.mbit_per_s!r}.")
        if not (self.rtt_s >= 0 and math.isfinite(self.rtt_s)):
            raise ValueError(f"LinkProfile.rtt_s must be >= 0 seconds, got {self.rtt_s!r}.")

    def transfer_s(self, nbytes: int) -> float:
        """Seconds to push ``nbytes`` through the link."""
        return nbytes * 8 / (self.mbit_per_s * 1e6)


def predicted_latency_s(option: RouteOption, question_index: int, link: LinkProfile) -> float:
    """compute_s + round_trips * rtt_s + bytes * 8 / (mbit_per_s * 1e6), for one question."""
    return option.compute_s + option.round_trips * link.rtt_s + link.transfer_s(option.bytes[question_index])


class AdaptivePolicy:
    """Per question, the most accurate option (by development accuracy) that fits the latency budget.

    Among the options whose predicted latency is <= ``budget_s``: the highest ``dev_accuracy``; ties go to
    fewer bytes, then lower latency, then the earlier option. When none fits: the fastest (the receiver
    alone, normally). Reads only ``dev_accuracy``, ``bytes``, ``compute_s`` and ``round_trips``.

    Args:
        options: the route options of a profile.
        link: the link to the senders.
        budget_s: the latency budget in seconds.
        dev_accuracy_margin: development accuracies within this of the best fitting one count as a tie
            (then fewer bytes wins); 0 = exact ties only. A margin near the development split's noise
            keeps the policy from paying bytes for a difference it cannot resolve (e.g. fp32 vs int8).
    """

    def __init__(
        self, options: Sequence[RouteOption], link: LinkProfile, budget_s: float, dev_accuracy_margin: float = 0.0
    ):
        if not options:
            raise ValueError("AdaptivePolicy needs at least one route option.")
        if not budget_s >= 0:
            raise ValueError(f"AdaptivePolicy.budget_s must be >= 0 seconds, got {budget_s!r}.")
        if not 0 <= dev_accuracy_margin < 1:
            raise ValueError(f"AdaptivePolicy.dev_accuracy_margin must be in [0, 1), got {dev_accuracy_margin!r}.")
        self.options = tuple(options)
        self.link = link
        self.budget_s = float(budget_s)
        self.dev_accuracy_margin = float(dev_accuracy_margin)

    def latency_s(self, option: RouteOption, question_index: int) -> float:
        return predicted_latency_s(option, question_index, self.link)

    def choose(self, question_index: int) -> RouteOption:
        scored = [(self.latency_s(o, question_index), o.bytes[question_index], order, o)
                  for order, o in enumerate(self.options)]
        fitting = [s for s in scored if s[0] <= self.budget_s]
        if fitting:
            best = max(s[3].dev_accuracy for s in fitting)
            tied = [s for s in fitting if s[3].dev_accuracy >= best - self.dev_accuracy_margin - _EPS]
            return min(tied, key=lambda s: (s[1], s[0], s[2]))[3]
        return min(scored, key=lambda s: (s[0], s[1], -s[3].dev_accuracy, s[2]))[3]


# ----------------------------------------------------------------------------- sweep


@documented
@dataclass(frozen=True)
class SweepRow:
    """One policy (adaptive, or a fixed option) at one link rate and budget, over the held-out questions."""

    policy: str = field(metadata={"help": '"adaptive" or the fixed option\'s name'})
    fixed: bool = field(metadata={"help": "true for a fixed option, false for the adaptive policy"})
    mbit_per_s: float = field(metadata={"help": "link bandwidth in Mbit/s"})
    rtt_s: float = field(metadata={"help": "link round-trip time in seconds"})
    budget_s: float = field(metadata={"help": "latency budget in seconds"})
    accuracy: float = field(
        metadata={"help": "share of questions answered correctly, late answers counted with their correctness"}
    )
    accuracy_within_budget: float = field(
        metadata={"help": "share of questions answered correctly AND within the budget (late answers are wrong)"}
    )
    share_within_budget: float = field(metadata={"help": "share of questions whose latency is <= the budget"})
    mean_bytes: float = field(metadata={"help": "mean bytes on the wire per question"})
    mean_latency_s: float = field(metadata={"help": "mean predicted latency per question, in seconds"})
    choices: dict[str, int] = field(metadata={"help": "questions per option used (one entry for a fixed option)"})

    @property
    def meets_budget(self) -> bool:
        """Every question within the budget."""
        return self.share_within_budget >= 1.0 - _EPS


@documented
@dataclass(frozen=True)
class BudgetVerdict:
    """The issue's bar at one link rate and budget."""

    mbit_per_s: float = field(metadata={"help": "link bandwidth in Mbit/s"})
    budget_s: float = field(metadata={"help": "latency budget in seconds"})
    adaptive_share: float = field(metadata={"help": "the adaptive policy's share of questions within the budget"})
    adaptive_accuracy: float = field(metadata={"help": "the adaptive policy's accuracy_within_budget"})
    best_fixed_by_share: str = field(metadata={"help": "the fixed option with the most questions within the budget"})
    best_fixed_share: float = field(metadata={"help": "that option's share within the budget"})
    best_fixed_meeting_budget: str | None = field(
        metadata={"help": "the most accurate fixed option with every question within the budget; null if none"}
    )
    best_fixed_accuracy: float | None = field(metadata={"help": "that option's accuracy (all its answers in time)"})
    share_ok: bool = field(metadata={"help": "adaptive_share >= best_fixed_share"})
    accuracy_ok: bool = field(
        metadata={"help": "adaptive_accuracy >= best_fixed_accuracy - tolerance (true when no fixed option meets it)"}
    )

    @property
    def holds(self) -> bool:
        return self.share_ok and self.accuracy_ok


@dataclass(frozen=True)
class RateVerdict:
    """The bar at one link rate: it holds when it holds at every budget swept at that rate."""

    mbit_per_s: float
    budgets: tuple[BudgetVerdict, ...]

    @property
    def holds(self) -> bool:
        return all(b.holds for b in self.budgets)


@dataclass(frozen=True)
class SweepResult:
    """Every row of a sweep and the bar's verdict per link rate."""

    rows: tuple[SweepRow, ...]
    verdicts: tuple[RateVerdict, ...]
    accuracy_tolerance: float

    @property
    def holds(self) -> bool:
        return all(v.holds for v in self.verdicts)


def _round_up(seconds: float, digits: int = 3) -> float:
    """Round up to ``digits`` significant digits (a budget stays >= the latency it was derived from)."""
    if seconds <= 0:
        return 0.0
    scale = 10 ** (digits - 1 - math.floor(math.log10(seconds)))
    rounded = math.ceil(seconds * scale) / scale
    return rounded if rounded >= seconds else (math.ceil(seconds * scale) + 1) / scale


def default_budgets_s(options: Sequence[RouteOption], link: LinkProfile) -> list[float]:
    """Budgets at one link rate: each option's median and largest predicted latency over the questions
    (rounded up to 3 significant digits), sorted and deduplicated. The smallest lets only the fastest
    option fit (the receiver alone, normally); the largest lets every option fit every question; the
    medians in between are where a per-question choice can beat every fixed option."""
    budgets = set()
    for option in options:
        latencies = sorted(predicted_latency_s(option, i, link) for i in range(len(option.bytes)))
        budgets.add(_round_up(latencies[(len(latencies) - 1) // 2]))
        budgets.add(_round_up(latencies[-1]))
    return sorted(budgets)


def score_choices(
    name: str, fixed: bool, chosen: Sequence[RouteOption], link: LinkProfile, budget_s: float
) -> SweepRow:
    """A :class:`SweepRow` for one option per question (``chosen[i]`` answers question ``i``)."""
    n = len(chosen)
    latencies = [predicted_latency_s(option, i, link) for i, option in enumerate(chosen)]
    in_time = [latency <= budget_s for latency in latencies]
    correct = [option.correct[i] for i, option in enumerate(chosen)]
    choices: dict[str, int] = {}
    for option in chosen:
        choices[option.name] = choices.get(option.name, 0) + 1
    return SweepRow(
        policy=name, fixed=fixed, mbit_per_s=link.mbit_per_s, rtt_s=link.rtt_s, budget_s=budget_s,
        accuracy=sum(correct) / n,
        accuracy_within_budget=sum(c and t for c, t in zip(correct, in_time)) / n,
        share_within_budget=sum(in_time) / n,
        mean_bytes=sum(option.bytes[i] for i, option in enumerate(chosen)) / n,
        mean_latency_s=sum(latencies) / n,
        choices=choices,
    )


def judge(adaptive: SweepRow, fixed: Sequence[SweepRow], tolerance: float = ACCURACY_TOLERANCE) -> BudgetVerdict:
    """The bar at one rate and budget: the adaptive policy has at least the within-budget share of the best
    fixed option by that share, and its accuracy_within_budget is within ``tolerance`` of the most accurate
    fixed option that meets the budget (every question within it); vacuous when no fixed option does."""
    best_share = max(fixed, key=lambda r: (r.share_within_budget, r.accuracy_within_budget))
    meeting = [r for r in fixed if r.meets_budget]
    best_meeting = max(meeting, key=lambda r: (r.accuracy, -r.mean_bytes)) if meeting else None
    return BudgetVerdict(
        mbit_per_s=adaptive.mbit_per_s, budget_s=adaptive.budget_s,
        adaptive_share=adaptive.share_within_budget, adaptive_accuracy=adaptive.accuracy_within_budget,
        best_fixed_by_share=best_share.policy, best_fixed_share=best_share.share_within_budget,
        best_fixed_meeting_budget=best_meeting.policy if best_meeting else None,
        best_fixed_accuracy=best_meeting.accuracy if best_meeting else None,
        share_ok=adaptive.share_within_budget >= best_share.share_within_budget - _EPS,
        accuracy_ok=best_meeting is None
        or adaptive.accuracy_within_budget >= best_meeting.accuracy - tolerance - _EPS,
    )


def sweep(
    profile: AdaptiveProfile,
    mbit_per_s: Sequence[float] = LINK_RATES_MBIT_PER_S,
    rtt_s: float = 0.02,
    budgets_s: Sequence[float] | Mapping[float, Sequence[float]] | None = None,
    accuracy_tolerance: float = ACCURACY_TOLERANCE,
    dev_accuracy_margin: float = 0.0,
) -> SweepResult:
    """Score the adaptive policy and every fixed option at each link rate and budget.

    Args:
        profile: the questions and options (``correct`` scores the rows; the policy never reads it).
        mbit_per_s: link rates in Mbit/s.
        rtt_s: the link's round-trip time in seconds.
        budgets_s: latency budgets in seconds, the same at every rate, or a mapping rate -> budgets;
            None: :func:`default_budgets_s` at each rate.
        accuracy_tolerance: how far below the best budget-meeting fixed option the adaptive policy's
            accuracy may be (0.01 = 1 point).
        dev_accuracy_margin: the policy's tie margin on development accuracy (see :class:`AdaptivePolicy`).
    """
    n = len(profile.questions)
    rows: list[SweepRow] = []
    verdicts: list[RateVerdict] = []
    for rate in mbit_per_s:
        link = LinkProfile(mbit_per_s=float(rate), rtt_s=rtt_s)
        if budgets_s is None:
            budgets = default_budgets_s(profile.options, link)
        elif isinstance(budgets_s, Mapping):
            budgets = list(budgets_s[rate])
        else:
            budgets = list(budgets_s)
        rate_verdicts = []
        for budget in budgets:
            policy = AdaptivePolicy(profile.options, link, budget, dev_accuracy_margin)
            adaptive = score_choices("adaptive", False, [policy.choose(i) for i in range(n)], link, budget)
            fixed = [score_choices(o.name, True, [o] * n, link, budget) for o in profile.options]
            rows += [adaptive, *fixed]
            rate_verdicts.append(judge(adaptive, fixed, accuracy_tolerance))
        verdicts.append(RateVerdict(float(rate), tuple(rate_verdicts)))
    return SweepResult(tuple(rows), tuple(verdicts), accuracy_tolerance)
