"""Multiple-choice evaluation routes: receiver alone, a sender alone, C2C with any sender subset, controls.

Route names:

- ``receiver``: the receiver alone;
- ``sender`` / ``sender:<name>``: a sender alone (the only sender, or the named one);
- ``c2c`` / ``c2c:<a>+<b>``: the receiver fused with every sender, or with the named subset;
- ``c2c:auto``: per question, the senders a :class:`~fedrefine.selection.SenderSelection` picks;
- a C2C route with a control suffix: ``_mismatched`` (senders read another question whose correct
  letter differs), ``_random_kv`` (Gaussian K/V of each layer's own mean and std stand in for the
  senders'), ``_reordered`` (senders read the same question with the options reordered).

Every question counts: a question that cannot be encoded is predicted as -1 (wrong) and its
reason is reported; the denominator never shrinks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from fedrefine.batching import FusionBatch, left_pad
from fedrefine.cache import positions_from_mask
from fedrefine.chat import EncodedChat, encode_chat
from fedrefine.data.multiple_choice import QuestionWithControls
from fedrefine.fusion import FusedReceiver
from fedrefine.generation import synchronize
from fedrefine.message import KVMessage
from fedrefine.multiple_choice import MultipleChoiceItem, encode_question, extract_choice, option_logits, question_messages
from fedrefine.participants import Participant
from fedrefine.selection import SenderSelection

AnswerMode = Literal["logits", "generate"]
CONTROLS = {"_mismatched": "mismatched", "_random_kv": "random_kv", "_reordered": "reordered"}
ROUTES = ("receiver", "sender", "c2c", "c2c_mismatched", "c2c_random_kv", "c2c_reordered")


@dataclass(frozen=True)
class Route:
    """What answers: ``kind`` receiver / sender / c2c, which senders, and which control (``none``)."""

    name: str
    kind: Literal["receiver", "sender", "c2c"]
    senders: tuple[str, ...] = ()
    control: str = "none"
    auto: bool = False

    @property
    def sender_text(self) -> str:
        """Which question the senders read: the item itself, a mismatched one, or the reordered item."""
        return {"mismatched": "mismatched", "reordered": "reordered"}.get(self.control, "item")


def parse_route(name: str, sender_names: Sequence[str]) -> Route:
    """Parse a route name (see the module docstring) against the receiver's senders."""
    base, control = name, "none"
    for suffix, value in CONTROLS.items():
        if name.endswith(suffix):
            base, control = name[: -len(suffix)], value
    kind, _, listed = base.partition(":")
    auto = kind == "c2c" and listed == "auto"
    chosen = tuple(listed.split("+")) if listed and not auto else ()
    unknown = [s for s in chosen if s not in sender_names]
    if kind not in ("receiver", "sender", "c2c") or unknown or (control != "none" and kind != "c2c"):
        raise ValueError(
            f"Unknown route {name!r}: use receiver, sender[:NAME], c2c[:A+B] (+ _mismatched/_random_kv/_reordered "
            f"for c2c); senders here are {list(sender_names)}."
        )
    if kind == "sender":
        if not chosen and len(sender_names) != 1:
            raise ValueError(f"Route 'sender' is ambiguous with senders {list(sender_names)}; use 'sender:NAME'.")
        chosen = chosen or tuple(sender_names)
        if len(chosen) != 1:
            raise ValueError(f"Route {name!r}: a sender alone is one sender.")
    if kind == "c2c":
        chosen = chosen or tuple(sender_names)
    return Route(name, kind, chosen, control, auto)


