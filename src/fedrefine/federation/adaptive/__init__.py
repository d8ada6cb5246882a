"""Adaptive route: per query, receiver alone / T2T / C2C (with a codec and layer budget) within a latency budget.

A *profile* (:mod:`~fedrefine.federation.adaptive.profile`) lists held-out questions and the route options
measured on them (development accuracy, bytes on the wire, compute time, round trips). A
:class:`LinkProfile` turns an option into a predicted latency per question::

    latency = compute_s + round_trips * rtt_s + bytes * 8 / (mbit_per_s * 1e6)

:class:`AdaptivePolicy` (:mod:`~fedrefine.federation.adaptive.policy`) picks, per question, the option with the
highest development accuracy that fits the budget (near-ties within a margin: fewer bytes); when
none fits, the fastest. It never reads held-out correctness: that only scores :func:`sweep`
(:mod:`~fedrefine.federation.adaptive.sweep`), which compares it with every fixed option over link rates and
budgets and checks the bar per rate. Nothing here needs torch.
"""

from fedrefine.federation.adaptive.policy import AdaptivePolicy, LinkProfile, predicted_latency_s
from fedrefine.federation.adaptive.profile import (
    PROFILE_FORMAT,
    PROFILE_VERSION,
    ROUTE_FAMILIES,
    AdaptiveProfile,
    ProfileError,
    ProfileQuestion,
    RouteOption,
    load_profile,
    parse_profile,
    profile_to_dict,
)
from fedrefine.federation.adaptive.sweep import (
    ACCURACY_TOLERANCE,
    LINK_RATES_MBIT_PER_S,
    BudgetVerdict,
    RateVerdict,
    SweepResult,
    SweepRow,
    default_budgets_s,
    judge,
    score_choices,
    sweep,
)

__all__ = [
    "ACCURACY_TOLERANCE", "LINK_RATES_MBIT_PER_S", "PROFILE_FORMAT", "PROFILE_VERSION", "ROUTE_FAMILIES",
    "AdaptivePolicy", "AdaptiveProfile", "BudgetVerdict", "LinkProfile", "ProfileError", "ProfileQuestion",
    "RateVerdict", "RouteOption", "SweepResult", "SweepRow", "default_budgets_s", "judge", "load_profile",
    "parse_profile", "predicted_latency_s", "profile_to_dict", "score_choices", "sweep",
]
