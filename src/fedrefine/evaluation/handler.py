"""Answering one route over an encoded question batch: what every kind of route shares, and the settings they
answer with.

One :class:`RouteHandler` per route kind (receiver alone, sender alone, C2C, C2C with senders chosen
per question, T2T, adaptive) is chosen once when an evaluation starts
(:func:`fedrefine.evaluation.evaluator.handler_for`); its :meth:`RouteHandler.run` charges the route
for the rephrasings its readers read, lets the kind answer the encoded questions, and reports every
question (those that could not be encoded as -1, wrong).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedrefine.evaluation.choices import Choices, extract_choices
from fedrefine.evaluation.config import AnswerMode, EvaluationConfig, answer_style
from fedrefine.evaluation.metrics import RouteResult
from fedrefine.evaluation.question_batch import OptionIds, QueryPlanner, QuestionBatch
from fedrefine.fusion import FusedReceiver, FusionBatch, ReceiverContext
from fedrefine.privacy.accounting import route_reading
from fedrefine.tasks.routes import Route
from fedrefine.tasks.scoring import NORMALIZATIONS, Normalization, score_options
from fedrefine.tasks.t2t import T2TConfig
from fedrefine.wire import LinkConfig
from fedrefine.wire.message import KVMessage

#: Errors of one question on one route (a template that changes the text, a hint that cannot be encoded, a
#: generation that fails): recorded as that question's failure, never the end of the run.
QUESTION_ERRORS = (ValueError, KeyError, IndexError, RuntimeError)


def failure_reason(err: BaseException) -> str:
    """One line: the error's type and the first line of its message."""
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")


@dataclass(frozen=True)
class Answering:
    """How routes answer: the answer mode, the cloze normalisation reported as ``accuracy``, the generation
    budget, the T2T settings and the link C2C messages travel over (see :class:`EvaluationConfig`)."""

    mode: AnswerMode = "logits"
    normalization: Normalization = "token_mean"
    max_new_tokens: int = 64
    t2t: T2TConfig | None = None
    link: LinkConfig | None = None

    @classmethod
    def of(cls, config: EvaluationConfig) -> Answering:
        return cls(config.answer_mode, config.cloze_normalization, config.max_new_tokens, config.t2t, config.link)


class RouteHandler(ABC):
    """Answers one kind of route for a fused receiver.

    Args:
        model: the receiver, its senders and fusers.
        answering: how routes answer.
        planner: who read what in rephrased query modes (the plans a route is charged for).
    """

    def __init__(self, model: FusedReceiver, answering: Answering, planner: QueryPlanner) -> None:
        self.model, self.answering, self.planner = model, answering, planner

    def run(self, batch: QuestionBatch, route: Route) -> RouteResult:
        """The route's result on every question of the batch; questions that failed to encode are predicted -1."""
        device = batch.labels.device
        predictions = torch.full((len(batch),), -1, dtype=torch.long, device=device)
        result = RouteResult(predictions, 0.0)
        if self.answering.mode == "cloze":
            result.cloze_predictions = {n: predictions.clone() for n in NORMALIZATIONS}
        if not batch.encoded_rows:
            return result
        plans = batch.plans.get((route.query_mode, self.planner.route_options(route)))
        if plans is not None and route.query_mode != "original":
            reading = route_reading(plans, route.senders)
            result.stages["rephrase"] = reading.rephrase_seconds
            result.unfaithful, result.leakage, result.private_tokens = reading.unfaithful, reading.leakage, reading.private_tokens
        try:
            chosen = self.answer(batch, route, result)
        except QUESTION_ERRORS as err:  # one question's failure must not end the run: answer them one by one
            chosen = self._answer_one_by_one(batch, route, result, err)
        rows = torch.tensor(batch.encoded_rows, device=device)
        predictions[rows] = chosen.chosen.to(device)
        for normalization, picks in chosen.cloze.items():
            result.cloze_predictions[normalization][rows] = picks.to(device)
        result.option_scores = [{} for _ in range(len(batch))]
        for row, scores in zip(batch.encoded_rows, chosen.scores):
            result.option_scores[row] = scores
        for row in result.failures:  # a failed question is wrong under every normalisation
            predictions[row] = -1
            for picks in result.cloze_predictions.values():
                picks[row] = -1
        result.seconds = sum(result.stages.values())
        return result

    def _answer_one_by_one(self, batch: QuestionBatch, route: Route, result: RouteResult, first: Exception) -> Choices:
        """Each encoded question alone; those that fail again are ``result.failures`` (with the reason), wrong."""
        if len(batch.encoded_rows) == 1:
            result.failures[batch.encoded_rows[0]] = failure_reason(first)
            return Choices(torch.full((1,), -1, dtype=torch.long), scores=[{}])
        parts, where = [], []
        for position, row in enumerate(batch.encoded_rows):
            try:
                parts.append(self.answer(batch.single(row), route, result))
                where.append([position])
            except QUESTION_ERRORS as err:
                result.failures[row] = failure_reason(err)
        return Choices.concat(parts, where, len(batch.encoded_rows))

    @abstractmethod
    def answer(self, batch: QuestionBatch, route: Route, result: RouteResult) -> Choices:
        """The option chosen for each encoded question; stages, bytes and senders go into ``result``."""

    @torch.no_grad()
    def choose(
        self,
        fusion: FusionBatch,
        messages: Mapping[str, KVMessage],
        options: list[OptionIds],
        batch: QuestionBatch,
        own: ReceiverContext | None = None,
    ) -> Choices:
        """The receiver's choice per row over its prompt fused with ``messages`` (none: the receiver alone): the
        prompt is read once and every option scored from that read, or (``generate``) an answer generated."""
        model, answering = self.model, self.answering
        if answering.mode == "generate":
            generated = model.generate(fusion, messages, answering.max_new_tokens)
            return Choices(extract_choices(model.receiver.tokenizer.batch_decode(generated, skip_special_tokens=True), batch))
        state = model.read_prompt(fusion, messages, own)
        pad = model.receiver.tokenizer.pad_token_id
        scores = score_options(model.receiver_model, state, options, answer_style(answering.mode), pad)
        return Choices.of(scores.cpu(), answering.normalization)
