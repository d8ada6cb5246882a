"""Rephrased queries: who reads what, a disk cache of rephrasings, the privacy invariant and leakage figures.

Privacy modes (what each participant reads for one multiple-choice question):

- ``original``: everyone reads the user's text.
- ``shared``: one rephrasing, written by the rephraser (the receiver by default), is read by
  every participant, receiver included (the FedRefine paper's experiment).
- ``private``: the receiver keeps the user's text; each sender reads its own rephrasing
  (variant = the sender's name; distinct texts need ``do_sample=True``, greedy decoding gives
  every sender the same one). Senders then read other text than the receiver, which only
  concat fusion and T2T allow (:func:`check_mode`).

The invariant: in ``shared`` and ``private`` modes nothing of the user's text but its
rephrasing (and the options, per the options policy) reaches a sender. The rephraser reads the
original, so it must not be a sender; an empty rephrasing is sent as it is, never replaced by
the original. :class:`InputRecorder` records everything a participant receives to check this.

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
import hashlib
import json
import math
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from fedrefine.chat import Message
from fedrefine.generation import generate_replies
from fedrefine.multiple_choice import MultipleChoiceItem, question_text
from fedrefine.participants import Participant

PrivacyMode = Literal["original", "shared", "private"]
OptionsPolicy = Literal["verbatim", "rephrase", "withhold"]
MODES: tuple[str, ...] = ("original", "shared", "private")
OPTIONS_POLICIES: tuple[str, ...] = ("verbatim", "rephrase", "withhold")
DEFAULT_OPTIONS: OptionsPolicy = "verbatim"

DEFAULT_REPHRASE_TEMPLATE = (
    "Rephrase the following question in different words. Keep everything needed to answer it, "
    "and reply with the rephrased question only.\n\n{query}"
)

#: How each evaluation route moves information from senders to the receiver.
#: ``residual``: sender K/V added at aligned token positions (sender and receiver read the same text);
#: ``concat``: sender K/V placed ahead of the receiver's cache; ``text``: T2T; ``none``: one model alone.
ROUTE_FUSION: dict[str, str] = {
    "receiver": "none",
    "sender": "none",
    "t2t": "text",
    "c2c": "residual",
    "c2c_residual": "residual",
    "c2c_mismatched": "residual",
    "c2c_random_kv": "residual",
    "c2c_reordered": "residual",
    "c2c_concat": "concat",
    "concat": "concat",
}


def check_mode(mode: str, route: str, options: str = DEFAULT_OPTIONS) -> None:
    """Raise a ValueError naming the mode, the route and the fix when they cannot work together.

    Residual fusion aligns sender and receiver tokens by character spans of the same text, so
    it needs the sender to read exactly what the receiver reads: not ``private`` mode, and
    options sent ``verbatim``.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown privacy mode {mode!r}; choose one of {list(MODES)}.")
    if options not in OPTIONS_POLICIES:
        raise ValueError(f"Unknown options policy {options!r}; choose one of {list(OPTIONS_POLICIES)}.")
    if route not in ROUTE_FUSION:
        raise ValueError(f"Unknown route {route!r}; choose one of {sorted(ROUTE_FUSION)}.")
    if ROUTE_FUSION[route] != "residual":
        return
    if mode == "private":
        raise ValueError(
            f"Privacy mode 'private' cannot run route {route!r}: residual fusion adds sender K/V at token "
            f"positions aligned on the same text, but in 'private' mode the receiver keeps the original and "
            f"each sender reads its own rephrasing. Use route 'c2c_concat' or 't2t', or privacy mode 'shared'."
        )
    if options != "verbatim":
        raise ValueError(
            f"Options policy {options!r} with route {route!r} (privacy mode {mode!r}): residual fusion needs "
            f"senders to read exactly the receiver's text, options included. Use options 'verbatim', or route "
            f"'c2c_concat' or 't2t'."
        )


