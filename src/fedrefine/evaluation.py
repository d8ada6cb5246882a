"""Multiple-choice evaluation routes: receiver alone, a sender alone, C2C and T2T with any sender subset.

Route names:

- ``receiver``: the receiver alone;
- ``sender`` / ``sender:<name>``: a sender alone (the only sender, or the named one);
- ``c2c`` / ``c2c:<a>+<b>``: the receiver fused with every sender, or with the named subset;
- ``c2c:auto``: per question, the senders a :class:`~fedrefine.selection.SenderSelection` picks;
- ``t2t`` / ``t2t:<a>+<b>``: the senders write hints (text) that the receiver reads;
- a C2C route with a control suffix: ``_mismatched`` (senders read another question whose correct
  letter differs), ``_random_kv`` (Gaussian K/V of each layer's own mean and std stand in for the
  senders'), ``_reordered`` (senders read the same question with the options reordered);
- a query-mode suffix ``@shared`` / ``@private`` (default ``@original``) on receiver, c2c and t2t
  routes: who reads a rephrasing (see :mod:`fedrefine.privacy`).

Every question counts: a question that cannot be encoded is predicted as -1 (wrong) and its
reason is reported; the denominator never shrinks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
from fedrefine.multiple_choice import (
    AnswerStyle,
    MultipleChoiceItem,
    continuation_scores,
    encode_question,
    extract_choice,
    option_logits,
    question_messages,
    with_answer_prefill,
)
from fedrefine.participants import Participant
from fedrefine.privacy import (
    MODES,
    QueryPlan,
    RephraseConfig,
    Rephraser,
    check_mode,
    leakage_report,
    plan_queries,
)
from fedrefine.selection import SenderSelection
from fedrefine.t2t import T2TConfig, t2t_predict

#: ``logits``: argmax of the next-token logits over the option letters; ``cloze``: argmax of each
#: option text's mean log-probability after "The correct answer is" (lm-eval-harness style);
#: ``generate``: greedy generation and answer extraction.
AnswerMode = Literal["logits", "cloze", "generate"]
CONTROLS = {"_mismatched": "mismatched", "_random_kv": "random_kv", "_reordered": "reordered"}
#: T2T senders read the question without its options, as in the C2C reference's baseline.
T2T_OPTIONS = "withhold"


@dataclass(frozen=True)
class Route:
    """What answers: ``kind``, which senders, which control (``none``), and the query mode."""

    name: str
    kind: Literal["receiver", "sender", "c2c", "t2t"]
    senders: tuple[str, ...] = ()
    control: str = "none"
    auto: bool = False
    query_mode: str = "original"

    @property
    def sender_text(self) -> str:
        """Which question the senders read: the item itself, a mismatched one, or the reordered item."""
        return {"mismatched": "mismatched", "reordered": "reordered"}.get(self.control, "item")

    @property
    def variant(self) -> str:
        """Key of the encoded batch this route reads."""
        return f"{self.sender_text}@{self.query_mode}"


def parse_route(name: str, sender_names: Sequence[str]) -> Route:
    """Parse a route name (see the module docstring) against the receiver's senders."""
    base, _, query_mode = name.partition("@")
    query_mode = query_mode or "original"
    control = "none"
    for suffix, value in CONTROLS.items():
        if base.endswith(suffix):
            base, control = base[: -len(suffix)], value
    kind, _, listed = base.partition(":")
    auto = kind == "c2c" and listed == "auto"
    chosen = tuple(listed.split("+")) if listed and not auto else ()
    unknown = [s for s in chosen if s not in sender_names]
    if (
        kind not in ("receiver", "sender", "c2c", "t2t")
        or unknown
        or (control != "none" and kind != "c2c")
        or query_mode not in MODES
        or (query_mode != "original" and (kind == "sender" or control != "none" or auto))
    ):
        raise ValueError(
            f"Unknown route {name!r}: use receiver, sender[:NAME], c2c[:A+B|:auto], t2t[:A+B] (+ _mismatched/"
            f"_random_kv/_reordered for c2c) and @original/@shared/@private; senders here are {list(sender_names)}."
        )
    if kind == "sender":
        if not chosen and len(sender_names) != 1:
            raise ValueError(f"Route 'sender' is ambiguous with senders {list(sender_names)}; use 'sender:NAME'.")
        chosen = chosen or tuple(sender_names)
        if len(chosen) != 1:
            raise ValueError(f"Route {name!r}: a sender alone is one sender.")
    if kind in ("c2c", "t2t"):
        chosen = chosen or tuple(sender_names)
    return Route(name, kind, chosen, control, auto, query_mode)


