"""A sweep's results file: one row per finished cell, written as each cell finishes, so that an interrupted
sweep resumes where it stopped; rows are valid only for the fingerprint (questions, participants, settings)
that made them, a C2C row also only for its fusion mode's fusers and gate (``fusion_fingerprints``), and a row
of a rephrased query mode also only for the rephrasing settings (``rephrasing_fingerprint``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from fedrefine.bench.cells import cell_fields
from fedrefine.evaluation import EvaluationConfig, EvaluationReport
from fedrefine.evaluation.metrics import STAGES
from fedrefine.participants import ParticipantIdentity
from fedrefine.tasks.multiple_choice import MultipleChoiceItem
from fedrefine.tasks.routes import Route

#: Version 2: cells are keyed by their route's canonical text (``c2c.concat:a+b@private``).
RESULTS_FORMAT = 2
#: Header fields that say how a file was made rather than what it measured.
_PROVENANCE = ("command", "commit", "rows", "format")
_FINGERPRINTS = ("fingerprint", "fusion_fingerprints", "rephrasing_fingerprint", "fingerprint_parts")
#: How :meth:`SweepResultsFile.differences` names each part of the settings fingerprint.
_PART_NAMES = {"format": "results format", "questions": "questions", "link_mbit_per_s": "link speed"}


class Fingerprint(str):
    """A sweep's settings fingerprint (the hex digest itself), carrying the digest of each part (``parts``), so a
    changed setting can be named, and the digest earlier versions computed (``legacy``, with the batch size)."""

    parts: dict[str, str]
    legacy: str | None

    def __new__(cls, parts: dict[str, str], legacy: str | None = None) -> Fingerprint:
        made = super().__new__(cls, _digest(parts))
        made.parts, made.legacy = dict(parts), legacy
        return made


def settings_fingerprint(
    participants: Mapping[str, ParticipantIdentity],
    questions: Sequence[MultipleChoiceItem],
    evaluation: EvaluationConfig,
    batch_size: int,
    link_mbit_per_s: float,
    precision: str = "32-true",
) -> Fingerprint:
    """Hash of everything every cell's result depends on: the results format, participants, questions, evaluation
    settings but the rephrasing's (:func:`rephrasing_fingerprint`; where its cache lives changes no result), the
    link speed and, other than ``32-true``, the precision. The batch size changes no result (each question is scored
    on its own) and is not part of it."""
    settings = dataclasses.asdict(evaluation)
    del settings["rephrase"], settings["rephrase_cache_dir"]
    payload = {
        "format": RESULTS_FORMAT,
        "participants": {name: identity.to_dict() for name, identity in participants.items()},
        "questions": [dataclasses.asdict(item) for item in questions],
        "evaluation": settings,
        "link_mbit_per_s": link_mbit_per_s,
    }
    legacy = _digest({**payload, "batch_size": batch_size})  # how files written before this change were keyed
    parts = {"format": _digest(RESULTS_FORMAT), "questions": _digest(payload["questions"]),
             "link_mbit_per_s": _digest(link_mbit_per_s)}
    parts |= {f"participants.{name}": _digest(value) for name, value in payload["participants"].items()}
    parts |= {f"evaluation.{name}": _digest(value) for name, value in settings.items()}
    if precision != "32-true":  # fp32 results written before the setting existed stay valid
        parts["precision"] = _digest(precision)
    return Fingerprint(parts, legacy)


def rephrasing_fingerprint(evaluation: EvaluationConfig) -> str:
    """Hash of the rephrasing settings, which only shared and private cells depend on (the rephraser, the receiver,
    is in :func:`settings_fingerprint`)."""
    return _digest(dataclasses.asdict(evaluation.rephrase))


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StaleResultsError(ValueError):
    """A sweep's results file holds another setting's results; it is never overwritten silently."""


class ResultsFileError(ValueError):
    """A sweep's results file that is not one (hand-edited, truncated, another file): refused, naming row and field."""


#: Row fields that are fractions, and fields that are non-negative amounts, in an ``ok`` row.
_FRACTIONS = ("accuracy", "ci_low", "ci_high", "acc", "acc_norm")
_AMOUNTS = ("latency_s", "bytes_per_token", "bytes_per_question", "n_questions", "failed")


def check_results(previous: Any, path: Path) -> None:
    """Refuse a results file whose structure or rows are not what a sweep writes, naming the row and field."""
    fix = f"restore {path} (e.g. from git), or rerun with --fresh to move it aside"
    if not isinstance(previous, dict):
        raise ResultsFileError(f"{path} holds a JSON {type(previous).__name__}, not a sweep's results object: {fix}.")
    rows = previous.get("rows", [])
    if not isinstance(rows, list):
        raise ResultsFileError(f"{path}: rows is a {type(rows).__name__}, not a list: {fix}.")
    for index, row in enumerate(rows):
        problem = _row_problem(row)
        if problem:
            name = row.get("key", f"#{index}") if isinstance(row, dict) else f"#{index}"
            raise ResultsFileError(f"{path}: row {index} ({str(name)[:60]}) {problem}: {fix}.")