# --- rephrasing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RephraseConfig:
    """How the rephraser rewrites a query.

    Args:
        template: the rephraser's user message; ``{query}`` is replaced by the user's text.
        max_new_tokens: longest rephrasing, in tokens.
        do_sample: sample (reproducibly, one seed per query and variant) instead of greedy.
        temperature, top_p: sampling settings.
        seed: base seed; a variant's seed is derived from it and the variant's name.
        batch_size: queries per batched greedy generate call.
    """

    template: str = DEFAULT_REPHRASE_TEMPLATE
    max_new_tokens: int = 96
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self) -> None:
        if "{query}" not in self.template:
            raise ValueError(f"Rephrasing template must contain '{{query}}'; got {self.template!r}.")


@dataclass(frozen=True)
class Rephrasing:
    """One rephrased query: the source text, the rephrasing, and how it was made.

    ``seconds`` is the generation time measured when it was made (its share of the batch),
    also for a rephrasing later read back from the cache (``cached=True``).
    """

    query: str
    text: str
    variant: str | None
    seed: int | None
    num_tokens: int
    seconds: float
    cached: bool = False


def variant_seed(seed: int, variant: str | None) -> int:
    """Seed of one variant: ``seed`` itself for None, else mixed with a stable hash of the variant's name."""
    return seed if variant is None else (seed + zlib.crc32(variant.encode("utf-8"))) % 2**31


class RephrasingCache:
    """Rephrasings on disk as JSON lines (``rephrasings.jsonl`` under ``cache_dir``), one record per key.

    A record holds the key, the rephraser's identity key, the template, the query, seed, variant
    and the rephrasing. The key is the SHA-256 of the generation's full description
    (see :meth:`Rephraser.cache_key`). Without ``cache_dir`` the cache lives in memory only.
    """

    FILENAME = "rephrasings.jsonl"

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.path = None if cache_dir is None else Path(cache_dir) / self.FILENAME
        self.records: dict[str, dict[str, Any]] = {}
        if self.path is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    record = json.loads(line)
                    self.records[record["key"]] = record

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def put(self, record: dict[str, Any]) -> None:
        self.records[record["key"]] = record
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")


