"""Multiple-choice questions encoded for every route of an evaluation, in one typed batch.

A batch holds one :class:`~fedrefine.fusion.FusionBatch` per :class:`Variant` (which question the
senders read, in which query mode), each sender-alone route's own prompts, how each question's
options are scored, and the query plans (who reads what). Every question counts: a question that
cannot be encoded is kept with its reason and later predicted as -1 (wrong); the denominator
never shrinks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedrefine.data.question_dataset import QuestionWithControls
from fedrefine.evaluation.config import AnswerMode, answer_style, check_prompt_style
from fedrefine.fusion import FusedReceiver, FusionBatch, FusionExample
from fedrefine.participants import Participant
from fedrefine.participants.chat import EncodedChat, encode_chat
from fedrefine.participants.padding import left_pad
from fedrefine.privacy.plans import QueryPlan, plan_queries
from fedrefine.privacy.rephrase import Rephraser
from fedrefine.tasks.multiple_choice import (
    ClozeOptions,
    MultipleChoiceItem,
    PromptStyle,
    encode_question,
    question_messages,
    with_answer_prefill,
)
from fedrefine.tasks.routes import OptionsPolicy, QueryMode, Route, RouteError, SenderText

#: T2T senders read the question without its options, as in the C2C reference's baseline.
T2T_OPTIONS: OptionsPolicy = "withhold"
#: A question's plans are made per (query mode, options policy).
PlanKey = tuple[QueryMode, OptionsPolicy]
#: How one question's options are scored: first-token ids (logits), ClozeOptions (cloze), nothing (generate).
OptionIds = tuple | ClozeOptions


@dataclass(frozen=True)
class Variant:
    """Which encoded batch a route reads: the question its senders read, and the query mode."""

    sender_text: SenderText
    query_mode: QueryMode

    @classmethod
    def of(cls, route: Route) -> Variant:
        return cls(route.sender_text, route.query_mode)


@dataclass
class AloneBatch:
    """One sender's own left-padded prompts (B, N) for the sender-alone route, and its option ids per row."""

    input_ids: Tensor
    attention_mask: Tensor
    options: list[OptionIds]

    def to(self, device: torch.device | str) -> AloneBatch:
        return AloneBatch(self.input_ids.to(device), self.attention_mask.to(device), self.options)


