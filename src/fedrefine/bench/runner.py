"""The benchmark runner behind ``fedrefine bench``: one receiver, a sweep of sender subsets, routes
(C2C residual, C2C concat, T2T) and query modes, on one evaluation set.

Every cell is evaluated on the same questions; its row (accuracy with a 95% interval, latency
per question and per stage, bytes per prompt token) is written to ``<output_dir>/<name>.json``
as soon as it finishes, so an interrupted sweep resumes where it stopped. Results are valid only
for the exact questions, participants, fusers and evaluation settings that made them (their
fingerprint); when any of those change, the sweep starts over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import Logger
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedrefine.bench.records import git_commit
from fedrefine.bench.sweep import ROUTES, Cell, SubsetPolicy, expand_cells
from fedrefine.cli import build_cli
from fedrefine.data.module import C2CDataModule
from fedrefine.data.multiple_choice import QuestionDataset
from fedrefine.evaluation import EvaluationConfig, QueryPlanner, RouteTally, encode_questions, parse_route, run_route
from fedrefine.federation import Federation
from fedrefine.fuser import WEIGHTS_FILE, Fuser, FuserConfig
from fedrefine.fusion import FusedReceiver
from fedrefine.participants import Participant
from fedrefine.privacy import MODES, Rephraser
from fedrefine.registry import FuserRegistry
from fedrefine.sources import ParticipantSource

#: Latency stages, in pipeline order; ``transfer`` is modelled from the bytes sent and the link speed.
STAGES: tuple[str, ...] = ("rephrase", "sender", "transfer", "fuse", "receiver")
RESULTS_FORMAT = 1


@dataclass
class FuserTraining:
    """How the runner trains a fuser missing from a registry: ``fedrefine fit`` with a config.

    Args:
        config: the ``fedrefine fit`` config (its receiver and senders must be the sweep's participants).
        sender_args: extra CLI overrides per sender name (e.g. which participant is the sender).
        args: overrides for every run.
        mode_arg: the override that sets the fusion mode.
        root: where training runs are written.
    """

    config: str
    sender_args: dict[str, list[str]] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    mode_arg: str = "--model.fuser.mode"
    root: str = "runs/bench/fusers"

    def fit(self, sender: str, mode: str) -> Path:
        """Train F[sender -> receiver] in ``mode``; returns the exported fuser directory."""
        directory = Path(self.root) / f"{mode}-{sender}"
        build_cli([
            "fit", "--config", self.config, *self.args, *self.sender_args.get(sender, []), self.mode_arg, mode,
            "--trainer.default_root_dir", str(directory), "--model.export_dir", str(directory / "fuser"),
        ])
        return directory / "fuser"


class BenchSweep:
    """A sweep of one receiver with sender subsets x routes x query modes (the FedRefine paper's Fig. 3).

    Args:
        participants: every participant, by name.
        receiver: the participant that answers.
        senders: the senders, in the order prefixes are taken.
        data: where the evaluation questions come from (its ``test_split`` unless ``split`` is given).
        registries: fuser registry directory per fusion mode (``residual``, ``concat``); C2C routes
            need the registry of their mode.
        routes: any of ``c2c_residual``, ``c2c_concat``, ``t2t``.
        query_modes: any of ``original``, ``shared``, ``private``.
        subsets: ``prefixes`` (first k senders), ``all`` (every non-empty subset) or explicit lists.
        singles: also evaluate every single sender (point-to-point, Fig. 3b).
        split: evaluation split (default: the data module's ``test_split``).
        num_questions: the first N questions of the split (None: all).
        batch_size: questions per batch.
        evaluation: answer mode, T2T prompt and budget, rephrasing and options policy.
        link_mbit_per_s: link speed that turns bytes sent into the modelled ``transfer`` stage.
        train_missing: train fusers missing from a registry (None: a missing fuser is an error).
        output_dir: where results, tables and plots are written.
        name: file stem of the results (``<name>.json/.csv/.md``).
        plot_prefix: file stem of the plots (``<plot_prefix>a.png``, ``b``, ``c``).
        logger: a logger with ``log_table`` / ``log_image`` (e.g. ``WandbLogger``, offline).
        device: where the models run (``auto``: CUDA when available).
    """

    def __init__(
        self,
        participants: dict[str, ParticipantSource],
        receiver: str,
        senders: list[str],
        data: C2CDataModule,
        registries: dict[str, str] | None = None,
        routes: list[str] | None = None,
        query_modes: list[str] | None = None,
        subsets: SubsetPolicy | list[list[str]] = "prefixes",
        singles: bool = True,
        split: str | None = None,
        num_questions: int | None = None,
        batch_size: int = 32,
        evaluation: EvaluationConfig | None = None,
        link_mbit_per_s: float = 100.0,
        train_missing: FuserTraining | None = None,
        output_dir: str = "benchmarks/results",
        name: str = "sweep",
        plot_prefix: str = "fig3",
        logger: Logger | None = None,
        device: str = "cpu",
    ) -> None:
        missing = [n for n in (receiver, *senders) if n not in participants]
        if missing:
            raise ValueError(f"Sweep names participants {missing} that are not in `participants` ({sorted(participants)}).")
        if receiver in senders:
            raise ValueError(f"The receiver {receiver!r} cannot also be a sender.")
        if link_mbit_per_s <= 0:
            raise ValueError(f"link_mbit_per_s must be positive, got {link_mbit_per_s}.")
        self.receiver_name, self.sender_names = receiver, list(senders)
        self.data, self.split, self.num_questions, self.batch_size = data, split, num_questions, batch_size
        self.registries = {mode: FuserRegistry(path) for mode, path in (registries or {}).items()}
        unknown_modes = sorted(set(self.registries) - {"residual", "concat"})
        if unknown_modes:
            raise ValueError(f"Registries are keyed by fusion mode 'residual' or 'concat', got {unknown_modes}.")
        self.federation = Federation(participants, registry=None)  # each fusion mode has its own registry
        self.cells = expand_cells(senders, routes or list(ROUTES), query_modes or list(MODES), subsets, singles)
        self.evaluation = evaluation or EvaluationConfig()
        self.link_mbit_per_s, self.train_missing = link_mbit_per_s, train_missing
        self.output_dir, self.name, self.plot_prefix = Path(output_dir), name, plot_prefix
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.logger, self.device = logger, torch.device(device)
        self.console = Console()
        self._models: dict[str | None, FusedReceiver] = {}
        self._planner: QueryPlanner | None = None

    # --- participants, fusers, questions --------------------------------------------------------
    def participant(self, name: str) -> Participant:
        return self.federation.participant(name)

    @property
    def fusion_modes(self) -> list[str]:
        """Fusion modes the sweep's C2C cells need, in sweep order."""
        return list(dict.fromkeys(c.fusion_mode for c in self.cells if c.fusion_mode))

    def registry(self, mode: str) -> FuserRegistry:
        if mode not in self.registries:
            raise ValueError(f"Route c2c_{mode} needs a fuser registry: set registries.{mode} to a directory.")
        return self.registries[mode]

    def prepare_fusers(self) -> None:
        """Make sure every (sender -> receiver) fuser the C2C cells need is in its registry (training missing ones)."""
        receiver = self.participant(self.receiver_name)
        for mode in self.fusion_modes:
            registry = self.registry(mode)
            for name in self.sender_names:
                sender = self.participant(name)
                if registry.has(sender.identity, receiver.identity):
                    continue
                if self.train_missing is None:
                    registry.get(sender.identity, receiver.identity)  # raises MissingFuserError with the fix
                self.console.print(f"[bold]Training the missing fuser[/] {name} -> {self.receiver_name} ({mode})")
                path = self.train_missing.fit(name, mode)
                registry.save(Fuser.load(path, sender.identity, receiver.identity))

    def model(self, mode: str | None) -> FusedReceiver:
        """The receiver with every sender: through ``mode``'s fusers, or (None) for routes without fusion."""
        mode = mode or (self.fusion_modes[0] if self.fusion_modes else None)
        if mode not in self._models:
            if mode is None:  # receiver / T2T only: fusers are never called, any will do
                receiver = self.participant(self.receiver_name)
                senders = [self.participant(n) for n in self.sender_names]
                fusers = [Fuser(s.identity, receiver.identity, FuserConfig(hidden_size=8, num_blocks=2)) for s in senders]
                model = FusedReceiver(receiver, senders, fusers, sender_names=self.sender_names)
            else:
                model = self.federation.receiver(self.receiver_name, self.sender_names, registry=self.registry(mode))
            self._models[mode] = model.to(self.device).eval()
        return self._models[mode]

    def questions(self) -> QuestionDataset:
        """The evaluation questions (the first ``num_questions`` of the split)."""
        self.data.num_questions = self.num_questions
        self.data.prepare_data()
        return self.data.load_split(self.split or self.data.test_split)

    @property
    def planner(self) -> QueryPlanner:
        """One rephraser for all cells, so every cell reads the same rephrasings (generated once)."""
        if self._planner is None:
            config = self.evaluation
            rephraser = Rephraser(self.participant(self.receiver_name), config.rephrase, config.rephrase_cache_dir)
            self._planner = QueryPlanner(rephraser, config.options)
        return self._planner

    def fingerprint(self, questions: QuestionDataset) -> str:
        """Hash of everything a cell's result depends on except the cell itself."""
        digest = hashlib.sha256()
        payload = {
            "format": RESULTS_FORMAT,
            "participants": {n: self.participant(n).identity.to_dict() for n in (self.receiver_name, *self.sender_names)},
            "questions": [dataclasses.asdict(item) for item in questions.items],
            "evaluation": dataclasses.asdict(self.evaluation),
            "batch_size": self.batch_size,
            "link_mbit_per_s": self.link_mbit_per_s,
        }
        digest.update(json.dumps(payload, sort_keys=True, default=str).encode())
        receiver = self.participant(self.receiver_name)
        for mode in self.fusion_modes:
            for name in self.sender_names:
                directory = self.registry(mode).directory_for(self.participant(name).identity, receiver.identity)
                digest.update(mode.encode() + name.encode() + (directory / WEIGHTS_FILE).read_bytes())
        return digest.hexdigest()[:16]

    # --- cells ----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, cell: Cell, questions: QuestionDataset) -> dict[str, Any]:
        """Run one cell on every question; returns its result row."""
        model = self.model(cell.fusion_mode)
        route = parse_route(cell.evaluation_route, model.sender_names)
        config = self.evaluation
        tally, failures = RouteTally(), []
        for start in range(0, len(questions), self.batch_size):
            chunk = [questions[i] for i in range(start, min(start + self.batch_size, len(questions)))]
            batch = encode_questions(model, chunk, [route], config.answer_mode, self.planner, config.prefill_answer)
            batch = batch.to(self.device)
            failures.extend(batch.ids[row] for row in batch.failures)
            result = run_route(
                model, batch, route, config.answer_mode, config.max_new_tokens, planner=self.planner, t2t=config.t2t
            )
            tally.add(result, batch.labels)
        return self.row(cell, tally, failures)

    def row(self, cell: Cell, tally: RouteTally, failures: Sequence[str]) -> dict[str, Any]:
        """A cell's result row: accuracy and interval, latency per question and stage (s), bytes."""
        summary = tally.row()
        stages = {stage: summary.get(f"{stage}_ms", 0.0) / 1000 for stage in STAGES}
        stages["transfer"] = summary["bytes_per_question"] * 8 / (self.link_mbit_per_s * 1e6)
        return {
            **cell_fields(cell),
            "status": "ok",
            "accuracy": summary["accuracy"],
            "ci_low": summary["ci_low"],
            "ci_high": summary["ci_high"],
            "latency_s": sum(stages.values()),
            **{f"{stage}_s": seconds for stage, seconds in stages.items()},
            "bytes_per_token": summary["bytes_per_token"],
            "sender_bytes_per_token": summary["sender_bytes_per_token"],
            "bytes_per_question": summary["bytes_per_question"],
            "leakage_overlap": summary["leakage_overlap"],
            "n_questions": summary["questions"],
            "failed": len(failures),
            "failed_ids": list(failures),
            "commit": git_commit(),
        }

    @staticmethod
    def unsupported_row(cell: Cell, reason: str) -> dict[str, Any]:
        return {**cell_fields(cell), "status": "unsupported", "reason": reason}

    # --- the sweep ------------------------------------------------------------------------------
    @property
    def results_path(self) -> Path:
        return self.output_dir / f"{self.name}.json"

    def load_previous(self, fingerprint: str) -> dict[str, dict[str, Any]]:
        """Finished rows of an earlier run of this sweep with the same fingerprint (resume)."""
        if not self.results_path.is_file():
            return {}
        previous = json.loads(self.results_path.read_text())
        if previous.get("fingerprint") != fingerprint:
            self.console.print(
                f"[yellow]{self.results_path} was made with other questions, participants, fusers or settings; "
                "starting the sweep over.[/]"
            )
            return {}
        rows = previous.get("rows", [])  # rows from before per-row commits were recorded get the file's commit
        return {r["key"]: {"commit": previous.get("commit"), **r} if r["status"] == "ok" else r for r in rows}

    def save(self, rows: dict[str, dict[str, Any]], fingerprint: str, command: str) -> None:
        """Write every finished row (atomically), in sweep order."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        ordered = [rows[c.key] for c in self.cells if c.key in rows]
        payload = {
            "format": RESULTS_FORMAT,
            "name": self.name,
            "fingerprint": fingerprint,
            "command": command,
            "commit": git_commit(),
            "receiver": self.receiver_name,
            "senders": self.sender_names,
            "answer_mode": self.evaluation.answer_mode,
            "link_mbit_per_s": self.link_mbit_per_s,
            "device": str(self.device),
            "rows": ordered,
        }
        temporary = self.results_path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(payload, indent=2) + "\n")
        temporary.replace(self.results_path)

    def run(self, fresh: bool = False, command: str | None = None) -> list[dict[str, Any]]:
        """Evaluate every unfinished cell (all of them with ``fresh``), then write tables and plots."""
        from fedrefine.bench.report import write_reports  # matplotlib is only needed here

        command = command or " ".join(["fedrefine", *sys.argv[1:]])
        self.prepare_fusers()
        questions = self.questions()
        if not len(questions):
            raise ValueError(f"The evaluation split {self.split or self.data.test_split!r} has no questions.")
        fingerprint = self.fingerprint(questions)
        rows = {} if fresh else self.load_previous(fingerprint)
        done = sum(c.key in rows for c in self.cells)
        if done:
            self.console.print(f"Resuming: {done} of {len(self.cells)} cells already finished in {self.results_path}.")
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console) as progress:
            task = progress.add_task("cells", total=len(self.cells), completed=done)
            for cell in self.cells:
                if cell.key in rows:
                    continue
                progress.update(task, description=f"{cell.key} ({len(questions)} questions)")
                reason = cell.unsupported_reason(self.evaluation.options)
                rows[cell.key] = self.unsupported_row(cell, reason) if reason else self.evaluate(cell, questions)
                self.save(rows, fingerprint, command)
                progress.advance(task)
        self.save(rows, fingerprint, command)
        ordered = [rows[c.key] for c in self.cells]
        write_reports(self, ordered, command)
        return ordered


def cell_fields(cell: Cell) -> dict[str, Any]:
    """The columns that name a cell in its result row."""
    return {"key": cell.key, "route": cell.route, "query_mode": cell.query_mode, "senders": "+".join(cell.senders),
            "n_senders": len(cell.senders)}
