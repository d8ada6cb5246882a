"""Routes: what answers a question, in one vocabulary for evaluation, privacy checks and benchmark sweeps.

Syntax: ``KIND[.FUSION][:SENDERS][_CONTROL][@QUERY_MODE]``

- ``receiver``: the receiver alone;
- ``sender`` / ``sender:<name>``: a sender alone (the only sender, or the named one);
- ``c2c`` / ``c2c:<a>+<b>``: the receiver fused with every sender, or with the named subset;
  ``c2c.residual`` / ``c2c.concat`` name the fusion mode (plain ``c2c``: the receiver's fusers' mode);
- ``c2c:auto``: per question, the senders a :class:`~fedrefine.federation.selection.SenderSelection` picks;
- ``t2t`` / ``t2t:<a>+<b>``: the senders write hints (text) that the receiver reads;
- a C2C control suffix: ``_mismatched`` (senders read another question whose correct letter
  differs), ``_random_kv`` (Gaussian K/V of each layer's own mean and std stand in for the
  senders'), ``_reordered`` (senders read the same question with the options reordered);
- ``adaptive`` / ``adaptive:<a>+<b>``: per evaluation, the option (receiver alone, T2T, or C2C with a codec and layer budget) that
  :mod:`fedrefine.federation.adaptive`'s policy picks for the link and latency budget (``evaluation.adaptive``);
- a query-mode suffix ``@shared`` / ``@private`` (default ``@original``) on receiver, c2c and t2t
  routes: who reads a rephrasing (see :mod:`fedrefine.privacy`).

Examples: ``c2c.concat:llama+qwen2@private``, ``c2c_mismatched``, ``t2t:qwen2@shared``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

from fedrefine.participants.align import AlignedMessages

RouteKind = Literal["receiver", "sender", "c2c", "t2t", "adaptive"]
Control = Literal["none", "mismatched", "random_kv", "reordered"]
#: Who reads a rephrasing (see :mod:`fedrefine.privacy`).
QueryMode = Literal["original", "shared", "private"]
#: What senders get of a question's options in rephrased query modes (see :mod:`fedrefine.privacy`).
OptionsPolicy = Literal["verbatim", "rephrase", "withhold"]
FusionMode = Literal["residual", "concat"]
#: Which question the senders read: the item itself, a mismatched one, or the item with reordered options.
SenderText = Literal["item", "mismatched", "reordered"]

QUERY_MODES: tuple[str, ...] = get_args(QueryMode)
OPTIONS_POLICIES: tuple[str, ...] = get_args(OptionsPolicy)
CONTROL_SUFFIXES = {"_mismatched": "mismatched", "_random_kv": "random_kv", "_reordered": "reordered"}
SYNTAX = (
    "KIND[.FUSION][:SENDERS][_CONTROL][@QUERY_MODE] with KIND receiver, sender, c2c, t2t or adaptive; FUSION residual or "
    "concat (c2c); SENDERS A+B (or auto for c2c); CONTROL mismatched, random_kv or reordered (c2c); QUERY_MODE "
    "original, shared or private"
)


class RouteError(ValueError):
    """A route that does not parse, names unknown senders, or cannot run in its query mode."""


@dataclass(frozen=True)
class Route:
    """What answers: a kind, which senders (empty: every sender), a control, a query mode, a fusion mode.

    ``label`` is the text it was parsed from (results are reported under it); ``str(route)`` is its
    canonical spelling.
    """

    kind: RouteKind
    senders: tuple[str, ...] = ()
    control: Control = "none"
    query_mode: QueryMode = "original"
    fusion: FusionMode | None = None
    auto: bool = False
    label: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise RouteError(f"Invalid route {self.label or self._spelling()!r}: {problem}. Routes are {SYNTAX}.")
        if not self.label:
            object.__setattr__(self, "label", self._spelling())

    def _problem(self) -> str | None:
        if self.kind not in get_args(RouteKind):
            return f"unknown kind {self.kind!r}"
        if self.control not in get_args(Control):
            return f"unknown control {self.control!r}"
        if self.query_mode not in QUERY_MODES:
            return f"unknown query mode {self.query_mode!r}"
        if self.fusion is not None and (self.kind != "c2c" or self.fusion not in get_args(FusionMode)):
            return f"a fusion mode ({self.fusion!r}) is for c2c routes: residual or concat"
        if self.control != "none" and self.kind != "c2c":
            return "controls are for c2c routes"
        if self.auto and self.kind != "c2c":
            return "auto chooses the senders of a c2c route"
        if self.query_mode != "original" and (self.kind == "sender" or self.control != "none" or self.auto):
            return "senders alone, controls and auto run on original queries only"
        if self.kind == "adaptive" and (self.control != "none" or self.fusion or self.auto or self.query_mode != "original"):
            return "adaptive takes no control, fusion mode or query mode (it picks among whole routes)"
        if self.kind == "receiver" and self.senders:
            return "the receiver alone has no senders"
        if self.kind == "sender" and len(self.senders) > 1:
            return "a sender alone is one sender"
        if len(set(self.senders)) != len(self.senders):
            return f"senders repeat: {list(self.senders)}"
        return None

    def _spelling(self) -> str:
        text = self.family
        if self.auto or self.senders:  # an auto route's senders are the ones it may choose from
            text += ":" + ("auto" if self.auto else "+".join(self.senders))
        suffix = {value: key for key, value in CONTROL_SUFFIXES.items()}.get(self.control, "")
        return text + suffix + ("" if self.query_mode == "original" else f"@{self.query_mode}")

    def __str__(self) -> str:
        return self._spelling()

    @classmethod
    def parse(cls, text: str) -> Route:
        """Parse a route's text (see the module docstring); its senders are checked by :meth:`resolve`."""
        base, _, query_mode = text.partition("@")
        control = "none"
        for suffix, value in CONTROL_SUFFIXES.items():
            if base.endswith(suffix):
                base, control = base[: -len(suffix)], value
        head, _, listed = base.partition(":")
        kind, _, fusion = head.partition(".")
        auto = listed == "auto"
        senders = tuple(listed.split("+")) if listed and not auto else ()
        if (listed and not all(senders) and not auto) or (head.endswith(".")) or "@" in query_mode:
            raise RouteError(f"Invalid route {text!r}. Routes are {SYNTAX}.")
        return cls(kind, senders, control, query_mode or "original", fusion or None, auto, label=text)  # type: ignore[arg-type]

    def resolve(self, sender_names: Sequence[str]) -> Route:
        """This route for a receiver with ``sender_names``: named senders checked, the default ones filled in."""
        unknown = [s for s in self.senders if s not in sender_names]
        if unknown:
            raise RouteError(
                f"Unknown sender(s) {unknown} in route {self.label!r}; senders here are {list(sender_names)}."
            )
        senders = self.senders
        if self.kind == "sender" and not senders:
            if len(sender_names) != 1:
                raise RouteError(
                    f"Route {self.label!r} is ambiguous with senders {list(sender_names)}; use 'sender:NAME'."
                )
            senders = tuple(sender_names)
        if self.kind in ("c2c", "t2t", "adaptive") and not senders:  # auto: the senders it may choose from
            senders = tuple(sender_names)
        return dataclasses.replace(self, senders=senders)

    @property
    def sender_text(self) -> SenderText:
        """Which question the senders read: the item itself, a mismatched one, or the reordered item."""
        return {"mismatched": "mismatched", "reordered": "reordered"}.get(self.control, "item")  # type: ignore[return-value]

    @property
    def family(self) -> str:
        """The route without senders, control and query mode (``receiver``, ``c2c.concat``, ``t2t``):
        what a benchmark sweep's plots compare."""
        return self.kind + (f".{self.fusion}" if self.fusion else "")

    @property
    def helped(self) -> bool:
        """Whether senders help the receiver (C2C or T2T)."""
        return self.kind in ("c2c", "t2t")

    def check(self, options: OptionsPolicy = "verbatim", fusion: FusionMode | None = None,
              aligned: AlignedMessages = "all") -> None:
        """Raise a :class:`RouteError` naming the route, the query mode and the fix when they cannot run together.

        ``fusion`` is the receiver's fusers' mode (for plain ``c2c``). Residual fusion aligns sender and
        receiver tokens by character spans of the same text, so it needs the senders to read exactly what
        the receiver reads: not ``private`` mode, and options sent ``verbatim``. Fusers that write only the
        last prompt token (``fuse_at: last``) align only the last message (``aligned="last"``: the answer
        prefix every participant reads), so there each sender may read its own rephrasing.
        """
        if options not in OPTIONS_POLICIES:
            raise RouteError(f"Unknown options policy {options!r}; choose one of {list(OPTIONS_POLICIES)}.")
        if self.kind != "c2c":
            return
        if self.fusion is not None and fusion is not None and self.fusion != fusion:
            raise RouteError(
                f"Route {self.label!r} asks for {self.fusion} fusion, but the receiver's fusers are {fusion}; "
                f"use route 'c2c' or fusers trained in {self.fusion} mode."
            )
        if (self.fusion or fusion or "residual") != "residual" or aligned == "last":
            return
        alternatives = f"route '{Route('c2c', fusion='concat')}' or '{Route('t2t')}'"
        if self.query_mode == "private":
            raise RouteError(
                f"Query mode 'private' cannot run route {self.label!r} with residual fusion: it adds sender K/V at "
                f"token positions aligned on the same text, but in 'private' mode the receiver keeps the original "
                f"and each sender reads its own rephrasing. Use {alternatives}, query mode 'shared', or fusers that "
                f"write only the last prompt token (fuse_at: last) with the answer prefix (prefill_answer)."
            )
        if options != "verbatim":
            raise RouteError(
                f"Options policy {options!r} with route {self.label!r} (query mode {self.query_mode!r}): residual "
                f"fusion needs senders to read exactly the receiver's text, options included. Use options "
                f"'verbatim', or {alternatives}."
            )


def parse_routes(texts: Sequence[str], sender_names: Sequence[str]) -> list[Route]:
    """Parse and resolve route texts against a receiver's senders."""
    return [Route.parse(text).resolve(sender_names) for text in texts]
