"""The adaptive route's link model and policy: predicted latency per option, and the choice within a budget."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from fedrefine.federation.adaptive.profile import FLOAT_SLACK, RouteOption
from fedrefine.settings import documented

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
            tied = [s for s in fitting if s[3].dev_accuracy >= best - self.dev_accuracy_margin - FLOAT_SLACK]
            return min(tied, key=lambda s: (s[1], s[0], s[2]))[3]
        return min(scored, key=lambda s: (s[0], s[1], -s[3].dev_accuracy, s[2]))[3]