@dataclass
class EvaluationConfig:
    """How ``validate`` / ``test`` answer and what they report.

    Args:
        answer_mode: ``logits`` (argmax over option letters, deterministic), ``cloze`` (option texts'
            likelihood, deterministic) or ``generate`` (greedy + extractor).
        max_new_tokens: generation budget in ``generate`` mode and for ``predict``.
        test_routes: routes ``test`` reports (None: the module's default).
        val_routes: routes evaluated during ``fit`` validation and ``validate``.
        t2t: the T2T baseline's prompt, token budget and byte accounting.
        rephrase: how the receiver rephrases queries for ``@shared`` / ``@private`` routes.
        rephrase_cache_dir: disk cache of rephrasings (None: not cached across runs).
        options: what C2C senders get of a question's options in rephrased modes:
            ``verbatim`` (default; residual fusion needs it), ``rephrase`` or ``withhold``.
        prefill_answer: C2C senders read the answer prefix (``The correct answer is``) too, as an
            assistant prefill, so their cache holds what they would answer (``logits``/``cloze`` only;
            train the fuser the same way with the data module's ``response_prefill``). The receiver's
            prompt is the same either way.
    """

    answer_mode: AnswerMode = "logits"
    max_new_tokens: int = 64
    test_routes: list[str] | None = None
    val_routes: list[str] = field(default_factory=lambda: ["c2c"])
    t2t: T2TConfig = field(default_factory=T2TConfig)
    rephrase: RephraseConfig = field(default_factory=RephraseConfig)
    rephrase_cache_dir: str | None = None
    options: str = "verbatim"
    prefill_answer: bool = False

    def __post_init__(self) -> None:
        if self.prefill_answer and self.answer_mode == "generate":
            raise ValueError("evaluation.prefill_answer needs answer_mode 'logits' or 'cloze' (a scored answer prefix).")


@dataclass
class QueryPlanner:
    """Makes each question's :class:`~fedrefine.privacy.QueryPlan` for a query mode (who reads what).

    Args:
        rephraser: writes the rephrasings (``shared`` / ``private`` modes); the receiver by default.
        options: options policy for C2C senders (T2T senders always get :data:`T2T_OPTIONS`).
    """

    rephraser: Rephraser | None = None
    options: str = "verbatim"

    def plan(
        self, items: Sequence[MultipleChoiceItem], senders: Sequence[str], mode: str, options: str, style: str = "letter"
    ) -> list[QueryPlan]:
        return plan_queries(items, senders, mode, self.rephraser, options, style=style)


@dataclass
class QuestionBatch:
    """Encoded questions; rows that failed to encode are kept with their reason."""

    ids: list[str]
    labels: Tensor
    option_labels: list[tuple[str, ...]]
    failures: dict[int, str] = field(default_factory=dict)
    encoded_rows: list[int] = field(default_factory=list)
    items: list[MultipleChoiceItem] = field(default_factory=list)
    receiver_options: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)
    fusion: dict[str, FusionBatch] = field(default_factory=dict)
    alone: dict[str, tuple[Tensor, Tensor, list[tuple[int, ...]]]] = field(default_factory=dict)
    plans: dict[tuple[str, str], list[QueryPlan]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str) -> QuestionBatch:
        self.labels = self.labels.to(device)
        self.fusion = {name: batch.to(device) for name, batch in self.fusion.items()}
        self.alone = {name: (ids.to(device), mask.to(device), o) for name, (ids, mask, o) in self.alone.items()}
        return self