@dataclass
class QuestionBatch:
    """Encoded questions; rows that failed to encode are kept with their reason."""

    ids: list[str]
    labels: Tensor
    option_labels: list[tuple[str, ...]]
    failures: dict[int, str] = field(default_factory=dict)
    encoded_rows: list[int] = field(default_factory=list)
    items: list[MultipleChoiceItem] = field(default_factory=list)
    receiver_options: list[tuple[int, ...]] = field(default_factory=list)
    fusion: dict[str, FusionBatch] = field(default_factory=dict)
    alone: dict[str, tuple[Tensor, Tensor, list[tuple[int, ...]]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str) -> QuestionBatch:
        self.labels = self.labels.to(device)
        self.fusion = {name: batch.to(device) for name, batch in self.fusion.items()}
        self.alone = {name: (ids.to(device), mask.to(device), o) for name, (ids, mask, o) in self.alone.items()}
        return self


def _encode(participant: Participant, item: MultipleChoiceItem, mode: AnswerMode) -> tuple[EncodedChat, tuple[int, ...]]:
    if mode == "logits":
        encoded = encode_question(participant, item)
        return encoded.chat, encoded.option_token_ids
    return encode_chat(participant, question_messages(item)), ()


def encode_questions(
    model: FusedReceiver, questions: Sequence[QuestionWithControls], routes: Sequence[Route], mode: AnswerMode = "logits"
) -> QuestionBatch:
    """Encode a batch of questions for every route (one sender text per control variant)."""
    items = [q.item for q in questions]
    batch = QuestionBatch(
        ids=[item.id for item in items],
        labels=torch.tensor([item.answer_index for item in items]),
        option_labels=[item.labels for item in items],
    )
    fused = [r for r in routes if r.kind != "sender"]
    variants: dict[str, set[str]] = {}
    for route in fused:  # the receiver-alone route reads the receiver side of the "item" variant
        variants.setdefault(route.sender_text, set()).update(route.senders)
    alone = sorted({r.senders[0] for r in routes if r.kind == "sender"})
    examples: dict[str, list] = {v: [] for v in variants}
    alone_rows: dict[str, list] = {name: [] for name in alone}
    for row, question in enumerate(questions):
        try:
            receiver_chat, options = _encode(model.receiver, question.item, mode)
            encoded = {}
            for variant, names in variants.items():
                chats = {n: _encode(model.senders[n], getattr(question, variant), mode)[0] for n in sorted(names)}
                encoded[variant] = model.encode_chats(receiver_chat, chats, strict=variant == "item")
            singles = {name: _encode(model.senders[name], question.item, mode) for name in alone}
        except (ValueError, KeyError, IndexError) as err:
            batch.failures[row] = f"{type(err).__name__}: {err}"
            continue
        batch.encoded_rows.append(row)
        batch.items.append(question.item)
        batch.receiver_options.append(options)
        for variant in variants:
            examples[variant].append(encoded[variant])
        for name, (chat, sender_options) in singles.items():
            alone_rows[name].append((chat.input_ids, sender_options))
    if batch.encoded_rows:
        batch.fusion = {v: model.collate(examples[v]) for v in variants}
        for name, rows in alone_rows.items():
            ids, mask = left_pad([r[0] for r in rows], model.senders[name].tokenizer.pad_token_id)
            batch.alone[name] = (ids, mask, [r[1] for r in rows])
    return batch


def random_message_like(message: KVMessage, generator: torch.Generator | None = None) -> KVMessage:
    """A message of the same shape whose K/V are Gaussian with each layer's own mean and std."""
    layers = {}
    for j, (keys, values) in message.layers.items():
        fake = []
        for states in (keys, values):
            noise = torch.randn(states.shape, generator=generator, dtype=torch.float32).to(states.device)
            fake.append((noise * states.float().std() + states.float().mean()).to(states.dtype))
        layers[j] = (fake[0], fake[1])
    return KVMessage(message.sender, layers, message.positions, message.attention_mask)


@dataclass
class RouteResult:
    """Predicted option index per question of the batch (-1 = wrong/unanswerable), seconds spent, and
    for ``c2c:auto`` the senders chosen per encoded question."""

    predictions: Tensor
    seconds: float
    selected: list[tuple[str, ...]] | None = None


def run_route(
    model: FusedReceiver,
    batch: QuestionBatch,
    route: Route,
    mode: AnswerMode = "logits",
    max_new_tokens: int = 64,
    generator: torch.Generator | None = None,
    selection: SenderSelection | None = None,
) -> RouteResult:
    """Answer every encodable question of the batch by one route."""
    device = batch.labels.device
    predictions = torch.full((len(batch),), -1, dtype=torch.long, device=device)
    if not batch.encoded_rows:
        return RouteResult(predictions, 0.0)
    synchronize(device)
    start = time.perf_counter()
    selected = None
    if route.auto:
        if selection is None:
            raise ValueError("Route 'c2c:auto' needs a sender selection (model.selection or measure_selection).")
        selected = [tuple(selection.select(item)) for item in batch.items]
        chosen = torch.empty(len(selected), dtype=torch.long, device=device)
        for subset in sorted(set(selected)):
            rows = [i for i, s in enumerate(selected) if s == subset]
            with torch.no_grad():
                logits = model(batch.fusion["item"].select(rows), senders=list(subset))[:, 0].float()
            chosen[rows] = option_logits(logits, [batch.receiver_options[i] for i in rows]).argmax(-1)
    elif route.kind == "sender":
        chosen = _answer_alone(model.senders[route.senders[0]], batch, route.senders[0], mode, max_new_tokens)
    else:
        fusion = batch.fusion[route.sender_text]
        senders = list(route.senders) if route.kind == "c2c" else []
        messages = None
        if route.control == "random_kv":
            real = {name: model.send(name, fusion.senders[name]) for name in senders}
            messages = {n: random_message_like(m, generator) for n, m in real.items() if m is not None}
        if mode == "logits":
            with torch.no_grad():
                logits = model(fusion, senders=senders, messages=messages)[:, 0].float()
            chosen = option_logits(logits, batch.receiver_options).argmax(-1)
        else:
            generated = model.generate(fusion, max_new_tokens, senders=senders, messages=messages)
            chosen = _extract(model.receiver.tokenizer.batch_decode(generated, skip_special_tokens=True), batch)
    synchronize(device)
    predictions[torch.tensor(batch.encoded_rows, device=device)] = chosen.to(device)
    return RouteResult(predictions, time.perf_counter() - start, selected)


@torch.no_grad()
def _answer_alone(
    sender: Participant, batch: QuestionBatch, name: str, mode: AnswerMode, max_new_tokens: int
) -> Tensor:
    ids, mask, options = batch.alone[name]
    if mode == "logits":
        logits = sender.model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        return option_logits(logits[:, -1].float(), options).argmax(-1)
    output = sender.model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=sender.tokenizer.pad_token_id,
        eos_token_id=sender.end_of_turn_token_id,
    )
    return _extract(sender.tokenizer.batch_decode(output[:, ids.shape[1] :], skip_special_tokens=True), batch)


def _extract(texts: Sequence[str], batch: QuestionBatch) -> Tensor:
    chosen = []
    for text, row in zip(texts, batch.encoded_rows):
        labels = batch.option_labels[row]
        letter = extract_choice(text, labels)
        chosen.append(labels.index(letter) if letter is not None else -1)
    return torch.tensor(chosen)
