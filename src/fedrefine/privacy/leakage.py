"""What reached whom: recording everything a participant receives, and how much of the user's text leaked.

The invariant: in ``shared`` and ``private`` modes nothing of the user's text but its rephrasing
(and the options, per the options policy) reaches a sender. :class:`InputRecorder` records
everything a participant receives to check this; :func:`leakage_report` measures the overlap.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedrefine.participants import Participant
from fedrefine.participants.chat import Message
from fedrefine.privacy.plans import QueryPlan


class _RecordingTokenizer:
    """A tokenizer proxy that records every text it encodes and every conversation it renders."""

    def __init__(self, tokenizer: Any, recorder: InputRecorder) -> None:
        self._tokenizer = tokenizer
        self._recorder = recorder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        self._recorder.texts.extend([text] if isinstance(text, str) else list(text))
        return self._tokenizer(text, *args, **kwargs)

    def apply_chat_template(self, conversation: Any, *args: Any, **kwargs: Any) -> Any:
        self._recorder.messages.append([dict(m) for m in conversation])
        return self._tokenizer.apply_chat_template(conversation, *args, **kwargs)


class InputRecorder:
    """Records everything a participant receives: token ids reaching its model, texts reaching its tokenizer.

    Use as a context manager and hand :attr:`participant` (same model, recording tokenizer) to
    the code under test; the model's forward is hooked while the context is open, so token ids
    are recorded whichever participant object the code was given.
    """

    def __init__(self, participant: Participant) -> None:
        self.original = participant
        self.participant = dataclasses.replace(participant, tokenizer=_RecordingTokenizer(participant.tokenizer, self))
        self.input_ids: list[Tensor] = []
        self.texts: list[str] = []
        self.messages: list[list[Message]] = []
        self.opaque_calls = 0
        self._handle = None

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            self.opaque_calls += 1  # inputs_embeds only: cannot be decoded, reported as such
        else:
            self.input_ids.append(input_ids.detach().cpu().clone())

    def __enter__(self) -> InputRecorder:
        self._handle = self.original.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def decoded(self) -> list[str]:
        """Every recorded forward's token ids decoded (one string per batch row and call)."""
        tokenizer = self.original.tokenizer
        return [tokenizer.decode(row.tolist(), skip_special_tokens=True) for ids in self.input_ids for row in ids]

    def received_text(self) -> str:
        """All the participant received, as one text: decoded token ids, encoded texts, rendered messages."""
        rendered = [m["content"] for conversation in self.messages for m in conversation]
        return "\n".join([*self.decoded(), *self.texts, *rendered])


STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers him his how i if in into is it its itself just me more most my no nor not now
    of off on once only or other our ours out over own same she should so some such than that the their
    theirs them then there these they this those through to too under until up very was we were what when
    where which while who whom why will with would you your yours""".split()
)
_WORD = re.compile(r"\w+")

Embedder = Callable[[Sequence[str]], Tensor]


def content_words(text: str) -> set[str]:
    """Lowercased words of ``text`` without stop words."""
    return {w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS}


def token_overlap(original: str, received: str) -> float:
    """Fraction of the original's content words present in the received text (0.0 if it has none)."""
    words = content_words(original)
    return len(words & content_words(received)) / len(words) if words else 0.0


def find_leaks(original: str, received: str, allowed: str = "") -> list[str]:
    """Content words of ``original`` found in ``received`` that ``allowed`` (what may be sent) does not contain."""
    return sorted((content_words(original) & content_words(received)) - content_words(allowed))


def private_tokens_found(private: str, received: str) -> tuple[int, int]:
    """How many of ``private``'s word tokens (stop words included: every token counts) occur in ``received``,
    and how many it has."""
    tokens = _WORD.findall(private.lower())
    present = set(_WORD.findall(received.lower()))
    return sum(token in present for token in tokens), len(tokens)


def embedding_similarity(original: str, received: str, embedder: Embedder | None) -> float | None:
    """Cosine similarity of the two texts' embeddings, or None without an embedder."""
    if embedder is None:
        return None
    vectors = embedder([original, received]).float()
    return float(torch.nn.functional.cosine_similarity(vectors[0:1], vectors[1:2]).item())


def local_sentence_embedder(path: str | Path) -> Embedder | None:
    """A sentence-transformers embedder from a local directory, or None (package or directory missing).

    Never downloads: anything but an existing local directory gives None.
    """
    try:
        from sentence_transformers import SentenceTransformer  # optional dependency
    except ImportError:
        return None
    if not Path(path).is_dir():
        return None
    model = SentenceTransformer(str(path), local_files_only=True)
    return lambda texts: model.encode(list(texts), convert_to_tensor=True)


@dataclass(frozen=True)
class LeakageRecord:
    """Leakage of one question to one sender: overlap and similarity with the stem, and the rephrasing's latency."""

    question_id: str
    sender: str
    token_overlap: float
    embedding_similarity: float | None
    rephrase_seconds: float | None
    cached: bool | None
    private_tokens: int = 0  # word tokens of the question's private text (0: it has none)
    private_tokens_leaked: int = 0  # of them, found in what the sender received


@dataclass(frozen=True)
class LeakageSummary:
    """Means (and the worst overlap) over all records; None where no record has a figure."""

    num_records: int
    mean_token_overlap: float
    max_token_overlap: float
    mean_embedding_similarity: float | None
    mean_rephrase_seconds: float | None
    private_tokens: int = 0  # word tokens of the questions' private texts, over all records
    private_tokens_leaked: int = 0  # of them, found in what the senders received

    @property
    def private_token_leakage(self) -> float | None:
        """Leaked over all private tokens; None where no question has a private text."""
        return self.private_tokens_leaked / self.private_tokens if self.private_tokens else None


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return math.fsum(present) / len(present) if present else None


def leakage_report(
    plans: Sequence[QueryPlan], embedder: Embedder | None = None
) -> tuple[list[LeakageRecord], LeakageSummary]:
    """Per question and sender, how much of the user's question stem reaches the sender; and the aggregate.

    Questions with a ``private_text`` (e.g. a preamble about the user) also count that span's word tokens
    found in what the sender received (:func:`private_tokens_found`).

    The original is the question stem as the user wrote it (options follow the explicit options
    policy); the received text is the sender's full text (:attr:`QueryPlan.sender_texts`).
    """
    records = []
    for plan in plans:
        private = plan.item.private_text or ""
        for sender, received in plan.sender_texts.items():
            rephrasing = plan.rephrasings.get(sender)
            leaked, total = private_tokens_found(private, received)
            records.append(
                LeakageRecord(
                    question_id=plan.item.id,
                    sender=sender,
                    token_overlap=token_overlap(plan.item.question_stem, received),
                    embedding_similarity=embedding_similarity(plan.item.question_stem, received, embedder),
                    rephrase_seconds=None if rephrasing is None else rephrasing.seconds,
                    cached=None if rephrasing is None else rephrasing.cached,
                    private_tokens=total,
                    private_tokens_leaked=leaked,
                )
            )
    overlaps = [r.token_overlap for r in records]
    summary = LeakageSummary(
        num_records=len(records),
        mean_token_overlap=_mean(overlaps) or 0.0,
        max_token_overlap=max(overlaps, default=0.0),
        mean_embedding_similarity=_mean([r.embedding_similarity for r in records]),
        mean_rephrase_seconds=_mean([r.rephrase_seconds for r in records]),
        private_tokens=sum(r.private_tokens for r in records),
        private_tokens_leaked=sum(r.private_tokens_leaked for r in records),
    )
    return records, summary
