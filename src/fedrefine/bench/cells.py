"""A benchmark sweep's cells: route families x query modes x sender subsets, plus the receiver-alone baselines.

A cell is one :class:`~fedrefine.tasks.routes.Route` evaluated on the sweep's questions: the receiver
alone, or the receiver helped by a subset of senders through one route family (``c2c.residual``,
``c2c.concat`` or ``t2t``; ``adaptive``: one cell over every sender), in one query mode (``original``, ``shared``, ``private``; see
:mod:`fedrefine.privacy`). Cells that cannot run (residual fusion in ``private`` mode) are kept
with the reason, never dropped silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Literal

from fedrefine.evaluation.question_batch import T2T_OPTIONS
from fedrefine.participants.align import AlignedMessages
from fedrefine.settings import SettingsError
from fedrefine.tasks.routes import QUERY_MODES, OptionsPolicy, Route, RouteError

#: The route families a sweep compares.
ROUTES: tuple[str, ...] = ("c2c.residual", "c2c.concat", "t2t")
#: What a sweep may also name: ``adaptive`` (needs ``evaluation.adaptive.profile``; not plotted in Fig. 3a/b).
SWEEP_ROUTES: tuple[str, ...] = (*ROUTES, "adaptive")
#: ``prefixes``: the first k senders for k = 1..N (the paper's Fig. 3a); ``all``: every non-empty subset.
SubsetPolicy = Literal["prefixes", "all"]


def check_sweep(
    participants: Sequence[str], receiver: str, senders: Sequence[str], link_mbit_per_s: float,
    num_questions: int | None, batch_size: int,
) -> None:
    """Refuse a sweep's settings that cannot run (each refusal names the setting and the fix)."""
    missing = [n for n in (receiver, *senders) if n not in participants]
    if missing:
        raise SettingsError(f"Sweep names participants {missing} that are not in `participants` ({sorted(participants)}).")
    if receiver in senders:
        raise SettingsError(f"The receiver {receiver!r} cannot also be a sender.")
    if not link_mbit_per_s > 0:
        raise SettingsError(f"link_mbit_per_s must be positive, got {link_mbit_per_s}.")
    if num_questions is not None and num_questions < 1:
        raise SettingsError(f"num_questions must be at least 1 (or null for all), got {num_questions}.")
    if batch_size < 1:
        raise SettingsError(f"batch_size must be at least 1, got {batch_size}.")


def unsupported_reason(cell: Route, options: OptionsPolicy = "verbatim", aligned: AlignedMessages = "all") -> str | None:
    """Why a cell cannot run (e.g. prompt-position residual fusion in ``private`` mode), or None; ``aligned``: the
    messages its fusers align (see :meth:`Route.check`)."""
    try:
        cell.check(T2T_OPTIONS if cell.kind == "t2t" else options, aligned=aligned)
    except RouteError as err:
        return str(err)
    return None


def sender_subsets(
    senders: Sequence[str], policy: SubsetPolicy | Sequence[Sequence[str]] = "prefixes", singles: bool = True
) -> list[tuple[str, ...]]:
    """The sender subsets a sweep evaluates, smallest first.

    ``policy`` is ``prefixes``, ``all`` or an explicit list of subsets; ``singles`` adds every single
    sender (point-to-point comparisons, Fig. 3b) when the policy does not already include it.
    """
    if not senders:
        raise SettingsError("A sweep needs at least one sender.")
    if len(set(senders)) != len(senders):
        raise SettingsError(f"Sender names must be unique, got {list(senders)}.")
    if policy == "prefixes":
        subsets = [tuple(senders[:k]) for k in range(1, len(senders) + 1)]
    elif policy == "all":
        subsets = [c for k in range(1, len(senders) + 1) for c in combinations(senders, k)]
    elif isinstance(policy, str):
        raise SettingsError(f"Unknown subset policy {policy!r}; use 'prefixes', 'all' or a list of sender lists.")
    else:
        subsets = []
        for subset in policy:
            unknown = [s for s in subset if s not in senders]
            if not subset or unknown or len(set(subset)) != len(subset):
                raise SettingsError(
                    f"Invalid sender subset {list(subset)}: it must be non-empty, without repeats, and use only "
                    f"the sweep's senders {list(senders)}."
                )
            subsets.append(tuple(s for s in senders if s in subset))  # the sweep's order
    if singles:
        subsets += [(s,) for s in senders]
    unique = list(dict.fromkeys(subsets))
    return sorted(unique, key=lambda subset: (len(subset), [senders.index(s) for s in subset]))


def expand_cells(
    senders: Sequence[str],
    routes: Sequence[str] = ROUTES,
    query_modes: Sequence[str] = QUERY_MODES,
    subsets: SubsetPolicy | Sequence[Sequence[str]] = "prefixes",
    singles: bool = True,
) -> list[Route]:
    """Every cell of a sweep: the receiver alone per query mode, then route families x query modes x subsets."""
    unknown_routes = [r for r in routes if r not in SWEEP_ROUTES]
    unknown_modes = [m for m in query_modes if m not in QUERY_MODES]
    if unknown_routes or unknown_modes or not routes or not query_modes:
        raise SettingsError(
            f"Sweep routes must be a non-empty subset of {list(SWEEP_ROUTES)} (got {list(routes)}) and query modes of "
            f"{list(QUERY_MODES)} (got {list(query_modes)})."
        )
    chosen = sender_subsets(senders, subsets, singles)
    cells = [Route("receiver", query_mode=mode) for mode in query_modes]
    for family in routes:
        if family == "adaptive":  # one cell: it picks among whole routes over every sender, on original queries
            cells += [Route("adaptive", tuple(senders))] if "original" in query_modes else []
            continue
        template = Route.parse(family)
        cells += [
            Route(template.kind, subset, query_mode=mode, fusion=template.fusion)
            for mode in query_modes
            for subset in chosen
        ]
    return cells


def cell_fields(cell: Route) -> dict[str, object]:
    """The columns that name a cell in its result row (``key`` is the route's canonical text)."""
    return {"key": str(cell), "route": cell.family, "query_mode": cell.query_mode, "senders": "+".join(cell.senders),
            "n_senders": len(cell.senders)}
