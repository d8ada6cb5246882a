"""The benchmark runner behind ``fedrefine bench``: one receiver, a sweep of sender subsets, routes
(C2C residual, C2C concat, T2T) and query modes, on one evaluation set.

Every cell is evaluated on the same questions; its row (accuracy with a 95% interval, latency
per question and per stage, bytes per prompt token) is written to ``<output_dir>/<name>.json``
as soon as it finishes, so an interrupted sweep resumes where it stopped. Results are valid only
for the exact questions, participants and evaluation settings that made them (their fingerprint;
when any of those change, the sweep starts over), for C2C cells the fusers and gate of their fusion
mode (when those change, that mode's cells run again), and for shared / private cells the rephrasing
settings (when those change, those cells run again).
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import Logger
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedrefine.bench.cells import ROUTES, SubsetPolicy, check_sweep, expand_cells, unsupported_reason
from fedrefine.bench.fuser_training import FuserTraining, GateTraining
from fedrefine.bench.records import git_commit
from fedrefine.bench.results_file import (
    SweepResultsFile,
    rephrasing_fingerprint,
    result_row,
    settings_fingerprint,
    unsupported_row,
)
from fedrefine.bench.sweep_fusion import SweepFusion
from fedrefine.bench.sweep_report import write_reports
from fedrefine.data.datamodule import C2CDataModule
from fedrefine.data.question_dataset import QuestionDataset
from fedrefine.evaluation import EvaluationConfig, Evaluator, QueryPlanner
from fedrefine.federation import Federation
from fedrefine.fuser import Fuser, FuserConfig
from fedrefine.fuser.registry import FuserRegistry
from fedrefine.fusion import FusedReceiver
from fedrefine.participants import Participant
from fedrefine.participants.align import AlignedMessages
from fedrefine.participants.precision import cast_for_precision, precision_context, resolve_precision
from fedrefine.participants.sources import ParticipantSource
from fedrefine.privacy.rephrase import Rephraser
from fedrefine.settings import SettingsError
from fedrefine.tasks.routes import QUERY_MODES, Route


class BenchSweep:
    """A sweep of one receiver with sender subsets x routes x query modes (the FedRefine paper's Fig. 3).

    Args:
        participants: every participant, by name.
        receiver: the participant that answers.
        senders: the senders, in the order prefixes are taken.
        data: where the evaluation questions come from (its ``test_split`` unless ``split`` is given).
        registries: fuser registry directory per fusion mode (``residual``, ``concat``); C2C routes
            need the registry of their mode.
        gates: a gating network's directory per fusion mode (a ``FederationModule``'s ``export_dir``): that
            mode's C2C cells weigh their senders through it. Modes not named fuse ungated.
        routes: route families, any of ``c2c.residual``, ``c2c.concat``, ``t2t``.
        query_modes: any of ``original``, ``shared``, ``private``.
        subsets: ``prefixes`` (first k senders), ``all`` (every non-empty subset) or explicit lists.
        singles: also evaluate every single sender (point-to-point, Fig. 3b).
        gate_singles: single-sender cells of a gated mode go through the gate too (False: pairwise, through the
            sender's fuser alone; their rows say ``gated: false``).
        split: evaluation split (default: the data module's ``test_split``).
        num_questions: the first N questions of the split (None: all).
        batch_size: questions per batch.
        evaluation: answer mode, T2T prompt and budget, rephrasing and options policy.
        link_mbit_per_s: link speed that turns bytes sent into the modelled ``transfer`` stage.
        train_missing: train fusers missing from a registry (None: a missing fuser is an error).
        train_missing_gate: train a gate named in ``gates`` but missing there (None: a missing gate is an error).
        output_dir: where results, tables and plots are written.
        name: file stem of the results (``<name>.json/.csv/.md``).
        plot_prefix: file stem of the plots (``<plot_prefix>a.png``, ``b``, ``c``).
        logger: a logger with ``log_table`` / ``log_image`` (e.g. ``WandbLogger``, offline).
        device: where the models run (``auto``: CUDA when available).
        precision: ``32-true``, ``bf16-true``, ``bf16-mixed`` for receiver, senders and fusers (null: by the device).
    """

    def __init__(
        self,
        participants: dict[str, ParticipantSource],
        receiver: str,
        senders: list[str],
        data: C2CDataModule,
        registries: dict[str, str] | None = None,
        gates: dict[str, str] | None = None,
        routes: list[str] | None = None,
        query_modes: list[str] | None = None,
        subsets: SubsetPolicy | list[list[str]] = "prefixes",
        singles: bool = True,
        gate_singles: bool = True,
        split: str | None = None,
        num_questions: int | None = None,
        batch_size: int = 32,
        evaluation: EvaluationConfig | None = None,
        link_mbit_per_s: float = 100.0,
        train_missing: FuserTraining | None = None,
        train_missing_gate: GateTraining | None = None,
        output_dir: str = "benchmarks/results",
        name: str = "sweep",
        plot_prefix: str = "fig3",
        logger: Logger | None = None,
        device: str = "cpu",
        precision: str | None = None,
    ) -> None:
        check_sweep(list(participants), receiver, senders, link_mbit_per_s, num_questions, batch_size)
        self.receiver_name, self.sender_names = receiver, list(senders)
        self.data, self.split, self.num_questions, self.batch_size = data, split, num_questions, batch_size
        self.federation = Federation(participants, registry=None)  # each fusion mode has its own registry
        self.console = Console()
        self.fusion = SweepFusion(self.federation, receiver, senders, registries, gates, train_missing, train_missing_gate,
                                  gate_singles, self.console)
        self.cells = expand_cells(senders, routes or list(ROUTES), query_modes or list(QUERY_MODES), subsets, singles)
        self.evaluation = evaluation or EvaluationConfig()
        self.link_mbit_per_s = link_mbit_per_s
        self.output_dir, self.name, self.plot_prefix = Path(output_dir), name, plot_prefix
        self.logger, self.device = logger, torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                                        "cpu" if device == "auto" else device)
        self.precision = resolve_precision(precision, self.device)
        self._models: dict[tuple[str | None, bool], FusedReceiver] = {}
        self._planner: QueryPlanner | None = None
        self.commit = git_commit()  # the code this sweep runs, read once: the tree may change while it runs

    # --- participants, fusers, questions --------------------------------------------------------
    def participant(self, name: str) -> Participant:
        return self.federation.participant(name)

    @property
    def fusion_modes(self) -> list[str]:
        """Fusion modes the sweep's C2C cells need, in sweep order."""
        return list(dict.fromkeys(c.fusion for c in self.cells if c.fusion))

    @property
    def registries(self) -> dict[str, FuserRegistry]:
        return self.fusion.registries

    def prepare_fusers(self) -> None:
        """Make sure every fuser and named gate the C2C cells need exists (training the missing ones)."""
        self.fusion.prepare(self.fusion_modes)

    def model(self, mode: str | None, gated: bool = True) -> FusedReceiver:
        """The receiver with every sender: through ``mode``'s fusers (weighed by its gate, if any, when ``gated``),
        or (None) for routes without fusion."""
        mode = self._mode(mode)
        key = (mode, gated and mode in self.fusion.gates)
        if key not in self._models:
            if mode is None:  # receiver / T2T only: fusers are never called, any will do
                receiver = self.participant(self.receiver_name)
                senders = [self.participant(n) for n in self.sender_names]
                fusers = [Fuser(s.identity, receiver.identity, FuserConfig(hidden_size=8, num_blocks=2)) for s in senders]
                model = FusedReceiver(receiver, senders, fusers, sender_names=self.sender_names)
            else:
                model = self.fusion.receiver(mode, gated)
            self._models[key] = cast_for_precision(model, self.precision).to(self.device).eval()
        return self._models[key]

    def _mode(self, fusion: str | None) -> str | None:
        """A cell's fusion mode: its own, or the sweep's first (None: the sweep fuses nothing)."""
        return fusion or (self.fusion_modes[0] if self.fusion_modes else None)

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
        """Hash of everything every cell's result depends on (see :func:`settings_fingerprint`)."""
        participants = {n: self.participant(n).identity for n in (self.receiver_name, *self.sender_names)}
        return settings_fingerprint(participants, questions.items, self.evaluation, self.batch_size, self.link_mbit_per_s,
                                    self.precision)

    # --- cells ----------------------------------------------------------------------------------
    def aligned_messages(self, cell: Route) -> AlignedMessages:
        """Which messages a C2C cell's fusers align (``last``: last-token fusers, which run in private mode too)."""
        if cell.kind != "c2c" or (cell.fusion or "residual") not in self.fusion_modes:
            return "all"
        return self.model(cell.fusion).strategy.aligned_messages

    def evaluate(self, cell: Route, questions: QuestionDataset) -> dict[str, Any]:
        """Run one cell on every question; returns its result row (a C2C cell of a gated mode says whether it went
        through the gate: ``gated``)."""
        mode = self._mode(cell.fusion) if cell.kind == "c2c" else None
        gated = self.fusion.gated(mode, len(cell.senders))
        model = self.model(cell.fusion, gated)
        evaluator = Evaluator(model, [cell.resolve(model.sender_names)], self.evaluation, self.planner)
        with precision_context(self.precision, self.device):
            row = result_row(cell, evaluator.run(questions, self.batch_size, self.device), self.link_mbit_per_s, self.commit)
        return {**row, "gated": gated} if mode in self.fusion.gates else row

    def header(self, fingerprint: str | None, command: str, fusion_fingerprints: dict[str, str] | None = None) -> dict[str, Any]:
        """What the results file records besides its rows."""
        return {
            "name": self.name,
            "fingerprint": fingerprint,
            "fusion_fingerprints": fusion_fingerprints or {},
            "rephrasing_fingerprint": rephrasing_fingerprint(self.evaluation),
            "command": command,
            "commit": self.commit,
            "receiver": self.receiver_name,
            "senders": self.sender_names,
            "answer_mode": self.evaluation.answer_mode,
            "link_mbit_per_s": self.link_mbit_per_s,
            "device": str(self.device), **({} if self.precision == "32-true" else {"precision": self.precision}),
        }

    def run(self, fresh: bool = False, command: str | None = None, rerun: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Evaluate every unfinished cell, then write tables and plots. Results of another setting are refused,
        or with ``fresh`` moved aside (see :meth:`SweepResultsFile.load`). ``rerun``: cell keys or shell patterns
        (``*@private``) of finished cells to evaluate again, e.g. after a fix that no setting records."""
        unmatched = [p for p in rerun if not _matching([str(c) for c in self.cells], [p])]
        if unmatched:
            raise SettingsError(f"--rerun {unmatched} names no cell of this sweep; cells are named like {str(self.cells[-1])!r}.")
        command = command or " ".join(["fedrefine", *sys.argv[1:]])
        results = SweepResultsFile(self.output_dir / f"{self.name}.json", self.console)
        if not fresh:  # before training missing fusers: settings that differ are known already
            results.check_settings(self.header(None, command))
        self.prepare_fusers()
        questions = self.questions()
        if not len(questions):
            raise SettingsError(f"The evaluation split {self.split or self.data.test_split!r} has no questions.")
        header = self.header(self.fingerprint(questions), command, self.fusion.fingerprints(self.fusion_modes))
        rows = results.load(header, fresh=fresh)
        if again := _matching(list(rows), rerun):
            rows = {key: row for key, row in rows.items() if key not in again}
            self.console.print(f"[yellow]--rerun: {len(again)} finished cells run again.[/]")
        done = sum(str(c) in rows for c in self.cells)
        if done:
            self.console.print(f"Resuming: {done} of {len(self.cells)} cells already finished in {results.path}.")
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console) as progress:
            task = progress.add_task("cells", total=len(self.cells), completed=done)
            for cell in self.cells:
                if str(cell) in rows:
                    continue
                progress.update(task, description=f"{cell} ({len(questions)} questions)")
                reason = unsupported_reason(cell, self.evaluation.options, self.aligned_messages(cell))
                rows[str(cell)] = unsupported_row(cell, reason) if reason else self.evaluate(cell, questions)
                results.save(header, [rows[str(c)] for c in self.cells if str(c) in rows])
                progress.advance(task)
        results.save(header, [rows[str(c)] for c in self.cells])
        ordered = [rows[str(c)] for c in self.cells]
        write_reports(
            ordered, self.output_dir, self.name, self.plot_prefix, self.receiver_name, self.sender_names, command,
            self.commit, self.logger, self.console,
        )
        return ordered


def _matching(keys: list[str], patterns: Sequence[str]) -> list[str]:
    """The keys that match any of the shell patterns (a key is a pattern matching itself)."""
    return [key for key in keys if any(fnmatch.fnmatchcase(key, p) for p in patterns)]
