"""Text-to-text (T2T) baseline: senders write background text, the receiver answers with it in context.

Flow for a batch of multiple-choice questions::

    each sender reads the communication prompt (the question WITHOUT its options)   -> hint text
        greedy, at most ``budget`` new tokens, its own chat template, stops at its end-of-turn
    receiver reads the hints and the full multiple-choice prompt                      -> option scores
        scored exactly as :mod:`fedrefine.tasks.multiple_choice` does (next-token logits over the
        option letters after ``ANSWER_PREFIX``)

Hints of several senders are concatenated in the order the senders are given (the caller
fixes that order, e.g. sorted by name, so results are reproducible). Empty hints are left
out, so with no senders (or a zero budget) the receiver's prompt is exactly the one of
:func:`fedrefine.tasks.scoring.predict_alone`.

Bytes on the wire per sender: the hint's UTF-8 text, and alternatively its token ids at
:data:`TOKEN_ID_BYTES` (int32) each, the width behind the FedRefine paper's "16 bytes of token
ids per token for four senders". The end-of-turn token is not sent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from fedrefine.participants import Participant
from fedrefine.participants.chat import Message
from fedrefine.participants.generation import Reply, generate_replies
from fedrefine.settings import documented
from fedrefine.tasks.multiple_choice import (
    AnswerStyle,
    MultipleChoiceItem,
    encode_cloze_prompt,
    encode_options_prompt,
    question_text,
)
from fedrefine.tasks.scoring import NORMALIZATIONS, Normalization, score_encoded
from fedrefine.timing import stopwatch

#: The reference's communication prompt (C2C's ``TwoStageInference.background_prompt``).
DEFAULT_PROMPT_TEMPLATE = "Briefly describe the most useful background to solve the problem:\n\n{question}"
#: Header of the hint block when hints are placed in the receiver's user message.
DEFAULT_HINT_HEADER = "Background from other models:\n"
#: Writes one sender's hints: ``(prompts, budget, batch_size) -> one Reply per prompt``.
HintWriter = Callable[[Sequence[str], int, int], list[Reply]]
#: Bytes per transmitted token id (int32): the paper's 16 bytes per token for four T2T senders.
TOKEN_ID_BYTES = 4

HintPlacement = Literal["user_message", "dialogue"]


@documented
@dataclass(frozen=True)
class T2TConfig:
    """How senders are prompted and how their text reaches the receiver ."""

    prompt_template: str = field(
        default=DEFAULT_PROMPT_TEMPLATE,
        metadata={"help": "The sender's user message; {question} is replaced by the text the sender reads "
                          "(by default the question stem, without options)."},
    )
    budget: int = field(default=64, metadata={"help": "Most new tokens a sender may generate (greedy)."})
    placement: HintPlacement = field(
        default="user_message",
        metadata={"help": "user_message: one user message hint_header + hint1 + blank line + ... + the question. "
                          "dialogue: the reference's layout, the user asks prompt_template for the question stem, "
                          "the assistant turn holds the hints, then the user asks the multiple-choice question."},
    )
    hint_header: str = field(
        default=DEFAULT_HINT_HEADER, metadata={"help": "First line of the hint block (user_message placement)."}
    )
    bytes_per_id: int = field(
        default=TOKEN_ID_BYTES, metadata={"help": "Bytes per transmitted token id, for Hint.id_bytes."}
    )
    batch_size: int = field(default=16, metadata={"help": "Questions per batched forward / generate call."})

    def __post_init__(self) -> None:
        if "{question}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain '{{question}}'; got {self.prompt_template!r}.")
        if self.budget < 0:
            raise ValueError(f"budget must be >= 0 tokens; got {self.budget}.")
        if self.placement not in ("user_message", "dialogue"):
            raise ValueError(f"Unknown placement {self.placement!r}; choose 'user_message' or 'dialogue'.")
        if self.bytes_per_id < 1 or self.batch_size < 1:
            raise ValueError("bytes_per_id and batch_size must be positive.")


# --- the receiver's prompt and scoring ----------------------------------------------------------


def hint_messages(
    item: MultipleChoiceItem, hints: Sequence[str], config: T2TConfig | None = None, style: AnswerStyle = "letter"
) -> list[Message]:
    """The receiver's conversation: the multiple-choice question with the hints placed per ``config``.

    Hints are stripped of surrounding whitespace; empty ones are left out.
    """
    config = config or T2TConfig()
    question = question_text(item, style)
    hints = [h.strip() for h in hints if h.strip()]
    if not hints:
        return [{"role": "user", "content": question}]
    if config.placement == "dialogue":
        return [
            {"role": "user", "content": config.prompt_template.format(question=item.question_stem)},
            {"role": "assistant", "content": "\n\n".join(hints)},
            {"role": "user", "content": question},
        ]
    block = "".join(f"{hint}\n\n" for hint in hints)
    return [{"role": "user", "content": f"{config.hint_header}{block}{question}"}]


# --- the baseline -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hint:
    """What one sender transmitted for one question, and its exact size."""

    sender: str
    text: str
    token_ids: tuple[int, ...]
    bytes_per_id: int = TOKEN_ID_BYTES

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def id_bytes(self) -> int:
        """Bytes when sent as token ids (``bytes_per_id`` each, end-of-turn not sent)."""
        return self.num_tokens * self.bytes_per_id

    @property
    def utf8_bytes(self) -> int:
        """Bytes when sent as UTF-8 text (the text placed in the receiver's context)."""
        return len(self.text.encode("utf-8"))


@dataclass
class T2TResult:
    """One question answered by T2T: the hints in sender order, the prediction, and seconds per stage.

    ``option_scores`` are the scores behind ``prediction`` (cloze: under the requested normalisation);
    ``cloze_predictions`` (cloze only) the option chosen under each normalisation. ``seconds`` maps ``"sender:<name>"`` (its hint generation) and ``"receiver"`` (the scored
    forward) to this question's share of its batch's wall time.
    """

    question_id: str
    hints: list[Hint]
    prediction: int
    option_scores: list[float]
    seconds: dict[str, float] = field(default_factory=dict)
    cloze_predictions: dict[str, int] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(h.num_tokens for h in self.hints)

    @property
    def id_bytes(self) -> int:
        return sum(h.id_bytes for h in self.hints)

    @property
    def utf8_bytes(self) -> int:
        return sum(h.utf8_bytes for h in self.hints)


def _sender_questions(
    senders: Sequence[Participant], items: Sequence[MultipleChoiceItem], given: Mapping[str, Sequence[str]] | None
) -> dict[str, Sequence[str]]:
    names = [s.name for s in senders]
    if len(set(names)) != len(names):
        raise ValueError(f"Senders must be distinct participants; got {names}.")
    if given is None:
        return {name: [item.question_stem for item in items] for name in names}
    missing = [name for name in names if name not in given]
    if missing:  # never fall back to the user's text: that would bypass rephrasing
        raise ValueError(f"sender_questions has no text for sender(s) {missing}; give one text per sender.")
    for name in names:
        if len(given[name]) != len(items):
            raise ValueError(f"sender_questions[{name!r}] has {len(given[name])} texts for {len(items)} questions.")
    return {name: given[name] for name in names}


def t2t_predict(
    receiver: Participant,
    senders: Sequence[Participant],
    items: Sequence[MultipleChoiceItem],
    config: T2TConfig | None = None,
    sender_questions: Mapping[str, Sequence[str]] | None = None,
    style: AnswerStyle = "letter",
    normalization: Normalization = "token_mean",
    writers: Mapping[str, HintWriter] | None = None,
) -> list[T2TResult]:
    """Answer each question by the receiver with the senders' generated hints in its context.

    Args:
        receiver: the participant that answers; it reads ``items`` (pass rephrased items to
            make it read a rephrasing).
        senders: the participants that write hints, in the order their hints are concatenated.
        items: the questions as the receiver reads them.
        config: prompt, budget, placement and byte accounting (:class:`T2TConfig`).
        sender_questions: per sender name, the text it reads for each item in place of the
            question stem (e.g. :attr:`fedrefine.privacy.plans.QueryPlan.sender_texts`). When given it
            must cover every sender.
        style: the receiver answers by letter (logits) or by option text (cloze scoring).
        normalization: how cloze scores are normalised for ``prediction`` (see :mod:`fedrefine.tasks.scoring`).
        writers: per sender name, who writes its hints instead of its local model (e.g. a remote sender's
            ``hints``), called as ``writer(prompts, budget, batch_size)``.

    Returns one :class:`T2TResult` per item, in order.
    """
    config = config or T2TConfig()
    questions = _sender_questions(senders, items, sender_questions)
    hints: dict[str, list[Reply]] = {}
    for sender in senders:
        # stripped: a chat template trims a message's surrounding blanks (an empty question leaves the prompt's "\n\n")
        prompts = [config.prompt_template.format(question=q).strip() for q in questions[sender.name]]
        write = (writers or {}).get(sender.name)
        if write is None:
            hints[sender.name] = generate_replies(sender, prompts, config.budget, config.batch_size)
        else:
            hints[sender.name] = write(prompts, config.budget, config.batch_size)

    answers = answer_with_hints(
        receiver, items, [[hints[s.name][i].text for s in senders] for i in range(len(items))], config, style, normalization
    )
    results: list[T2TResult] = []
    for i, answer in enumerate(answers):
        replies = [hints[s.name][i] for s in senders]
        results.append(
            T2TResult(
                question_id=items[i].id,
                hints=[Hint(s.name, reply.text, reply.token_ids, config.bytes_per_id) for s, reply in zip(senders, replies)],
                prediction=answer.prediction,
                option_scores=answer.option_scores,
                seconds={
                    **{f"sender:{s.name}": reply.seconds for s, reply in zip(senders, replies)},
                    "receiver": answer.seconds,
                },
                cloze_predictions=answer.cloze_predictions,
            )
        )
    return results


@dataclass(frozen=True)
class HintedAnswer:
    """The receiver's choice for one question read with hints: as :class:`T2TResult` holds it."""

    prediction: int
    option_scores: list[float]
    seconds: float
    cloze_predictions: dict[str, int]


def answer_with_hints(
    receiver: Participant,
    items: Sequence[MultipleChoiceItem],
    hints: Sequence[Sequence[str]],
    config: T2TConfig | None = None,
    style: AnswerStyle = "letter",
    normalization: Normalization = "token_mean",
) -> list[HintedAnswer]:
    """The receiver's answer to each item with ``hints[i]`` placed in its prompt (per ``config``); batched.

    T2T's second half, also usable on its own: with the true statement as the one hint it measures
    whether the receiver can read a hint at all (an upper bound on what T2T can reach).
    """
    config = config or T2TConfig()
    if len(hints) != len(items):
        raise ValueError(f"Got hints for {len(hints)} questions but {len(items)} questions; give one list per question.")
    answers: list[HintedAnswer] = []
    for start in range(0, len(items), config.batch_size):
        chunk = range(start, min(start + config.batch_size, len(items)))
        encoded = []
        for i in chunk:
            messages = hint_messages(items[i], hints[i], config, style)
            encoded.append(
                encode_options_prompt(receiver, messages, items[i].labels)
                if style == "letter"
                else encode_cloze_prompt(receiver, messages, items[i])
            )
        with stopwatch(receiver.device) as elapsed:
            scores = score_encoded(receiver, encoded, style)
        chosen, normalized = scores.predictions(normalization), scores.normalized(normalization)  # (B,), (B, K)
        cloze = {n: scores.predictions(n) for n in NORMALIZATIONS} if scores.cloze else {}
        for row, i in enumerate(chunk):
            answers.append(
                HintedAnswer(
                    prediction=int(chosen[row]),
                    option_scores=normalized[row, : len(items[i].labels)].tolist(),
                    seconds=elapsed.seconds / len(chunk),
                    cloze_predictions={n: int(picks[row]) for n, picks in cloze.items()},
                )
            )
    return answers