@dataclass
class QuestionBatch:
    """Encoded questions; rows that failed to encode are kept with their reason (``failures``)."""

    ids: list[str]
    labels: Tensor  # (B,)
    option_labels: list[tuple[str, ...]]
    failures: dict[int, str] = field(default_factory=dict)
    encoded_rows: list[int] = field(default_factory=list)
    items: list[MultipleChoiceItem] = field(default_factory=list)
    receiver_options: dict[QueryMode, list[OptionIds]] = field(default_factory=dict)
    fusion: dict[Variant, FusionBatch] = field(default_factory=dict)
    alone: dict[str, AloneBatch] = field(default_factory=dict)
    plans: dict[PlanKey, list[QueryPlan]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def single(self, row: int) -> QuestionBatch:
        """A batch of the one encoded question at batch row ``row`` (to answer it alone)."""
        k = self.encoded_rows.index(row)
        return QuestionBatch(
            ids=[self.ids[row]],
            labels=self.labels[row : row + 1],
            option_labels=[self.option_labels[row]],
            encoded_rows=[0],
            items=[self.items[k]],
            receiver_options={mode: [options[k]] for mode, options in self.receiver_options.items()},
            fusion={variant: batch.select([k]) for variant, batch in self.fusion.items()},
            alone={name: AloneBatch(a.input_ids[k : k + 1], a.attention_mask[k : k + 1], [a.options[k]]) for name, a in self.alone.items()},
            plans={key: [plans[k]] for key, plans in self.plans.items()},
        )

    def to(self, device: torch.device | str) -> QuestionBatch:
        self.labels = self.labels.to(device)
        self.fusion = {variant: batch.to(device) for variant, batch in self.fusion.items()}
        self.alone = {name: batch.to(device) for name, batch in self.alone.items()}
        return self


@dataclass
class QueryPlanner:
    """Makes each question's :class:`~fedrefine.privacy.plans.QueryPlan` for a query mode (who reads what).

    Args:
        rephraser: writes the rephrasings (``shared`` / ``private`` modes); the receiver by default.
        options: options policy for C2C senders (T2T senders always get :data:`T2T_OPTIONS`).
    """

    rephraser: Rephraser | None = None
    options: OptionsPolicy = "verbatim"

    def route_options(self, route: Route) -> OptionsPolicy:
        """The options policy of a route's senders."""
        return T2T_OPTIONS if route.kind == "t2t" else self.options

    def plan(
        self, items: Sequence[MultipleChoiceItem], senders: Sequence[str], key: PlanKey, style: str = "letter"
    ) -> list[QueryPlan]:
        mode, options = key
        return plan_queries(items, senders, mode, self.rephraser, options, style=style)


def encode_for_scoring(
    participant: Participant,
    item: MultipleChoiceItem,
    mode: AnswerMode,
    prefill: bool = False,
    prompt_style: PromptStyle = "chat",
) -> tuple[EncodedChat, OptionIds]:
    """The prompt and how options are scored: letter token ids (logits), cloze options (cloze), nothing (generate)."""
    if mode == "generate":
        return encode_chat(participant, question_messages(item, prompt_style=prompt_style)), ()
    encoded = encode_question(participant, item, answer_style(mode), prefill, prompt_style)
    return encoded.chat, encoded.option_token_ids if mode == "logits" else encoded.cloze


def check_routes_for_prompt_style(routes: Sequence[Route], prompt_style: PromptStyle) -> None:
    """``lm_eval`` prompts (the bare stem) run the receiver and senders alone, on the original question;
    ``c2c_reference`` prompts (the C2C reference's protocol) add the c2c routes."""
    if prompt_style == "c2c_reference":
        refused = [r.label for r in routes if r.kind not in ("receiver", "sender", "c2c") or r.query_mode != "original"]
        if refused:
            raise RouteError(
                f"evaluation.prompt_style 'c2c_reference' mirrors the C2C reference's protocol: routes receiver, "
                f"sender:<name> and c2c on the original questions; drop {refused} or use prompt_style chat."
            )
        return
    refused = [r.label for r in routes if r.kind not in ("receiver", "sender") or r.query_mode != "original"]
    if prompt_style != "chat" and refused:
        raise RouteError(
            f"evaluation.prompt_style {prompt_style!r} (lm-eval's bare-stem prompt) runs a model alone on the "
            f"original question; route(s) {refused} need chat prompts (fusers are trained on them, senders and "
            f"rephrasings read chat-rendered questions). Evaluate routes 'receiver' and 'sender:<name>' "
            f"(test_routes / val_routes), or use evaluation.prompt_style chat."
        )


class QuestionEncoder:
    """Encodes batches of questions for a fused receiver and a fixed list of routes.

    Args:
        model: the receiver and its senders.
        routes: the routes the batches are answered by (resolved against the model's senders).
        mode: answer mode (how options are scored).
        planner: who reads what in rephrased modes.
        prefill: C2C senders also read the answer prefix (``EvaluationConfig.prefill_answer``).
        prompt_style: ``chat`` or ``lm_eval`` (``EvaluationConfig.prompt_style``; receiver and sender routes only).
    """

    def __init__(
        self,
        model: FusedReceiver,
        routes: Sequence[Route],
        mode: AnswerMode = "logits",
        planner: QueryPlanner | None = None,
        prefill: bool = False,
        prompt_style: PromptStyle = "chat",
    ) -> None:
        self.model, self.routes, self.mode, self.prefill = model, list(routes), mode, prefill
        check_prompt_style(prompt_style, mode, prefill)
        check_routes_for_prompt_style(self.routes, prompt_style)
        self.prompt_style = prompt_style
        self.planner = planner or QueryPlanner()
        for route in self.routes:
            if route.helped:
                route.check(self.planner.route_options(route), model.mode, model.strategy.aligned_messages)
        self.plan_keys = sorted(
            {(r.query_mode, self.planner.route_options(r)) for r in self.routes if r.query_mode != "original" or r.kind == "t2t"}
        )
        self.plan_senders = sorted({s for r in self.routes if r.helped for s in r.senders})
        self.variants: dict[Variant, set[str]] = {}  # the receiver-alone route reads the receiver side of a variant
        for route in self.routes:
            if route.kind in ("receiver", "c2c"):
                self.variants.setdefault(Variant.of(route), set()).update(route.senders if route.kind == "c2c" else ())
        self.alone = sorted({r.senders[0] for r in self.routes if r.kind == "sender"})

    def plan(self, questions: Sequence[QuestionWithControls]) -> dict[PlanKey, list[QueryPlan]]:
        """Who reads what for every question, in each (query mode, options policy) the routes read: the rephrase
        stage of an evaluation (rephrasings are written here, or read back from the rephraser's cache)."""
        items, style = [q.item for q in questions], answer_style(self.mode)
        return {key: self.planner.plan(items, self.plan_senders, key, style=style) for key in self.plan_keys}

    def encode(
        self, questions: Sequence[QuestionWithControls], plans: dict[PlanKey, list[QueryPlan]] | None = None
    ) -> QuestionBatch:
        """The questions' prompts for every route, read by ``plans`` (:meth:`plan`; made here when not given).
        A question that cannot be encoded is kept with its reason (``failures``)."""
        items = [q.item for q in questions]
        batch = QuestionBatch(
            ids=[item.id for item in items],
            labels=torch.tensor([item.answer_index for item in items]),
            option_labels=[item.labels for item in items],
        )
        plans = self.plan(questions) if plans is None else plans
        examples: dict[Variant, list[FusionExample]] = {v: [] for v in self.variants}
        options: dict[QueryMode, list[OptionIds]] = {}
        alone_rows: dict[str, list[tuple[list[int], OptionIds]]] = {name: [] for name in self.alone}
        for row, question in enumerate(questions):
            try:
                encoded, row_options = self._encode_row(question, {key: value[row] for key, value in plans.items()})
                singles = {
                    name: encode_for_scoring(self.model.senders[name], question.item, self.mode, prompt_style=self.prompt_style)
                    for name in self.alone
                }
            except (ValueError, KeyError, IndexError) as err:
                batch.failures[row] = f"{type(err).__name__}: {err}"
                continue
            batch.encoded_rows.append(row)
            batch.items.append(question.item)
            for query_mode, option_ids in row_options.items():
                options.setdefault(query_mode, []).append(option_ids)
            for variant in self.variants:
                examples[variant].append(encoded[variant])
            for name, (chat, sender_options) in singles.items():
                alone_rows[name].append((chat.input_ids, sender_options))
        if batch.encoded_rows:
            batch.receiver_options = options
            batch.fusion = {v: self.model.encoder.collate(examples[v]) for v in self.variants}
            batch.plans = {key: [value[row] for row in batch.encoded_rows] for key, value in plans.items()}
            for name, rows in alone_rows.items():
                ids, mask = left_pad([r[0] for r in rows], self.model.senders[name].tokenizer.pad_token_id)
                batch.alone[name] = AloneBatch(ids, mask, [r[1] for r in rows])
        return batch

    def _encode_row(
        self, question: QuestionWithControls, plans: dict[PlanKey, QueryPlan]
    ) -> tuple[dict[Variant, FusionExample], dict[QueryMode, OptionIds]]:
        """One question encoded for every variant, and the receiver's option ids per query mode."""
        model, encoded, row_options = self.model, {}, {}
        for variant, names in self.variants.items():
            plan = plans[(variant.query_mode, self.planner.options)] if variant.query_mode != "original" else None
            receiver_item = plan.receiver_item if plan else question.item
            receiver_chat, row_options[variant.query_mode] = encode_for_scoring(
                model.receiver, receiver_item, self.mode, self.prefill, self.prompt_style
            )
            chats = {
                n: encode_chat(
                    model.senders[n],
                    with_answer_prefill(plan.sender_messages(n), self.prefill)
                    if plan
                    else question_messages(
                        getattr(question, variant.sender_text), answer_style(self.mode), self.prefill, self.prompt_style
                    ),
                )
                for n in sorted(names)
            }
            encoded[variant] = model.encoder.encode_chats(receiver_chat, chats, strict=variant.sender_text == "item")
        if "original" not in row_options:
            row_options["original"] = encode_for_scoring(model.receiver, question.item, self.mode, prompt_style=self.prompt_style)[1]
        return encoded, row_options