def answer_style(mode: AnswerMode) -> AnswerStyle:
    """How the prompt asks to answer: by the option's text for cloze scoring, else by letter."""
    return "text" if mode == "cloze" else "letter"


def _encode(
    participant: Participant, item: MultipleChoiceItem, mode: AnswerMode, prefill: bool = False
) -> tuple[EncodedChat, tuple]:
    """The prompt and how options are scored: letter token ids (logits), continuations (cloze), nothing (generate)."""
    if mode == "generate":
        return encode_chat(participant, question_messages(item)), ()
    encoded = encode_question(participant, item, answer_style(mode), prefill)
    return encoded.chat, encoded.option_token_ids if mode == "logits" else encoded.continuations


def _route_options(route: Route, planner: QueryPlanner) -> str:
    return T2T_OPTIONS if route.kind == "t2t" else planner.options


def encode_questions(
    model: FusedReceiver,
    questions: Sequence[QuestionWithControls],
    routes: Sequence[Route],
    mode: AnswerMode = "logits",
    planner: QueryPlanner | None = None,
    prefill: bool = False,
) -> QuestionBatch:
    """Encode a batch of questions for every route: one encoded batch per (sender text, query mode).

    ``prefill``: C2C senders also read the answer prefix (see ``EvaluationConfig.prefill_answer``).
    """
    planner = planner or QueryPlanner()
    items = [q.item for q in questions]
    batch = QuestionBatch(
        ids=[item.id for item in items],
        labels=torch.tensor([item.answer_index for item in items]),
        option_labels=[item.labels for item in items],
    )
    plan_keys = {(r.query_mode, _route_options(r, planner)) for r in routes if r.query_mode != "original" or r.kind == "t2t"}
    for route in routes:
        if route.kind in ("c2c", "t2t"):
            check_mode(route.query_mode, "t2t" if route.kind == "t2t" else f"c2c_{model.mode}", _route_options(route, planner))
    plan_senders = sorted({s for r in routes if r.kind in ("c2c", "t2t") for s in r.senders})
    style = answer_style(mode)
    plans = {key: planner.plan(items, plan_senders, *key, style=style) for key in sorted(plan_keys)}
    variants: dict[str, set[str]] = {}
    for route in routes:  # the receiver-alone route reads the receiver side of a variant
        if route.kind in ("receiver", "c2c"):
            variants.setdefault(route.variant, set()).update(route.senders if route.kind == "c2c" else ())
    alone = sorted({r.senders[0] for r in routes if r.kind == "sender"})
    examples: dict[str, list] = {v: [] for v in variants}
    options: dict[str, list] = {}
    alone_rows: dict[str, list] = {name: [] for name in alone}
    for row, question in enumerate(questions):
        try:
            encoded, row_options = {}, {}
            for variant, names in variants.items():
                sender_text, query_mode = variant.split("@")
                plan = plans[(query_mode, planner.options)][row] if query_mode != "original" else None
                receiver_item = plan.receiver_item if plan else question.item
                receiver_chat, row_options[query_mode] = _encode(model.receiver, receiver_item, mode, prefill)
                chats = {
                    n: encode_chat(
                        model.senders[n],
                        with_answer_prefill(plan.sender_messages(n), prefill)
                        if plan
                        else question_messages(getattr(question, sender_text), style, prefill),
                    )
                    for n in sorted(names)
                }
                encoded[variant] = model.encode_chats(receiver_chat, chats, strict=sender_text == "item")
            if "original" not in row_options:
                row_options["original"] = _encode(model.receiver, question.item, mode)[1]
            singles = {name: _encode(model.senders[name], question.item, mode) for name in alone}
        except (ValueError, KeyError, IndexError) as err:
            batch.failures[row] = f"{type(err).__name__}: {err}"
            continue
        batch.encoded_rows.append(row)
        batch.items.append(question.item)
        for query_mode, option_ids in row_options.items():
            options.setdefault(query_mode, []).append(option_ids)
        for variant in variants:
            examples[variant].append(encoded[variant])
        for name, (chat, sender_options) in singles.items():
            alone_rows[name].append((chat.input_ids, sender_options))
    if batch.encoded_rows:
        batch.receiver_options = options
        batch.fusion = {v: model.collate(examples[v]) for v in variants}
        batch.plans = {key: [value[row] for row in batch.encoded_rows] for key, value in plans.items()}
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
    """One route on one batch.

    ``predictions``: option index per question (-1 = wrong/unanswerable); ``seconds``: wall time;
    ``stages``: seconds per stage (``rephrase``, ``sender``, ``fuse``, ``receiver``; ``fuse`` is
    the time inside fusers and the gating network, taken out of the receiver's); ``bytes_sent``:
    exact bytes the senders transmitted (C2C: K/V of the carried layers at real positions; T2T:
    token ids); ``bytes_per_token``: bytes per transmitted token position, summed over senders
    (``sender_bytes_per_token``: the same per sender);
    ``selected``: for ``c2c:auto``, the senders chosen per encoded question; ``leakage``: for
    rephrased modes, the mean share of the question's content words that reached senders.
    """

    predictions: Tensor
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_per_token: float = 0.0
    sender_bytes_per_token: dict[str, float] = field(default_factory=dict)
    selected: list[tuple[str, ...]] | None = None
    leakage: float | None = None


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy (well-behaved at 0% and 100% and for small counts)."""
    if total == 0:
        return 0.0, 0.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * ((p * (1 - p) / total + z * z / (4 * total * total)) ** 0.5) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class RouteTally:
    """A route's results accumulated over batches (every question counts, failures as wrong)."""

    correct: int = 0
    questions: int = 0
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_per_token: float = 0.0
    sender_bytes_per_token: dict[str, float] = field(default_factory=dict)
    leakage_sum: float = 0.0
    leakage_batches: int = 0

    def add(self, result: RouteResult, labels: Tensor) -> None:
        self.correct += int((result.predictions == labels).sum())
        self.questions += len(labels)
        self.seconds += result.seconds
        for stage, seconds in result.stages.items():
            self.stages[stage] = self.stages.get(stage, 0.0) + seconds
        self.bytes_sent += result.bytes_sent
        self.bytes_per_token = max(self.bytes_per_token, result.bytes_per_token)
        for sender, value in result.sender_bytes_per_token.items():
            self.sender_bytes_per_token[sender] = max(self.sender_bytes_per_token.get(sender, 0.0), value)
        if result.leakage is not None:
            self.leakage_sum += result.leakage
            self.leakage_batches += 1

    def row(self) -> dict[str, float | int | None]:
        """Accuracy with its 95% interval, latency per question (total and per stage), bytes, leakage."""
        n = max(1, self.questions)
        low, high = wilson_interval(self.correct, self.questions)
        return {
            "accuracy": self.correct / n,
            "ci_low": low,
            "ci_high": high,
            "questions": self.questions,
            "latency_ms": 1000 * self.seconds / n,
            **{f"{stage}_ms": 1000 * seconds / n for stage, seconds in sorted(self.stages.items())},
            "bytes_per_token": self.bytes_per_token,
            "bytes_per_question": self.bytes_sent / n,
            "sender_bytes_per_token": dict(self.sender_bytes_per_token),
            "leakage_overlap": self.leakage_sum / self.leakage_batches if self.leakage_batches else None,
        }


