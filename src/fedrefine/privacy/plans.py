"""Who reads what: the query plan of each question in a privacy (query) mode.

Privacy modes (what each participant reads for one multiple-choice question):

- ``original``: everyone reads the user's text.
- ``shared``: one rephrasing, written by the rephraser (the receiver by default), is read by
  every participant, receiver included (the FedRefine paper's experiment).
- ``private``: the receiver keeps the user's text; each sender reads its own rephrasing
  (variant = the sender's name; distinct texts need ``do_sample=True``, greedy decoding gives
  every sender the same one). Senders then read other text than the receiver, which only
  concat fusion and T2T allow (:meth:`fedrefine.tasks.routes.Route.check`).

The invariant: in ``shared`` and ``private`` modes nothing of the user's text but its
rephrasing (and the options, per the options policy) reaches a sender. The rephraser reads the
original, so it must not be a sender; an empty rephrasing is sent as it is, never replaced by
the original. :class:`~fedrefine.privacy.leakage.InputRecorder` records everything a participant
receives to check this.

Options policy (``options``), for senders only; the receiver always reads the options verbatim
with their letters, since it answers by letter:

- ``"verbatim"`` (default): the stem is rephrased, the lettered options follow unchanged. All
  participants share one answer space (what residual C2C needs), and rephrasing options with a
  small model risks merging, reordering or dropping them; benchmark options rarely carry the
  user's private context, the stem does. Use ``"withhold"`` when the options are sensitive.
- ``"rephrase"``: stem and lettered options are rephrased together into one free text (in
  ``shared`` mode the receiver reads that text as its stem, its lettered options following).
- ``"withhold"``: senders read the (rephrased) stem only. The T2T reference prompts senders
  with the question without options, so build T2T plans with ``"withhold"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from fedrefine.participants.chat import Message
from fedrefine.privacy.rephrase import Rephraser, Rephrasing
from fedrefine.tasks.multiple_choice import AnswerStyle, MultipleChoiceItem, question_text
from fedrefine.tasks.routes import OPTIONS_POLICIES, QUERY_MODES, OptionsPolicy, QueryMode

DEFAULT_OPTIONS: OptionsPolicy = "verbatim"


def lettered_options(item: MultipleChoiceItem) -> str:
    return "\n".join(f"{label}. {text}" for label, text in zip(item.labels, item.choices))


def rephrase_source(item: MultipleChoiceItem, options: OptionsPolicy = DEFAULT_OPTIONS) -> str:
    """The text handed to the rephraser: the stem, or the stem and lettered options for ``"rephrase"``."""
    return f"{item.question_stem}\n{lettered_options(item)}" if options == "rephrase" else item.question_stem


def sender_text(
    item: MultipleChoiceItem, stem: str, options: OptionsPolicy = DEFAULT_OPTIONS, rephrased: bool = True, style: AnswerStyle = "letter"
) -> str:
    """The exact user-message content a sender reads, given the stem (or rephrasing) it was given.

    ``verbatim``: :func:`question_text` with ``stem`` in place of the question's stem; ``withhold``:
    ``stem`` alone; ``rephrase``: ``stem`` alone when it is a rephrasing of stem and options,
    else (original mode, nothing rephrased) the question as written.
    """
    if options == "withhold" or (options == "rephrase" and rephrased):
        return stem
    return question_text(dataclasses.replace(item, question_stem=stem), style)


@dataclass(frozen=True)
class QueryPlan:
    """Exactly what each participant reads for one question.

    ``receiver_item`` is the question as the receiver reads it (``question_text(receiver_item)``);
    ``sender_texts`` maps each sender's name to the user-message content it reads (for T2T: the
    text put in the communication prompt's ``{question}``); ``rephrasings`` maps each participant
    that reads a rephrasing to it.
    """

    item: MultipleChoiceItem
    mode: QueryMode
    options: OptionsPolicy
    receiver: str
    receiver_item: MultipleChoiceItem
    sender_texts: dict[str, str]
    rephrasings: dict[str, Rephrasing] = field(default_factory=dict)
    style: AnswerStyle = "letter"

    @property
    def reads(self) -> dict[str, str]:
        """Participant name -> the text it reads (the receiver's full multiple-choice prompt included)."""
        return {self.receiver: question_text(self.receiver_item, self.style), **self.sender_texts}

    def sender_messages(self, sender: str) -> list[Message]:
        """The conversation a sender encodes (one user message), e.g. for a concat-fusion prefill."""
        return [{"role": "user", "content": self.sender_texts[sender]}]


def plan_queries(
    items: Sequence[MultipleChoiceItem],
    senders: Sequence[str],
    mode: QueryMode,
    rephraser: Rephraser | None = None,
    options: OptionsPolicy = DEFAULT_OPTIONS,
    receiver: str | None = None,
    style: AnswerStyle = "letter",
) -> list[QueryPlan]:
    """A :class:`QueryPlan` per question: what the receiver and each named sender read in ``mode``.

    ``shared`` and ``private`` need a ``rephraser`` that is not one of the senders (it reads the
    original). ``receiver`` names the receiver in the plan (default: the rephraser's name).
    ``style`` is the answer style the question text asks for (see :func:`question_text`).
    """
    if mode not in QUERY_MODES:
        raise ValueError(f"Unknown privacy mode {mode!r}; choose one of {list(QUERY_MODES)}.")
    if options not in OPTIONS_POLICIES:
        raise ValueError(f"Unknown options policy {options!r}; choose one of {list(OPTIONS_POLICIES)}.")
    if len(set(senders)) != len(senders):
        raise ValueError(f"Sender names must be distinct; got {list(senders)}.")
    if mode != "original":
        if rephraser is None:
            raise ValueError(f"Privacy mode {mode!r} needs a rephraser (the receiver by default); none was given.")
        if rephraser.participant.name in senders:
            raise ValueError(
                f"The rephraser {rephraser.participant.name!r} is also a sender: it reads the user's original "
                f"text, which would break the {mode!r} mode's promise. Rephrase with the receiver."
            )
    receiver = receiver or (rephraser.participant.name if rephraser is not None else "receiver")
    plans = []
    if mode == "original":
        for item in items:
            texts = {s: sender_text(item, item.question_stem, options, rephrased=False, style=style) for s in senders}
            plans.append(QueryPlan(item, mode, options, receiver, receiver_item=item, sender_texts=texts, style=style))
        return plans
    sources = [rephrase_source(item, options) for item in items]
    if mode == "shared":  # one rephrasing per question, read by everyone
        for item, shared in zip(items, rephraser.rephrase(sources)):
            plans.append(
                QueryPlan(
                    item, mode, options, receiver,
                    receiver_item=dataclasses.replace(item, question_stem=shared.text),
                    sender_texts={s: sender_text(item, shared.text, options, style=style) for s in senders},
                    rephrasings={name: shared for name in (receiver, *senders)},
                    style=style,
                )
            )
        return plans
    own = {s: rephraser.rephrase(sources, variant=s) for s in senders}  # private: one per sender
    for i, item in enumerate(items):
        plans.append(
            QueryPlan(
                item, mode, options, receiver,
                receiver_item=item,
                sender_texts={s: sender_text(item, own[s][i].text, options, style=style) for s in senders},
                rephrasings={s: own[s][i] for s in senders},
                style=style,
            )
        )
    return plans
