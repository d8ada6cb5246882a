"""The model calls of a served participant, for one request or several merged into one call.

Requests are merged only when the merged call gives each one exactly what it would get alone, so the keys
(:func:`prefill_key`, :func:`hint_key`, :func:`rephrase_key`) are strict:

    Prefill   rows of the same padded width: the rows are stacked (no row gets more padding than it had) and
              every request takes back its own rows, and its own layers, of one forward pass.
    Hint      prompts whose chat encodings all have one length, with the same ``max_new_tokens``: greedy
              decoding of unpadded rows, so no reply depends on its batch mates.
    Rephrase  the same for the rephrasing prompts, with the same variant.

Anything else runs alone (key ``None``), exactly as an unbatched server runs it. The reply's timing is the
merged call's (a Prefill's ``prefill_seconds`` is its forward pass; a reply's ``seconds`` its share of it).
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from fedrefine.participants import Participant
from fedrefine.participants.chat import encode_chat
from fedrefine.participants.generation import Reply, generate_replies
from fedrefine.privacy.rephrase import Rephraser, Rephrasing
from fedrefine.runtime.requests import PrefillPlan
from fedrefine.wire.format import serialize_message
from fedrefine.wire.message import KVMessage, prefill_message


@dataclass(frozen=True)
class HintWork:
    """A checked Hint request."""

    prompts: list[str]
    max_new_tokens: int
    batch_size: int


@dataclass(frozen=True)
class RephraseWork:
    """A checked Rephrase request."""

    queries: list[str]
    variant: str | None


def chat_lengths(participant: Participant, prompts: Sequence[str]) -> set[int]:
    """The distinct token lengths of ``prompts`` as one user message each, in the participant's chat template."""
    return {len(encode_chat(participant, [{"role": "user", "content": p}]).input_ids) for p in prompts}


def prefill_key(plan: PrefillPlan) -> tuple[Hashable, int]:
    """(key, padded tokens) of a Prefill: requests of one padded width merge."""
    rows, width = plan.input_ids.shape
    return ("prefill", width), rows * width


def hint_key(participant: Participant, work: HintWork) -> tuple[Hashable | None, int]:
    """(key, tokens) of a Hint: prompts of one chat length and one ``max_new_tokens`` merge (else None: alone)."""
    lengths = chat_lengths(participant, work.prompts)
    if len(lengths) != 1:
        return None, 0
    (length,) = lengths
    return ("hint", length, work.max_new_tokens), len(work.prompts) * (length + work.max_new_tokens)


def rephrase_key(rephraser: Rephraser, work: RephraseWork) -> tuple[Hashable | None, int]:
    """(key, tokens) of a Rephrase: rephrasing prompts of one chat length and the same variant merge."""
    config = rephraser.config
    lengths = chat_lengths(rephraser.participant, [config.template.format(query=q) for q in work.queries])
    if len(lengths) != 1:
        return None, 0
    (length,) = lengths
    return ("rephrase", length, work.variant), len(work.queries) * (length + config.max_new_tokens)


class ModelCalls:
    """Runs merged requests (one kind each) on ``participant``; the :class:`~fedrefine.runtime.batcher.Batcher`'s
    ``run``."""

    def __init__(self, participant: Participant, rephraser: Rephraser | None = None) -> None:
        self.participant, self.rephraser = participant, rephraser

    def __call__(self, key: Hashable | None, payloads: Sequence) -> list:
        kind = type(payloads[0])
        if any(type(p) is not kind for p in payloads):
            raise TypeError(f"a merged call mixes request kinds ({sorted({type(p).__name__ for p in payloads})})")
        with torch.no_grad():
            if kind is PrefillPlan:
                return self.prefill(payloads)
            if kind is HintWork:
                return self.hints(payloads)
            if kind is RephraseWork:
                return self.rephrase(payloads)
        raise TypeError(f"no model call for {kind.__name__}")

    def prefill(self, plans: Sequence[PrefillPlan]) -> list[tuple[bytes, float, float]]:
        """(message bytes, forward seconds, encode seconds) per plan: one forward pass over every plan's rows
        (B_total, width), then each plan's message encoded with its codec (here: in the model thread, one after
        another, rather than in each caller's thread at once, where they would contend for the GIL)."""
        encoded = []
        for message, seconds in self.messages(plans):
            start = time.perf_counter()
            data = serialize_message(message, plans[len(encoded)].codec)
            encoded.append((data, seconds, time.perf_counter() - start))
        return encoded

    def messages(self, plans: Sequence[PrefillPlan]) -> list[tuple[KVMessage, float]]:
        """(message, forward seconds) per plan: one forward pass over every plan's rows (B_total, width)."""
        device = self.participant.device
        input_ids = torch.cat([p.input_ids for p in plans]).to(device)  # (B_total, width)
        attention_mask = torch.cat([p.attention_mask for p in plans]).to(device)  # (B_total, width)
        layers = list(plans[0].layers) if len(plans) == 1 else sorted({j for p in plans for j in p.layers})
        start = time.perf_counter()
        merged = prefill_message(self.participant, input_ids, attention_mask, layers)
        seconds = time.perf_counter() - start
        messages, first = [], 0
        for plan in plans:
            rows = slice(first, first + plan.input_ids.shape[0])
            first = rows.stop
            messages.append((KVMessage(
                sender=merged.sender,
                layers={j: (merged.layers[j][0][rows], merged.layers[j][1][rows]) for j in plan.layers},
                positions=merged.positions[rows],
                attention_mask=merged.attention_mask[rows],
                sent=None if plan.sent is None else plan.sent.to(device),
            ), seconds))
        return messages

    def hints(self, works: Sequence[HintWork]) -> list[list[Reply]]:
        """Each request's greedy replies; merged requests share one generation (their prompts are one length)."""
        prompts = [p for w in works for p in w.prompts]
        batch_size = works[0].batch_size if len(works) == 1 else len(prompts)
        replies = generate_replies(self.participant, prompts, works[0].max_new_tokens, batch_size)
        return split(replies, [len(w.prompts) for w in works])

    def rephrase(self, works: Sequence[RephraseWork]) -> list[list[Rephrasing]]:
        """Each request's rephrasings; merged requests (same variant) share one call of the rephraser."""
        if self.rephraser is None:
            raise RuntimeError("this participant does not offer rephrasing")
        found = self.rephraser.rephrase([q for w in works for q in w.queries], works[0].variant)
        return split(found, [len(w.queries) for w in works])


def split(items: Sequence, counts: Sequence[int]) -> list[list]:
    """``items`` cut into consecutive runs of ``counts``."""
    out, first = [], 0
    for count in counts:
        out.append(list(items[first : first + count]))
        first += count
    return out

