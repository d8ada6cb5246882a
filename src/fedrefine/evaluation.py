"""Multiple-choice evaluation routes for one pair: receiver alone, sender alone, C2C and its controls.

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

from fedrefine.cache import positions_from_mask
from fedrefine.chat import encode_chat
from fedrefine.data.multiple_choice import QuestionWithControls
from fedrefine.message import KVMessage
from fedrefine.multiple_choice import (
    MultipleChoiceItem,
    encode_question,
    extract_choice,
    option_logits,
    question_messages,
)
from fedrefine.pair import C2CPair, PairBatch, left_pad, make_pair_example

AnswerMode = Literal["logits", "generate"]
#: Routes a test run can report. Controls: the sender reads another question (mismatched), random
#: K/V stands in for the sender's (random_kv), the sender reads the options reordered (reordered).
ROUTES = ("receiver", "sender", "c2c", "c2c_mismatched", "c2c_random_kv", "c2c_reordered")
_SENDER_TEXT = {"c2c": "item", "c2c_random_kv": "item", "c2c_mismatched": "mismatched", "c2c_reordered": "reordered"}


@dataclass
class QuestionBatch:
    """Encoded questions; rows that failed to encode are kept with their reason."""

    ids: list[str]
    labels: Tensor
    option_labels: list[tuple[str, ...]]
    failures: dict[int, str] = field(default_factory=dict)
    encoded_rows: list[int] = field(default_factory=list)
    receiver_options: list[tuple[int, ...]] = field(default_factory=list)
    sender_options: list[tuple[int, ...]] = field(default_factory=list)
    sender_alone: tuple[Tensor, Tensor] | None = None
    pairs: dict[str, PairBatch] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str) -> QuestionBatch:
        self.labels = self.labels.to(device)
        if self.sender_alone is not None:
            self.sender_alone = tuple(t.to(device) for t in self.sender_alone)
        self.pairs = {name: batch.to(device) for name, batch in self.pairs.items()}
        return self


def _encode_for(pair: C2CPair, participant_is_receiver: bool, item: MultipleChoiceItem, mode: AnswerMode):
    participant = pair.receiver if participant_is_receiver else pair.sender
    if mode == "logits":
        encoded = encode_question(participant, item)
        return encoded.chat, encoded.option_token_ids
    return encode_chat(participant, question_messages(item)), ()


def encode_questions(
    pair: C2CPair, questions: Sequence[QuestionWithControls], routes: Sequence[str], mode: AnswerMode = "logits"
) -> QuestionBatch:
    """Encode a batch of questions for the requested routes (one sender text variant per control)."""
    unknown = sorted(set(routes) - set(ROUTES))
    if unknown:
        raise ValueError(f"Unknown route(s) {unknown}; choose from {list(ROUTES)}.")
    items = [q.item for q in questions]
    batch = QuestionBatch(
        ids=[item.id for item in items],
        labels=torch.tensor([item.answer_index for item in items]),
        option_labels=[item.labels for item in items],
    )
    # The receiver-alone route reads the receiver side of the "item" variant.
    variants = sorted({_SENDER_TEXT.get(r, "item") for r in routes if r != "sender"})
    examples: dict[str, list] = {v: [] for v in variants}
    sender_rows: list[list[int]] = []
    for row, question in enumerate(questions):
        try:
            receiver_chat, receiver_options = _encode_for(pair, True, question.item, mode)
            sender_chats = {}
            for variant in {"item", *variants}:
                sender_chats[variant] = _encode_for(pair, False, getattr(question, variant), mode)
            encoded = {
                v: make_pair_example(receiver_chat, sender_chats[v][0], strict=(v == "item")) for v in variants
            }
        except (ValueError, KeyError, IndexError) as err:
            batch.failures[row] = f"{type(err).__name__}: {err}"
            continue
        batch.encoded_rows.append(row)
        batch.receiver_options.append(receiver_options)
        batch.sender_options.append(sender_chats["item"][1])
        sender_rows.append(sender_chats["item"][0].input_ids)
        for variant in variants:
            examples[variant].append(encoded[variant])
    if batch.encoded_rows:
        if "sender" in routes:
            batch.sender_alone = left_pad(sender_rows, pair.sender.tokenizer.pad_token_id)
        batch.pairs = {v: pair.collate(examples[v]) for v in variants}
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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class RouteResult:
    """Predicted option index per question of the batch (-1 = wrong/unanswerable) and seconds spent."""

    predictions: Tensor
    seconds: float


def run_route(
    pair: C2CPair,
    batch: QuestionBatch,
    route: str,
    mode: AnswerMode = "logits",
    max_new_tokens: int = 64,
    generator: torch.Generator | None = None,
) -> RouteResult:
    """Answer every encodable question of the batch by one route."""
    device = batch.labels.device
    predictions = torch.full((len(batch),), -1, dtype=torch.long, device=device)
    if not batch.encoded_rows:
        return RouteResult(predictions, 0.0)
    rows = torch.tensor(batch.encoded_rows, device=device)
    _synchronize(device)
    start = time.perf_counter()
    if route == "sender":
        chosen = _answer_alone(pair, batch, mode, max_new_tokens)
    else:
        variant = _SENDER_TEXT.get(route, "item")
        pair_batch = batch.pairs[variant]
        message = None
        if route == "c2c_random_kv":
            real = pair.send(pair_batch)
            message = None if real is None else random_message_like(real, generator)
        fuse = route != "receiver"
        if mode == "logits":
            logits = pair(pair_batch, fuse=fuse, message=message)[:, 0].float()
            chosen = option_logits(logits, batch.receiver_options).argmax(-1)
        else:
            generated = pair.generate(pair_batch, max_new_tokens, fuse=fuse, message=message)
            chosen = _extract(pair.receiver.tokenizer.batch_decode(generated), batch)
    _synchronize(device)
    predictions[rows] = chosen.to(device)
    return RouteResult(predictions, time.perf_counter() - start)


def _answer_alone(pair: C2CPair, batch: QuestionBatch, mode: AnswerMode, max_new_tokens: int) -> Tensor:
    ids, mask = batch.sender_alone
    model = pair.sender_model
    with torch.no_grad():
        if mode == "logits":
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
            return option_logits(logits[:, -1].float(), batch.sender_options).argmax(-1)
        eos = pair.sender.end_of_turn_token_id
        output = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pair.sender.tokenizer.pad_token_id, eos_token_id=eos,
        )
    texts = pair.sender.tokenizer.batch_decode(output[:, ids.shape[1] :], skip_special_tokens=True)
    return _extract(texts, batch)


def _extract(texts: Sequence[str], batch: QuestionBatch) -> Tensor:
    chosen = []
    for text, row in zip(texts, batch.encoded_rows):
        labels = batch.option_labels[row]
        letter = extract_choice(text, labels)
        chosen.append(labels.index(letter) if letter is not None else -1)
    return torch.tensor(chosen)