def _timed(device: torch.device, fn):
    synchronize(device)
    start = time.perf_counter()
    value = fn()
    synchronize(device)
    return value, time.perf_counter() - start


@contextmanager
def time_inside(modules: Sequence[torch.nn.Module], device: torch.device) -> Iterator[list[float]]:
    """Accumulate the wall time spent inside ``modules``' forward calls (into the yielded one-element list)."""
    spent, started = [0.0], {}

    def before(module, args):
        synchronize(device)
        started[id(module)] = time.perf_counter()

    def after(module, args, output):
        synchronize(device)
        spent[0] += time.perf_counter() - started.pop(id(module))

    handles = [h for m in modules for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        yield spent
    finally:
        for handle in handles:
            handle.remove()


def run_route(
    model: FusedReceiver,
    batch: QuestionBatch,
    route: Route,
    mode: AnswerMode = "logits",
    max_new_tokens: int = 64,
    generator: torch.Generator | None = None,
    selection: SenderSelection | None = None,
    planner: QueryPlanner | None = None,
    t2t: T2TConfig | None = None,
) -> RouteResult:
    """Answer every encodable question of the batch by one route."""
    device = batch.labels.device
    predictions = torch.full((len(batch),), -1, dtype=torch.long, device=device)
    if not batch.encoded_rows:
        return RouteResult(predictions, 0.0)
    planner = planner or QueryPlanner()
    result = RouteResult(predictions, 0.0)
    plans = batch.plans.get((route.query_mode, _route_options(route, planner)))
    if plans is not None and route.query_mode != "original":
        rephrasings = {id(r): r for p in plans for r in p.rephrasings.values()}
        result.stages["rephrase"] = sum(r.seconds for r in rephrasings.values())
        result.leakage = leakage_report(plans)[1].mean_token_overlap
    if route.kind == "t2t":
        chosen = _answer_t2t(model, route, plans, result, t2t)
    elif route.auto:
        chosen = _answer_auto(model, batch, selection, result, mode)
    elif route.kind == "sender":
        chosen, result.stages["sender"] = _timed(
            device, lambda: _answer_alone(model.senders[route.senders[0]], batch, route.senders[0], mode, max_new_tokens)
        )
    else:
        chosen = _answer_fused(model, batch, route, mode, max_new_tokens, generator, result)
    predictions[torch.tensor(batch.encoded_rows, device=device)] = chosen.to(device)
    result.seconds = sum(result.stages.values())
    return result


def _send(model: FusedReceiver, fusion: FusionBatch, senders: Sequence[str], result: RouteResult) -> dict[str, KVMessage]:
    """Every selected sender's prefill, timed and its bytes counted."""
    device = fusion.receiver_input_ids.device
    messages, result.stages["sender"] = _timed(
        device, lambda: {n: m for n in senders if (m := model.send(n, fusion.senders[n])) is not None}
    )
    result.bytes_sent += sum(m.nbytes for m in messages.values())
    result.sender_bytes_per_token = {n: float(m.bytes_per_token) for n, m in messages.items()}
    result.bytes_per_token += sum(result.sender_bytes_per_token.values())
    return messages


def _choose(model: FusedReceiver, fusion: FusionBatch, senders, messages, options, mode: AnswerMode) -> Tensor:
    """Option chosen per row by the (fused) receiver, scored by letter logits or by cloze likelihood."""
    with torch.no_grad():
        if mode == "logits":
            logits = model(fusion, senders=senders, messages=messages)[:, 0].float()
            return option_logits(logits, options).argmax(-1).cpu()

        def forward(response_ids: Tensor, response_mask: Tensor) -> Tensor:
            device = fusion.receiver_input_ids.device
            scored = dataclasses.replace(fusion, response_ids=response_ids.to(device), response_mask=response_mask.to(device))
            return model(scored, senders=senders, messages=messages)

        return continuation_scores(forward, options, model.receiver.tokenizer.pad_token_id).argmax(-1)


def _answer_fused(model, batch, route, mode, max_new_tokens, generator, result) -> Tensor:
    fusion = batch.fusion[route.variant]
    options = batch.receiver_options[route.query_mode]
    senders = list(route.senders) if route.kind == "c2c" else []
    messages = _send(model, fusion, senders, result) if senders else {}
    if route.control == "random_kv":
        messages = {n: random_message_like(m, generator) for n, m in messages.items()}
    device = fusion.receiver_input_ids.device
    fusing = [*model.fusers, *([model.source_gate] if model.source_gate is not None else [])]
    with time_inside(fusing, device) as fuse_seconds:
        if mode != "generate":
            chosen, seconds = _timed(device, lambda: _choose(model, fusion, list(messages), messages, options, mode))
        else:
            generated, seconds = _timed(
                device, lambda: model.generate(fusion, max_new_tokens, senders=list(messages), messages=messages)
            )
            texts = model.receiver.tokenizer.batch_decode(generated, skip_special_tokens=True)
            chosen = _extract(texts, batch)
    if messages:
        result.stages["fuse"] = fuse_seconds[0]
    result.stages["receiver"] = seconds - fuse_seconds[0]
    return chosen


def _answer_auto(
    model: FusedReceiver, batch: QuestionBatch, selection: SenderSelection | None, result, mode: AnswerMode
) -> Tensor:
    if selection is None:
        raise ValueError("Route 'c2c:auto' needs a sender selection (model.selection or measure_selection).")
    result.selected = [tuple(selection.select(item)) for item in batch.items]
    fusion, options = batch.fusion["item@original"], batch.receiver_options["original"]
    chosen = torch.empty(len(result.selected), dtype=torch.long)
    start = time.perf_counter()
    for subset in sorted(set(result.selected)):
        rows = [i for i, s in enumerate(result.selected) if s == subset]
        chosen[rows] = _choose(model, fusion.select(rows), list(subset), None, [options[i] for i in rows], mode)
    result.stages["receiver"] = time.perf_counter() - start
    return chosen


def _answer_t2t(model: FusedReceiver, route: Route, plans: list[QueryPlan], result, config: T2TConfig | None) -> Tensor:
    senders = [model.senders[n] for n in route.senders]
    answers = t2t_predict(
        model.receiver,
        senders,
        [p.receiver_item for p in plans],
        config,
        sender_questions={model.senders[n].name: [p.sender_texts[n] for p in plans] for n in route.senders},
        style=plans[0].style if plans else "letter",
    )
    for answer in answers:
        for stage, seconds in answer.seconds.items():
            key = "sender" if stage.startswith("sender:") else stage
            result.stages[key] = result.stages.get(key, 0.0) + seconds
        result.bytes_sent += answer.id_bytes
    result.bytes_per_token = float(sum((config or T2TConfig()).bytes_per_id for _ in senders))
    return torch.tensor([a.prediction for a in answers])


@torch.no_grad()
def _answer_alone(
    sender: Participant, batch: QuestionBatch, name: str, mode: AnswerMode, max_new_tokens: int
) -> Tensor:
    ids, mask, options = batch.alone[name]
    if mode == "logits":
        logits = sender.model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        return option_logits(logits[:, -1].float(), options).argmax(-1)
    if mode == "cloze":

        def forward(response_ids: Tensor, response_mask: Tensor) -> Tensor:
            full_mask = torch.cat((mask, response_mask.to(mask.device)), 1)
            return sender.model(
                input_ids=torch.cat((ids, response_ids.to(ids.device)), 1),
                attention_mask=full_mask,
                position_ids=positions_from_mask(full_mask),
                logits_to_keep=response_ids.shape[1] + 1,
            ).logits

        return continuation_scores(forward, options, sender.tokenizer.pad_token_id).argmax(-1)
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
