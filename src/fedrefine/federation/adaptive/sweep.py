"""The adaptive policy against every fixed option over link rates and budgets, and the issue's bar per rate."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fedrefine.federation.adaptive.policy import AdaptivePolicy, LinkProfile, predicted_latency_s
from fedrefine.federation.adaptive.profile import FLOAT_SLACK, AdaptiveProfile, RouteOption
from fedrefine.settings import documented

#: The issue's link rates.
LINK_RATES_MBIT_PER_S: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)
#: The bar's accuracy tolerance: 1 point.
ACCURACY_TOLERANCE = 0.01


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
        return self.share_within_budget >= 1.0 - FLOAT_SLACK


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
        share_ok=adaptive.share_within_budget >= best_share.share_within_budget - FLOAT_SLACK,
        accuracy_ok=best_meeting is None
        or adaptive.accuracy_within_budget >= best_meeting.accuracy - tolerance - FLOAT_SLACK,
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
