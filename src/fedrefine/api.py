"""The Python API: load a pair (or a federation) and answer questions through any route, scored exactly as
``fedrefine test`` scores them (the same :class:`~fedrefine.evaluation.Evaluator`, settings and batching)::

    import fedrefine

    pair = fedrefine.load("runs/my_pair/config.yaml")          # fit's resolved config, with the run's fuser
    answer = pair.answer("Which gas do plants take in?", ["oxygen", "carbon dioxide", "helium", "neon"])
    answer.prediction, answer.option_scores, answer.senders, answer.timings_ms

or from paths: ``fedrefine.load(receiver="models/qwen3", sender="models/llama", fuser="runs/my_pair/fuser")``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from fedrefine.data.question_dataset import QuestionDataset
from fedrefine.evaluation import EvaluationConfig, Evaluator
from fedrefine.evaluation.question_batch import Variant
from fedrefine.evaluation.report import EvaluationReport
from fedrefine.participants.precision import cast_for_precision, precision_context, resolve_precision
from fedrefine.participants.sources import HubParticipant, ParticipantSource
from fedrefine.recipes import C2CModule, FusionModule
from fedrefine.recipes.trainer_cli import build_cli
from fedrefine.tasks.multiple_choice import MultipleChoiceItem
from fedrefine.tasks.routes import Route, parse_routes

#: The sections of a ``fedrefine`` config that describe the pair and its data (a resolved config's other keys,
#: such as ``ckpt_path`` or ``overwrite``, belong to a command).
CONFIG_SECTIONS = ("seed_everything", "trainer", "model", "data")
#: Question-like inputs :meth:`Pair.answer` takes: a stem (with ``options``), an OpenBookQA-schema row, an item.
Question = str | Mapping[str, Any] | MultipleChoiceItem


@dataclass
class Answer:
    """One question answered by one route.

    ``prediction``: the chosen option's label (None when the route could not answer; see ``failure``);
    ``option_scores``: every option's score under each normalisation (``logits`` for letter scoring; cloze:
    ``sum``, ``chars``, ``token_mean``); ``correct``: against the given answer (None when none was given);
    ``senders``: the senders whose message or hint was read; ``gate_weights``: with a gating network, each
    sender's mean weight over the receiver's layers; ``bytes_sent``: what the senders transmitted (C2C: K/V,
    T2T: token ids), and ``bytes_per_token`` per sender; ``timings_ms``: milliseconds per stage (rephrase,
    sender, transfer, fuse, receiver). Bytes and timings are per question, averaged over the batch it was in.
    """

    question: str
    route: str
    prediction: str | None
    labels: list[str]
    option_scores: dict[str, list[float]]
    correct: bool | None
    senders: list[str]
    gate_weights: dict[str, float] = field(default_factory=dict)
    bytes_sent: float = 0.0
    bytes_per_token: dict[str, float] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)
    failure: str | None = None


def as_item(question: Question, options: Sequence[str] | None = None, answer: str | None = None,
            question_id: str | None = None) -> tuple[MultipleChoiceItem, bool]:
    """A question as a :class:`MultipleChoiceItem`, and whether its answer is known (labels A, B, ... by default)."""
    if isinstance(question, MultipleChoiceItem):
        return question, True
    if isinstance(question, Mapping):
        return MultipleChoiceItem.from_row(question, where="question"), True
    if not options or len(options) < 2:
        raise ValueError("Give the question's options (two or more), e.g. pair.answer(stem, ['red', 'blue']).")
    labels = tuple(chr(ord("A") + i) for i in range(len(options)))
    if answer is not None and answer not in labels:
        raise ValueError(f"answer {answer!r} is not one of the option labels {list(labels)}.")
    item = MultipleChoiceItem(question_id or "q0", question, tuple(options), labels, answer or labels[0])
    return item, answer is not None


class Pair:
    """A loaded receiver with its senders and fusers (any :class:`~fedrefine.recipes.FusionModule`), answering
    through the routes ``fedrefine test`` evaluates.

    Args:
        module: the recipe's module (built from a config by :func:`load`).
        data: the config's data module (for :meth:`questions`), if any.
        batch_size: questions per batch (default: the data's ``eval_batch_size``, as ``fedrefine test``).
        device: where the models run (default: CUDA when available).
        precision: ``32-true``, ``bf16-true``, ``bf16-mixed`` (see :mod:`fedrefine.participants.precision`) for the
            receiver, senders and fusers; None: by the device (``bf16-mixed`` on a GPU, ``32-true`` on CPU).
    """

    def __init__(self, module: FusionModule, data: Any = None, batch_size: int | None = None,
                 device: str | torch.device | None = None, precision: str | None = None) -> None:
        self.module, self.data = module, data
        self.batch_size = batch_size or getattr(data, "eval_batch_size", None) or 16
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = resolve_precision(precision, self.device)
        cast_for_precision(self.module, self.precision).to(self.device).eval()

    @property
    def evaluation(self) -> EvaluationConfig:
        return self.module.evaluation

    @property
    def senders(self) -> list[str]:
        return list(self.module.fused.sender_names)

    def questions(self, split: str = "test") -> list[MultipleChoiceItem]:
        """The config's questions of a split (``data.eval_path``), in the order ``fedrefine test`` reads them."""
        if self.data is None:
            raise ValueError("This pair was loaded without a data section; pass questions to answer() instead.")
        dataset = self.data.load_split(getattr(self.data, f"{split}_split", split))
        return list(dataset.items)

    def answer(self, question: Question, options: Sequence[str] | None = None, route: str = "c2c",
               answer: str | None = None) -> Answer:
        """One question through ``route`` (``receiver``, ``sender:<name>``, ``c2c[:A+B]``, ``t2t``, ``c2c@private``, ...).

        ``question``: a stem with ``options`` (labels A, B, ...), an OpenBookQA-schema row or a
        :class:`MultipleChoiceItem`; ``answer``: the correct label, when known (sets ``correct``)."""
        item, known = as_item(question, options, answer)
        return self.answer_many([item], route, known=known)[0]

    def answer_many(self, questions: Sequence[Question], route: str = "c2c", known: bool = True) -> list[Answer]:
        """Many questions through ``route``, batched as ``fedrefine test`` batches them."""
        items = [as_item(q)[0] if not isinstance(q, MultipleChoiceItem) else q for q in questions]
        routes = parse_routes([route], self.module.fused.sender_names)
        evaluator = Evaluator(self.module.fused, routes, self.evaluation, self.module.planner, self.module.selection)
        dataset, answers = QuestionDataset(items), []
        for start in range(0, len(items), self.batch_size):
            questions_batch = [dataset[i] for i in range(start, min(start + self.batch_size, len(items)))]
            report = EvaluationReport(routes, self.device)
            with precision_context(self.precision, self.device):
                evaluator.evaluate(questions_batch, report, self.device)
                gates = self._gate_weights(evaluator, questions_batch, routes[0])
            answers += [self._answer(record, report.rows()[0], known, gates.get(record["question"], {}))
                        for record in report.records]
        return answers

    def _answer(self, record: dict[str, Any], row: dict[str, Any], known: bool, gates: dict[str, float]) -> Answer:
        return Answer(
            question=record["question"], route=record["route"], prediction=record["prediction"],
            labels=record["option_labels"], option_scores=record["scores"],
            correct=record["correct"] if known else None, senders=record["senders"], gate_weights=gates,
            bytes_sent=row["bytes_per_question"], bytes_per_token=dict(row["sender_bytes_per_token"]),
            timings_ms={k.removesuffix("_ms"): v for k, v in row.items() if k.endswith("_ms")},
            failure=record["failure"],
        )

    @torch.no_grad()
    def _gate_weights(self, evaluator: Evaluator, questions: Sequence[Any], route: Route) -> dict[str, dict[str, float]]:
        """Per question, each sender's mean gate weight over the receiver's layers (a gated C2C route only)."""
        model = self.module.fused
        if model.source_gate is None or route.kind != "c2c" or route.auto:
            return {}
        batch = evaluator.encode(questions).to(self.device)
        if not batch.encoded_rows:
            return {}
        fusion = batch.fusion[Variant.of(route)]
        sent = model.send(fusion, list(route.senders), self.evaluation.link)
        weights = model.gate_weights(fusion, sent.messages)  # sender -> (B, L_t)
        return {batch.ids[row]: {n: float(w[k].mean()) for n, w in weights.items()} for k, row in enumerate(batch.encoded_rows)}


def load(config: str | Path | None = None, *, receiver: str | ParticipantSource | None = None,
         sender: str | ParticipantSource | None = None, fuser: str | Path | None = None,
         overrides: Sequence[str] = (), batch_size: int | None = None, device: str | None = None,
         precision: str | None = None) -> Pair:
    """A pair (or federation) ready to answer: from a ``fedrefine`` config (e.g. fit's resolved
    ``<run>/config.yaml``, whose exported fuser is found), or from a receiver, a sender and a fuser given as paths
    (or hub ids, or participant sources).

    ``overrides``: command-line style overrides of the config (``["--model.evaluation.answer_mode", "cloze"]``);
    ``precision``: ``32-true``, ``bf16-true`` or ``bf16-mixed`` for every model (default: the config's
    ``trainer.precision``, else by the device).
    """
    if config is not None:
        text = yaml.safe_load(Path(config).read_text())
        sections = {key: text[key] for key in CONFIG_SECTIONS if key in text}
        if precision is not None:  # the participants' dtype: auto follows it (fedrefine.recipes.run_dir)
            overrides = [*overrides, "--trainer.precision", str(precision)]
        cli = build_cli(["--config", yaml.safe_dump(sections), *overrides], run=False)
        return Pair(cli.model, cli.datamodule, batch_size, device, precision or cli.trainer.precision)
    if receiver is None or sender is None:
        raise ValueError("Give a config, or a receiver and a sender (paths or hub ids) with the fuser trained for them.")

    def source(given: str | ParticipantSource) -> ParticipantSource:
        return given if isinstance(given, ParticipantSource) else HubParticipant(str(given))

    module = C2CModule(source(receiver), source(sender), fuser_path=None if fuser is None else str(fuser))
    return Pair(module, None, batch_size, device, precision)
