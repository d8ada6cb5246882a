"""What one route's participants read of a batch's rephrasings, and what of the user's text reached its senders.

A route is charged only for what its own readers read: the receiver (in shared mode it reads the
rephrasing too) and the route's senders. A greedy rephrasing shared by several senders of one
question is written once and counted once; two questions with the same stem each pay for theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedrefine.privacy.leakage import leakage_report
from fedrefine.privacy.plans import QueryPlan


@dataclass(frozen=True)
class RouteReading:
    """A route's privacy figures on one batch.

    ``rephrase_seconds``: generation time of the rephrasings its readers read; ``unfaithful``: (questions whose
    rephrasings include one that failed the faithfulness check, questions with a rephrasing); ``leakage``: the
    mean share of a question stem's words that reached a sender; ``private_tokens``: (word tokens of the
    questions' ``private_text`` found in what senders received, all of them).
    """

    rephrase_seconds: float
    unfaithful: tuple[int, int]
    leakage: float
    private_tokens: tuple[int, int]


def route_reading(plans: Sequence[QueryPlan], senders: Sequence[str]) -> RouteReading:
    """What the receiver and ``senders`` read in the batch's ``plans`` (one per question, in a rephrased mode)."""
    readers = {plans[0].receiver, *senders} if plans else set()
    read = [[r for name, r in plan.rephrasings.items() if name in readers] for plan in plans]
    written = [{(r.query, r.seed): r for r in rephrasings} for rephrasings in read]  # per question: each once
    rephrased = [rephrasings for rephrasings in read if rephrasings]  # the receiver alone reads none in private mode
    summary = leakage_report(plans)[1]
    return RouteReading(
        rephrase_seconds=sum(r.seconds for question in written for r in question.values()),
        unfaithful=(sum(not all(r.faithful for r in rephrasings) for rephrasings in rephrased), len(rephrased)),
        leakage=summary.mean_token_overlap,
        private_tokens=(summary.private_tokens_leaked, summary.private_tokens),
    )