class Rephraser:
    """A participant (the receiver by default) that rewrites queries, with a cache of its rephrasings."""

    def __init__(
        self, participant: Participant, config: RephraseConfig | None = None, cache_dir: str | Path | None = None
    ) -> None:
        self.participant = participant
        self.config = config or RephraseConfig()
        self.cache = RephrasingCache(cache_dir)

    def cache_key(self, query: str, seed: int | None) -> str:
        """Key of one rephrasing: model identity, template, query, decoding settings and seed (sampling only)."""
        config = self.config
        description = {
            "model": self.participant.identity.key,
            "template": config.template,
            "query": query,
            "max_new_tokens": config.max_new_tokens,
            "decoding": (
                {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p, "seed": seed}
                if config.do_sample
                else {"do_sample": False}
            ),
        }
        return hashlib.sha256(json.dumps(description, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def rephrase(self, queries: Sequence[str], variant: str | None = None) -> list[Rephrasing]:
        """One rephrasing per query for ``variant`` (e.g. a participant's name), from the cache when there.

        With greedy decoding the variant does not change the text (every variant shares one
        cached rephrasing); with sampling each variant has its own seed (:func:`variant_seed`).
        """
        config = self.config
        seed = variant_seed(config.seed, variant) if config.do_sample else None
        keys = [self.cache_key(q, seed) for q in queries]
        missing = list(dict.fromkeys(q for q, k in zip(queries, keys) if self.cache.get(k) is None))
        fresh = set()
        if missing:
            replies = generate_replies(
                self.participant,
                [config.template.format(query=q) for q in missing],
                max_new_tokens=config.max_new_tokens,
                batch_size=config.batch_size,
                do_sample=config.do_sample,
                temperature=config.temperature,
                top_p=config.top_p,
                seeds=[seed] * len(missing) if config.do_sample else None,
            )
            for query, reply in zip(missing, replies):
                key = self.cache_key(query, seed)
                fresh.add(key)
                self.cache.put(
                    {
                        "key": key,
                        "model": self.participant.identity.key,
                        "template": config.template,
                        "query": query,
                        "seed": seed,
                        "variant": variant,
                        "text": reply.text.strip(),
                        "num_tokens": len(reply.token_ids),
                        "seconds": reply.seconds,
                    }
                )
        results = []
        for query, key in zip(queries, keys):
            record = self.cache.get(key)
            results.append(
                Rephrasing(
                    query, record["text"], variant, seed, record["num_tokens"], record["seconds"], key not in fresh
                )
            )
        return results


# --- who reads what -----------------------------------------------------------------------------


def lettered_options(item: MultipleChoiceItem) -> str:
    return "\n".join(f"{label}. {text}" for label, text in zip(item.labels, item.choices))


def rephrase_source(item: MultipleChoiceItem, options: str = DEFAULT_OPTIONS) -> str:
    """The text handed to the rephraser: the stem, or the stem and lettered options for ``"rephrase"``."""
    return f"{item.question_stem}\n{lettered_options(item)}" if options == "rephrase" else item.question_stem


def sender_text(
    item: MultipleChoiceItem, stem: str, options: str = DEFAULT_OPTIONS, rephrased: bool = True, style: str = "letter"
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
    mode: PrivacyMode
    options: OptionsPolicy
    receiver: str
    receiver_item: MultipleChoiceItem
    sender_texts: dict[str, str]
    rephrasings: dict[str, Rephrasing] = field(default_factory=dict)
    style: str = "letter"

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
    mode: str,
    rephraser: Rephraser | None = None,
    options: str = DEFAULT_OPTIONS,
    receiver: str | None = None,
    style: str = "letter",
) -> list[QueryPlan]:
    """A :class:`QueryPlan` per question: what the receiver and each named sender read in ``mode``.

    ``shared`` and ``private`` need a ``rephraser`` that is not one of the senders (it reads the
    original). ``receiver`` names the receiver in the plan (default: the rephraser's name).
    ``style`` is the answer style the question text asks for (see :func:`question_text`).
    """
    if mode not in MODES:
        raise ValueError(f"Unknown privacy mode {mode!r}; choose one of {list(MODES)}.")
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


# --- the invariant: record everything a participant receives -------------------------------------


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


# --- leakage ------------------------------------------------------------------------------------

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


@dataclass(frozen=True)
class LeakageSummary:
    """Means (and the worst overlap) over all records; None where no record has a figure."""

    num_records: int
    mean_token_overlap: float
    max_token_overlap: float
    mean_embedding_similarity: float | None
    mean_rephrase_seconds: float | None


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return math.fsum(present) / len(present) if present else None


def leakage_report(
    plans: Sequence[QueryPlan], embedder: Embedder | None = None
) -> tuple[list[LeakageRecord], LeakageSummary]:
    """Per question and sender, how much of the user's question stem reaches the sender; and the aggregate.

    The original is the question stem as the user wrote it (options follow the explicit options
    policy); the received text is the sender's full text (:attr:`QueryPlan.sender_texts`).
    """
    records = []
    for plan in plans:
        for sender, received in plan.sender_texts.items():
            rephrasing = plan.rephrasings.get(sender)
            records.append(
                LeakageRecord(
                    question_id=plan.item.id,
                    sender=sender,
                    token_overlap=token_overlap(plan.item.question_stem, received),
                    embedding_similarity=embedding_similarity(plan.item.question_stem, received, embedder),
                    rephrase_seconds=None if rephrasing is None else rephrasing.seconds,
                    cached=None if rephrasing is None else rephrasing.cached,
                )
            )
    overlaps = [r.token_overlap for r in records]
    summary = LeakageSummary(
        num_records=len(records),
        mean_token_overlap=_mean(overlaps) or 0.0,
        max_token_overlap=max(overlaps, default=0.0),
        mean_embedding_similarity=_mean([r.embedding_similarity for r in records]),
        mean_rephrase_seconds=_mean([r.rephrase_seconds for r in records]),
    )
    return records, summary
