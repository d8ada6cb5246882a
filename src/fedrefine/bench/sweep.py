"""A benchmark sweep's cells: routes x query modes x sender subsets, plus the receiver-alone baselines.

A cell is one evaluation on the sweep's questions: the receiver alone, or the receiver helped by
a subset of senders through one route (``c2c_residual``, ``c2c_concat`` or ``t2t``), in one query
mode (``original``, ``shared``, ``private``; see :mod:`fedrefine.privacy`). Cells that cannot run
(residual fusion in ``private`` mode) are kept with the reason, never dropped silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Literal

from fedrefine.privacy import MODES, check_mode

RouteKind = Literal["receiver", "c2c_residual", "c2c_concat", "t2t"]
ROUTES: tuple[str, ...] = ("c2c_residual", "c2c_concat", "t2t")
#: ``prefixes``: the first k senders for k = 1..N (the paper's Fig. 3a); ``all``: every non-empty subset.
SubsetPolicy = Literal["prefixes", "all"]


@dataclass(frozen=True)
class Cell:
    """One evaluation of the sweep: a route, a query mode and the senders that help."""

    route: str
    query_mode: str
    senders: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """Stable identifier, used to resume a sweep."""
        return f"{self.route}|{self.query_mode}|{'+'.join(self.senders) or '-'}"

    @property
    def fusion_mode(self) -> str | None:
        """``residual`` / ``concat`` for C2C cells, None otherwise."""
        return self.route.removeprefix("c2c_") if self.route.startswith("c2c_") else None

    @property
    def evaluation_route(self) -> str:
        """The :func:`~fedrefine.evaluation.parse_route` name that evaluates this cell."""
        suffix = "" if self.query_mode == "original" else f"@{self.query_mode}"
        if self.route == "receiver":
            return f"receiver{suffix}"
        kind = "t2t" if self.route == "t2t" else "c2c"
        return f"{kind}:{'+'.join(self.senders)}{suffix}"

    def unsupported_reason(self, options: str = "verbatim") -> str | None:
        """Why this cell cannot run (e.g. residual fusion in ``private`` mode), or None."""
        if self.route == "receiver":
            return None
        try:
            check_mode(self.query_mode, self.route, "withhold" if self.route == "t2t" else options)
        except ValueError as err:
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
        raise ValueError("A sweep needs at least one sender.")
    if len(set(senders)) != len(senders):
        raise ValueError(f"Sender names must be unique, got {list(senders)}.")
    if policy == "prefixes":
        subsets = [tuple(senders[:k]) for k in range(1, len(senders) + 1)]
    elif policy == "all":
        subsets = [c for k in range(1, len(senders) + 1) for c in combinations(senders, k)]
    elif isinstance(policy, str):
        raise ValueError(f"Unknown subset policy {policy!r}; use 'prefixes', 'all' or a list of sender lists.")
    else:
        subsets = []
        for subset in policy:
            unknown = [s for s in subset if s not in senders]
            if not subset or unknown or len(set(subset)) != len(subset):
                raise ValueError(
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
    query_modes: Sequence[str] = MODES,
    subsets: SubsetPolicy | Sequence[Sequence[str]] = "prefixes",
    singles: bool = True,
) -> list[Cell]:
    """Every cell of a sweep: the receiver alone per query mode, then routes x query modes x subsets."""
    unknown_routes = [r for r in routes if r not in ROUTES]
    unknown_modes = [m for m in query_modes if m not in MODES]
    if unknown_routes or unknown_modes or not routes or not query_modes:
        raise ValueError(
            f"Sweep routes must be a non-empty subset of {list(ROUTES)} (got {list(routes)}) and query modes of "
            f"{list(MODES)} (got {list(query_modes)})."
        )
    chosen = sender_subsets(senders, subsets, singles)
    cells = [Cell("receiver", mode) for mode in query_modes]
    cells += [Cell(route, mode, subset) for route in routes for mode in query_modes for subset in chosen]
    return cells
