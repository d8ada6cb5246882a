"""The one evaluation loop: encode question batches for a set of routes and answer each route, into an
:class:`~fedrefine.evaluation.report.EvaluationReport`. Lightning's ``test``/``validate`` call its
steps; ``fedrefine bench`` and the measured sender selection call :meth:`Evaluator.run`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedrefine.data.question_dataset import QuestionWithControls
from fedrefine.evaluation.adaptive_choice import AdaptiveChoice
from fedrefine.evaluation.answer import RouteRunner
from fedrefine.evaluation.config import EvaluationConfig
from fedrefine.evaluation.question_batch import QueryPlanner, QuestionBatch, QuestionEncoder
from fedrefine.evaluation.report import EvaluationReport
from fedrefine.federation.selection import SenderSelection
from fedrefine.fusion import FusedReceiver
from fedrefine.tasks.routes import Route


class Evaluator:
    """Answers multiple-choice questions by every route of a fused receiver.

    Args:
        model: the receiver, its senders and fusers.
        routes: resolved routes (see :func:`fedrefine.tasks.routes.parse_routes`).
        config: answer mode, cloze normalisation, prompt style, generation budget, T2T settings, answer prefill.
        planner: who reads what in rephrased query modes (default: original queries only).
        selection: chooses senders per question for ``c2c:auto``.
    """

    def __init__(
        self,
        model: FusedReceiver,
        routes: Sequence[Route],
        config: EvaluationConfig | None = None,
        planner: QueryPlanner | None = None,
        selection: SenderSelection | None = None,
    ) -> None:
        config = config or EvaluationConfig()
        self.routes = list(routes)
        model.link = config.link  # how the senders' messages travel (codec, layer budget)
        adaptive = AdaptiveChoice(config.adaptive) if any(r.kind == "adaptive" for r in self.routes) else None
        encoded = [r for r in self.routes if r.kind != "adaptive"]
        for route in self.routes:
            if route.kind == "adaptive":
                encoded += adaptive.sub_routes(route.senders)
        self.encoder = QuestionEncoder(model, encoded, config.answer_mode, planner, config.prefill_answer, config.prompt_style)
        self.runner = RouteRunner(
            model,
            config.answer_mode,
            config.max_new_tokens,
            planner,
            config.t2t,
            selection=selection,
            normalization=config.cloze_normalization,
            adaptive=adaptive,
        )

    def encode(self, questions: Sequence[QuestionWithControls]) -> QuestionBatch:
        return self.encoder(questions)

    @torch.no_grad()
    def evaluate(self, batch: QuestionBatch, report: EvaluationReport) -> None:
        """Answer one encoded batch by every route."""
        report.add_batch(batch)
        for route in self.routes:
            report.add(route, batch, self.runner.run(batch, route))

    def run(
        self, questions: Sequence[QuestionWithControls], batch_size: int, device: torch.device | str = "cpu"
    ) -> EvaluationReport:
        """Evaluate every question, ``batch_size`` at a time, on ``device``."""
        report = EvaluationReport(self.routes, device)
        for start in range(0, len(questions), batch_size):
            chunk = [questions[i] for i in range(start, min(start + batch_size, len(questions)))]
            self.evaluate(self.encode(chunk).to(device), report)
        return report
