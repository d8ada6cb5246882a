"""The one evaluation loop. Per batch of questions, in stages:

    rephrase   who reads what in each query mode the routes read (rephrasings written or read from the cache)
    encode     every route's prompts, for the receiver and each sender, padded into one typed batch
    answer     each route by its own handler, chosen once (receiver, sender, C2C, C2C auto, T2T, adaptive)
    report     accuracy, latency per stage, bytes, leakage

Lightning's ``test``/``validate`` call :meth:`Evaluator.evaluate` per batch; ``fedrefine bench`` and the
measured sender selection call :meth:`Evaluator.run`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from fedrefine.data.question_dataset import QuestionWithControls
from fedrefine.evaluation.adaptive_choice import AdaptiveChoice, AdaptiveRoute
from fedrefine.evaluation.cache_routes import AutoRoute, CacheRoute, ReceiverAlone
from fedrefine.evaluation.config import EvaluationConfig
from fedrefine.evaluation.handler import Answering, RouteHandler
from fedrefine.evaluation.metrics import RouteResult
from fedrefine.evaluation.question_batch import PlanKey, QueryPlanner, QuestionBatch, QuestionEncoder
from fedrefine.evaluation.report import EvaluationReport
from fedrefine.evaluation.text_routes import SenderAlone, TextRoute
from fedrefine.federation.selection import SenderSelection
from fedrefine.fusion import FusedReceiver
from fedrefine.privacy.plans import QueryPlan
from fedrefine.tasks.routes import Route, RouteError

#: The handler of each route kind that needs nothing but the model, how routes answer and the planner.
HANDLERS: dict[str, type[RouteHandler]] = {"receiver": ReceiverAlone, "sender": SenderAlone, "t2t": TextRoute}


def handler_for(
    route: Route,
    model: FusedReceiver,
    answering: Answering,
    planner: QueryPlanner,
    selection: SenderSelection | None = None,
    adaptive: AdaptiveChoice | None = None,
    generator: torch.Generator | None = None,
) -> RouteHandler | AdaptiveRoute:
    """The handler that answers ``route``, chosen once by the route's kind."""
    if route.kind == "adaptive":
        option = adaptive.option
        link = adaptive.link_for(option, answering.link) if option.route == "c2c" else answering.link
        chosen = handler_for(adaptive.route_for(option, route.senders), model, dataclasses.replace(answering, link=link), planner)
        return AdaptiveRoute(adaptive, chosen)
    if route.kind == "c2c":
        return AutoRoute(model, answering, planner, selection) if route.auto else CacheRoute(model, answering, planner, generator)
    return HANDLERS[route.kind](model, answering, planner)


def check_routes_can_run(model: FusedReceiver, routes: Sequence[Route]) -> None:
    """Refuse before the run what cannot run at all: a sender-alone route over a sender served elsewhere (its
    options are scored with the sender's own model, which is not here)."""
    alone = [r for r in routes if r.kind == "sender" and r.senders[0] in model.remotes]
    remote = [r.label for r in alone]
    if remote:
        where = ", ".join(f"{r.senders[0]} at {model.remotes[r.senders[0]].endpoint}" for r in alone)
        raise RouteError(
            f"Route(s) {remote} score options with a sender's own model, which is served elsewhere ({where}); "
            f"leave them out of the routes here (e.g. test_routes: [receiver, c2c, t2t]) and evaluate them where "
            f"the sender runs."
        )


class Evaluator:
    """Answers multiple-choice questions by every route of a fused receiver.

    Args:
        model: the receiver, its senders and fusers.
        routes: resolved routes (see :func:`fedrefine.tasks.routes.parse_routes`).
        config: answer mode, cloze normalisation, prompt style, generation budget, T2T settings, answer prefill,
            the link C2C messages travel over.
        planner: who reads what in rephrased query modes (default: original queries only).
        selection: chooses senders per question for ``c2c:auto``.
        generator: random numbers of the ``_random_kv`` control (None: torch's global generator).
    """

    def __init__(
        self,
        model: FusedReceiver,
        routes: Sequence[Route],
        config: EvaluationConfig | None = None,
        planner: QueryPlanner | None = None,
        selection: SenderSelection | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        config = config or EvaluationConfig()
        model.sending.check(config.link)  # a link this receiver cannot use is refused now, not at the first batch
        check_routes_can_run(model, routes)
        self.routes, self.planner = list(routes), planner or QueryPlanner()
        adaptive = AdaptiveChoice(config.adaptive) if any(r.kind == "adaptive" for r in self.routes) else None
        encoded = [r for r in self.routes if r.kind != "adaptive"]
        for route in self.routes:
            if route.kind == "adaptive":
                encoded += adaptive.sub_routes(route.senders)
        self.encoder = QuestionEncoder(model, encoded, config.answer_mode, self.planner, config.prefill_answer, config.prompt_style)
        answering = Answering.of(config)
        self.handlers = [
            (route, handler_for(route, model, answering, self.planner, selection, adaptive, generator)) for route in self.routes
        ]

    def rephrase(self, questions: Sequence[QuestionWithControls]) -> dict[PlanKey, list[QueryPlan]]:
        """Stage 1: who reads what for each question in every query mode the routes read."""
        return self.encoder.plan(questions)

    def encode(
        self, questions: Sequence[QuestionWithControls], plans: dict[PlanKey, list[QueryPlan]] | None = None
    ) -> QuestionBatch:
        """Stage 2: every route's prompts for the questions as ``plans`` say (rephrased here when not given)."""
        return self.encoder.encode(questions, plans)

    @torch.no_grad()
    def answer(self, batch: QuestionBatch, report: EvaluationReport) -> None:
        """Stage 3: every route answers the encoded batch, into ``report``."""
        report.add_batch(batch)
        for route, handler in self.handlers:
            report.add(route, batch, handler.run(batch, route))

    def answer_route(self, batch: QuestionBatch, route: Route) -> RouteResult:
        """One of the evaluation's routes (by its label) on an encoded batch."""
        handler = next(h for r, h in self.handlers if r.label == route.label)
        return handler.run(batch, route)

    def evaluate(
        self, questions: Sequence[QuestionWithControls], report: EvaluationReport, device: torch.device | str = "cpu"
    ) -> None:
        """One batch of questions through every stage, on ``device``."""
        plans = self.rephrase(questions)
        self.answer(self.encode(questions, plans).to(device), report)

    def run(
        self, questions: Sequence[QuestionWithControls], batch_size: int, device: torch.device | str = "cpu"
    ) -> EvaluationReport:
        """Evaluate every question, ``batch_size`` at a time, on ``device``."""
        report = EvaluationReport(self.routes, device)
        for start in range(0, len(questions), batch_size):
            self.evaluate([questions[i] for i in range(start, min(start + batch_size, len(questions)))], report, device)
        return report