def _row_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"is a {type(row).__name__}, not an object"
    for field in ("key", "route", "query_mode", "status"):
        if not isinstance(row.get(field), str):
            return f"has no {field}" if field not in row else f"has a {field} that is not text"
    if row["status"] not in ("ok", "unsupported"):
        return f"has status {row['status'][:20]!r}; a sweep writes 'ok' or 'unsupported'"
    if row["status"] != "ok":
        return None
    for field in (*_FRACTIONS, *_AMOUNTS):
        if field not in row and field in ("accuracy", "ci_low", "ci_high"):
            return f"has no {field}"
        value = row.get(field, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"has {field} {str(value)[:20]!r}, not a finite number"
        if value < 0 or (field in _FRACTIONS and value > 1):
            return f"has {field} {value}, outside " + ("[0, 1]" if field in _FRACTIONS else "[0, inf)")
    return None


def result_row(cell: Route, report: EvaluationReport, link_mbit_per_s: float, commit: str | None) -> dict[str, Any]:
    """A cell's result row: accuracy and interval, latency per question and stage (s), bytes, and the ``commit``
    of the code that computed it."""
    summary = report.rows()[0]
    stages = {stage: summary.get(f"{stage}_ms", 0.0) / 1000 for stage in STAGES}
    if "transfer_ms" not in summary:  # in-process senders: the transfer is modelled at the link's rate
        stages["transfer"] = summary["bytes_per_question"] * 8 / (link_mbit_per_s * 1e6)
    return {
        **cell_fields(cell),
        "status": "ok",
        "accuracy": summary["accuracy"],
        "ci_low": summary["ci_low"],
        "ci_high": summary["ci_high"],
        **{key: summary[key] for key in ("acc", "acc_norm") if key in summary},  # cloze: lm-eval's two accuracies
        "latency_s": sum(stages.values()),
        **{f"{stage}_s": seconds for stage, seconds in stages.items()},
        "bytes_per_token": summary["bytes_per_token"],
        "sender_bytes_per_token": summary["sender_bytes_per_token"],
        "bytes_per_question": summary["bytes_per_question"],
        "leakage_overlap": summary["leakage_overlap"],
        "leakage_private_tokens": summary["leakage_private_tokens"],
        "rephrasings_unfaithful": summary["rephrasings_unfaithful"],
        "transport_bytes_per_question": summary["transport_bytes_per_question"],
        "senders_dropped": summary["senders_dropped"],
        "n_questions": summary["questions"],
        "failed": len(report.failures),
        "failed_ids": [question for question, _ in report.failures],
        "commit": commit,
    }


def unsupported_row(cell: Route, reason: str) -> dict[str, Any]:
    """The row of a cell that cannot run, with the reason."""
    return {**cell_fields(cell), "status": "unsupported", "reason": reason}


class SweepResultsFile:
    """``<output_dir>/<name>.json``: the finished rows of a sweep and what made them."""

    def __init__(self, path: Path, console: Console | None = None) -> None:
        self.path, self.console = path, console or Console()

    def load(self, header: dict[str, Any], fresh: bool = False) -> dict[str, dict[str, Any]]:
        """Finished rows (by cell key) of an earlier run with the same fingerprint.

        A file made with other questions, participants, fusers or settings is refused unless ``fresh``;
        with ``fresh`` any earlier file is moved aside (never deleted) and the sweep starts over.
        """
        if not self.path.is_file():
            return {}
        try:
            previous = json.loads(self.path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            previous = {"unreadable": str(err)}
        if not fresh:
            check_results(previous, self.path)
        if self._same(previous, header) and not fresh:  # it covers the results format too
            rows = previous.get("rows", [])  # rows from before per-row commits were recorded get the file's commit
            rows = [{"commit": previous.get("commit"), **r} if r["status"] == "ok" else r for r in rows]
            return {r["key"]: r for r in self._still_valid(rows, previous, header)}
        if not fresh:
            raise StaleResultsError(
                f"{self.path} holds the results of another sweep ({self.differences(previous, header)}). Rerun with "
                f"--fresh to move it aside and start over, or set --name or --output_dir to keep both."
            )
        aside = self.move_aside(previous.get("commit") if isinstance(previous, dict) else None)
        self.console.print(f"[yellow]--fresh: moved the earlier results to {', '.join(map(str, aside))}.[/]")
        return {}

    @staticmethod
    def _same(previous: dict[str, Any], header: dict[str, Any]) -> bool:
        """Whether ``previous`` was made with the settings of ``header`` (files from before the batch size left the
        fingerprint match its ``legacy`` digest)."""
        fingerprint = header["fingerprint"]
        return isinstance(previous, dict) and previous.get("fingerprint") in (fingerprint, getattr(fingerprint, "legacy", None))

    def _still_valid(self, rows: list[dict[str, Any]], previous: dict[str, Any], header: dict[str, Any]) -> list[dict[str, Any]]:
        """``rows`` less those whose inputs changed since they were computed, with a line saying what re-runs: the
        cells of a fusion mode whose fusers or gate changed (and the adaptive cell, which may use any mode's), and
        the cells of rephrased query modes when the rephrasing settings changed."""
        before = previous.get("fusion_fingerprints") or {}
        changed = sorted(mode for mode, now in header.get("fusion_fingerprints", {}).items() if before.get(mode) != now)
        stale_routes = {f"c2c.{mode}" for mode in changed} | ({"adaptive"} if changed else set())
        rephrasing_changed = previous.get("rephrasing_fingerprint") != header.get("rephrasing_fingerprint")
        kept = [r for r in rows if r["route"] not in stale_routes and not (rephrasing_changed and r["query_mode"] != "original")]
        if len(kept) < len(rows):
            reasons = [f"the fusers or gate of {', '.join(f'c2c.{m}' for m in changed)}"] if changed else []
            reasons += ["the rephrasing settings (shared and private cells)"] if rephrasing_changed else []
            self.console.print(
                f"[yellow]{' and '.join(reasons).capitalize()} changed since {self.path} was written: its "
                f"{len(rows) - len(kept)} cells run again, the other {len(kept)} are kept.[/]"
            )
        return kept

    def check_settings(self, header: dict[str, Any]) -> None:
        """Refuse early (before any fuser is trained) when the settings in the header already differ from the
        earlier file's; the fingerprint is compared later, in :meth:`load`."""
        if not self.path.is_file():
            return
        try:
            previous = json.loads(self.path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            return  # load() says so, with the fix
        check_results(previous, self.path)
        changed = [k for k in header if k not in (*_PROVENANCE, *_FINGERPRINTS) and previous.get(k) != header[k]]
        if changed:
            raise StaleResultsError(
                f"{self.path} holds the results of another sweep ({self.differences(previous, header)}). Rerun with "
                f"--fresh to move it aside and start over, or set --name or --output_dir to keep both."
            )

    @staticmethod
    def differences(previous: dict[str, Any], header: dict[str, Any]) -> str:
        if "unreadable" in previous:
            return f"it is not valid JSON: {previous['unreadable']}"
        changed = [k for k in header if k not in (*_PROVENANCE, *_FINGERPRINTS) and previous.get(k) != header[k]]
        if changed:
            return "differs in " + ", ".join(f"{k}: {previous.get(k)!r} -> {header[k]!r}" for k in changed)
        parts, before = getattr(header.get("fingerprint"), "parts", {}), previous.get("fingerprint_parts")
        if isinstance(before, dict) and parts:
            differing = sorted(set(parts) ^ set(before) | {p for p in parts if before.get(p) != parts[p]})
            if differing:
                return f"same header, but other {', '.join(_PART_NAMES.get(p, p) for p in differing)}"
        return ("same header, but other questions, participants, evaluation settings or results format (the file "
                "predates per-setting fingerprints, so which one cannot be told)")

    def move_aside(self, commit: str | None) -> list[Path]:
        """Rename ``<name>.json`` and its ``.csv`` / ``.md`` tables to ``<name>.stale-<commit>-<time>.*``."""
        stamp = f"stale-{(commit or 'unknown')[:7]}-{time.strftime('%Y%m%d-%H%M%S')}"
        moved = []
        for suffix in (".json", ".csv", ".md"):
            source = self.path.with_suffix(suffix)
            if source.is_file():
                moved.append(source.replace(source.with_name(f"{self.path.stem}.{stamp}{suffix}")))
        return moved

    def save(self, header: dict[str, Any], rows: Sequence[dict[str, Any]]) -> None:
        """Write the header and rows (atomically)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": RESULTS_FORMAT, **header, "rows": list(rows)}
        parts = getattr(header.get("fingerprint"), "parts", None)
        if parts:  # each setting's own digest, so that a later run can name the one that changed
            payload["fingerprint_parts"] = parts
        temporary = self.path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(payload, indent=2) + "\n")
        temporary.replace(self.path)
