"""Evaluation: questions rephrased and encoded for every route, answered route by route, reported in one place.

- :mod:`~fedrefine.evaluation.config`: how questions are answered (``EvaluationConfig``);
- :mod:`~fedrefine.evaluation.question_batch`: who reads what (plans) and the typed batch of encoded questions;
- :mod:`~fedrefine.evaluation.handler`: what answering any route shares (:class:`RouteHandler`);
- :mod:`~fedrefine.evaluation.cache_routes`: the receiver alone, C2C, C2C with senders picked per question;
- :mod:`~fedrefine.evaluation.text_routes`: a sender alone, T2T;
- :mod:`~fedrefine.evaluation.adaptive_choice`: the adaptive route's pick, answered by the picked route;
- :mod:`~fedrefine.evaluation.choices`: what a route chose per question;
- :mod:`~fedrefine.evaluation.metrics`: a route's results and their tally;
- :mod:`~fedrefine.evaluation.report`: rows, table, JSON and W&B table;
- :mod:`~fedrefine.evaluation.evaluator`: the loop (rephrase -> encode -> answer -> report).
"""

from fedrefine.evaluation.config import AnswerMode, EvaluationConfig
from fedrefine.evaluation.evaluator import Evaluator
from fedrefine.evaluation.question_batch import QueryPlanner, QuestionBatch, Variant
from fedrefine.evaluation.report import EvaluationReport

__all__ = ["AnswerMode", "EvaluationConfig", "EvaluationReport", "Evaluator", "QueryPlanner", "QuestionBatch", "Variant"]
