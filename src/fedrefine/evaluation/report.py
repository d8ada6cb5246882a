"""An evaluation's results, route by route: accuracy (torchmetrics) with its interval, latency per stage,
bytes, leakage, per-question correctness and the questions that could not be encoded; as rows, a
rich table, a JSON file and a W&B table. Used by ``test``/``validate``, ``fedrefine bench`` and the
measured sender selection alike."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich import box
from rich.console import Console
from rich.table import Table
from torchmetrics.classification import MulticlassAccuracy

from fedrefine.evaluation.metrics import RouteResult, RouteTally
from fedrefine.evaluation.question_batch import QuestionBatch
from fedrefine.tasks.routes import Route

#: Option slots of the accuracy metric (labels A-Z).
MAX_OPTIONS = 26
#: Console columns (``ms/q``: latency per question, all stages; ``B/q``: bytes the senders sent per question).
TABLE_COLUMNS = ("route", "accuracy", "95% CI", "ms/q", "B/q", "leakage")
#: Extra columns of cloze evaluations: lm-eval's accuracies under the ``sum`` and ``chars`` normalisations.
CLOZE_COLUMNS = ("acc", "acc_norm")


#: Failed questions printed under the table; the results JSON lists every one.
SHOWN_FAILURES = 10



def compact_bytes(count: float) -> str:
    """``1,152``, ``86.0 kB``, ``3.1 MB``: at most 7 characters, for the console table."""
    if count < 10_000:
        return f"{count:,.0f}"
    for unit, size in (("kB", 1e3), ("MB", 1e6), ("GB", 1e9)):
        if round(count / size, 1) < 1000 or unit == "GB":
            return f"{count / size:.1f} {unit}"
    raise AssertionError("unreachable")

class EvaluationReport:
    """Accumulates every route's results over question batches.

    Args:
        routes: the routes evaluated, in report order (rows are keyed by each route's ``label``).
        device: where the accuracy metrics live (the batches' labels' device).
    """

    def __init__(self, routes: Sequence[Route], device: torch.device | str = "cpu") -> None:
        self.routes = list(routes)
        self.metrics = {r.label: MulticlassAccuracy(num_classes=MAX_OPTIONS, average="micro").to(device) for r in routes}
        self.tallies: dict[str, RouteTally] = defaultdict(RouteTally)
        self.per_question: dict[str, list[tuple[str, bool]]] = defaultdict(list)
        self.selections: list[tuple[str, tuple[str, ...]]] = []
        self.failures: list[tuple[str, str]] = []
        self.dropped: list[dict[str, str]] = []  # per question and route: a sender left out, and why
        self.route_failures: list[dict[str, str]] = []  # per question and route: why the route could not answer it
        self.records: list[dict[str, Any]] = []  # per question and route: see :meth:`add`
        self.question_count = 0

    def add_batch(self, batch: QuestionBatch) -> None:
        """Count a batch's questions, and those that could not be encoded with their reasons."""
        self.question_count += len(batch)
        self.failures.extend((batch.ids[row], reason) for row, reason in batch.failures.items())

    def add(self, route: Route, batch: QuestionBatch, result: RouteResult) -> None:
        """One route's result on a batch (added after :meth:`add_batch` of that batch)."""
        correct = (result.predictions == batch.labels).tolist()
        self.per_question[route.label].extend(zip(batch.ids, correct))
        if result.selected is not None:
            self.selections.extend(zip([batch.ids[row] for row in batch.encoded_rows], result.selected))
        for sender, why in result.dropped.items():
            self.dropped.extend(
                {"question": batch.ids[row], "route": route.label, "sender": sender, "why": why} for row in batch.encoded_rows
            )
        self.route_failures.extend(
            {"question": batch.ids[row], "route": route.label, "why": why} for row, why in sorted(result.failures.items())
        )
        self.records.extend(question_records(route, batch, result))
        # -1 (unanswerable) never equals a label: counted wrong, never skipped.
        predictions = torch.where(result.predictions < 0, (batch.labels + 1) % MAX_OPTIONS, result.predictions)
        self.metrics[route.label].update(predictions, batch.labels)
        self.tallies[route.label].add(result, batch.labels)

    @property
    def empty(self) -> bool:
        return not self.question_count

    def correct(self, route: Route) -> list[bool]:
        """Per question (in evaluation order), whether ``route`` answered it correctly."""
        return [ok for _, ok in self.per_question[route.label]]

    def rows(self) -> list[dict[str, Any]]:
        """One row per route: accuracy with its 95% interval (cloze: also lm-eval's ``acc`` and ``acc_norm``),
        questions, failures, latency per question (total and per stage), bytes sent, and leakage in rephrased modes."""
        rows = []
        for route in self.routes:
            rows.append(
                {
                    "route": route.label,
                    "senders": "+".join(route.senders),
                    "query_mode": route.query_mode,
                    **self.tallies[route.label].row(),
                    "accuracy": float(self.metrics[route.label].compute()),
                    "questions": self.question_count,
                    "failed": len(self.failures) + sum(f["route"] == route.label for f in self.route_failures),
                }
            )
        return rows

    def print_table(self, title: str, console: Console | None = None) -> None:
        """The rows as one rich table that fits an 80-column terminal, then the questions that could not be
        encoded (at most 10). Bytes per token and the stages' latencies are in the JSON and the loggers."""
        rows = self.rows()
        cloze = [c for c in CLOZE_COLUMNS if rows and c in rows[0]]
        leaks = any(row["leakage_overlap"] is not None for row in rows)  # only rephrased modes have leakage
        columns = [*TABLE_COLUMNS[:3], *cloze, *TABLE_COLUMNS[3:-1], *TABLE_COLUMNS[-1:] * leaks]
        table = Table(title=f"{title} ({self.question_count} questions)", box=box.SIMPLE_HEAD, pad_edge=False,
                      collapse_padding=True)
        for column in columns:
            if column == "route":  # the one column that may wrap (long sender lists), folded at any character
                table.add_column(column, overflow="fold", ratio=1)
            else:
                table.add_column(column, justify="right", no_wrap=True, min_width=len(column))
        for row in rows:
            cells = [
                row["route"],
                f"{100 * row['accuracy']:.1f}%",
                f"{100 * row['ci_low']:.0f}-{100 * row['ci_high']:.0f}%",
                *(f"{100 * row[c]:.1f}%" for c in cloze),
                f"{row['latency_ms']:.1f}",
                compact_bytes(row["bytes_per_question"]),
            ]
            if leaks:
                cells.append("" if row["leakage_overlap"] is None else f"{100 * row['leakage_overlap']:.0f}%")
            table.add_row(*cells)
        console = console or Console()
        console.print(table)
        if self.failures:
            console.print(f"[red]{len(self.failures)} question(s) could not be encoded and count as wrong:[/]")
            for question_id, reason in self.failures[:SHOWN_FAILURES]:
                console.print(f"  {question_id}: {reason}")
            if len(self.failures) > SHOWN_FAILURES:
                console.print(f"  and {len(self.failures) - SHOWN_FAILURES} more (all of them in the results JSON)")
        for failure in self.route_failures[:SHOWN_FAILURES]:
            console.print(f"[red]{failure['route']} could not answer {failure['question']} (counted wrong): {failure['why']}[/]")
        if len(self.route_failures) > SHOWN_FAILURES:
            console.print(f"[red]and {len(self.route_failures) - SHOWN_FAILURES} more route failures (all in the results JSON)[/]")
        for row in rows:
            for sender, reasons in row["senders_dropped"].items():
                counts = ", ".join(f"{reason} on {n}" for reason, n in reasons.items())
                console.print(f"[yellow]{row['route']}: sender {sender} was left out ({counts} questions); "
                              f"the others answered them.[/]")

    def save_json(self, path: str | Path, title: str) -> Path:
        """``{"title", "rows", "failures"[, "route_failures"][, "selected_senders"][, "dropped_senders"]}`` at ``path``,
        and every question's record per route (:meth:`save_records`) beside it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload: dict[str, Any] = {"title": title, "rows": self.rows(), "failures": self.failures}
        if self.route_failures:
            payload["route_failures"] = self.route_failures
        if self.selections:
            payload["selected_senders"] = {question: list(senders) for question, senders in self.selections}
        if self.dropped:
            payload["dropped_senders"] = self.dropped
        path.write_text(json.dumps(payload, indent=2) + "\n")
        self.save_records(records_path(path))
        return path

    def save_records(self, path: str | Path) -> Path:
        """One JSON line per question and route (as lm-eval's ``--log_samples``): see :func:`question_records`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(record) + "\n" for record in self.records))
        return path


def records_path(results: str | Path) -> Path:
    """Where the per-question records of a results file go: ``test_results.json`` -> ``test_samples.jsonl``."""
    results = Path(results)
    return results.with_name(results.stem.removesuffix("_results") + "_samples.jsonl")


def question_records(route: Route, batch: QuestionBatch, result: RouteResult) -> list[dict[str, Any]]:
    """Per question of ``batch``: its id, the route, the gold and predicted labels, whether it was right, every
    option's score under each normalisation, the senders whose message or hint it read, and why it failed
    (could not be encoded, or the route could not answer it), if it did."""
    selected = dict(zip(batch.encoded_rows, result.selected or []))
    dropped = set(result.dropped)
    records = []
    for row, question in enumerate(batch.ids):
        labels = batch.option_labels[row]
        gold, predicted = int(batch.labels[row]), int(result.predictions[row])
        if route.kind in ("c2c", "t2t"):
            senders = selected.get(row, result.contributed or tuple(s for s in route.senders if s not in dropped))
        else:
            senders = route.senders if route.kind == "sender" else ()
        failure = batch.failures.get(row) or result.failures.get(row)
        records.append({
            "question": question,
            "route": route.label,
            "gold": labels[gold] if 0 <= gold < len(labels) else None,
            "prediction": labels[predicted] if 0 <= predicted < len(labels) else None,
            "correct": predicted == gold,
            "option_labels": list(labels),
            "scores": result.option_scores[row] if row < len(result.option_scores) else {},
            **({"cloze_predictions": {n: int(p[row]) for n, p in result.cloze_predictions.items()}} if result.cloze_predictions else {}),
            "senders": list(senders),
            "failure": failure,
        })
    return records


def log_table(loggers: Iterable[Any], key: str, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Rows as a table in every logger that takes tables (``WandbLogger.log_table``); cells must be scalars,
    so by default the columns are those whose first-row value is not a dict."""
    if not rows:
        return
    columns = list(columns or [c for c, value in rows[0].items() if not isinstance(value, dict)])
    for logger in loggers:
        if hasattr(logger, "log_table"):
            logger.log_table(key=key, columns=columns, data=[[row.get(c) for c in columns] for row in rows])
