"""Evaluation: questions encoded for every route, answered route by route, reported in one place.

- :mod:`~fedrefine.evaluation.config`: how questions are answered (``EvaluationConfig``);
- :mod:`~fedrefine.evaluation.question_batch`: the typed batch of encoded questions;
- :mod:`~fedrefine.evaluation.answer`: one route's answers, timed, with bytes sent;
- :mod:`~fedrefine.evaluation.metrics`: a route's results and their tally;
- :mod:`~fedrefine.evaluation.report`: rows, table, JSON and W&B table;
- :mod:`~fedrefine.evaluation.evaluator`: the loop.
"""

from fedrefine.evaluation.config import AnswerMode, EvaluationConfig
from fedrefine.evaluation.evaluator import Evaluator
from fedrefine.evaluation.question_batch import QueryPlanner, QuestionBatch, Variant
from fedrefine.evaluation.report import EvaluationReport

__all__ = ["AnswerMode", "EvaluationConfig", "EvaluationReport", "Evaluator", "QueryPlanner", "QuestionBatch", "Variant"]
