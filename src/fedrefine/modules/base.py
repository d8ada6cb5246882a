"""Shared machinery of FedRefine's LightningModules.

Frozen participants, checkpoints that hold only the trainable weights (fusers, gating network)
and training state, the optimizer and schedule, batch encoding hooks, and the evaluation
tables of ``validate`` / ``test``.
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from fedrefine.batching import FusionBatch
from fedrefine.data.chat import ChatExample
from fedrefine.data.multiple_choice import QuestionWithControls
from fedrefine.evaluation import (
    EvaluationConfig,
    QueryPlanner,
    QuestionBatch,
    Route,
    RouteTally,
    encode_questions,
    parse_route,
    run_route,
)
from fedrefine.fuser import Fuser, FuserConfig, FuserPairMismatchError
from fedrefine.fusion import FusedReceiver, encode_response
from fedrefine.participants import Participant
from fedrefine.privacy import Rephraser
from fedrefine.selection import SenderSelection

# The frozen LLMs stay in eval mode on purpose, and batches are encoded by the module (it knows the
# tokenizers): Lightning's warnings about both are expected here.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r".*overridden `(on_before_batch_transfer|transfer_batch_to_device)`.*")

MAX_OPTIONS = 26


class FusionModule(L.LightningModule):
    """Shared machinery: frozen participants, trainable-only checkpoints, optimizer, evaluation tables.

    Subclasses set ``self.fused`` (the :class:`FusedReceiver` evaluated by ``validate``/``test``)
    and implement ``encode_chat_batch`` and ``training_step``.
    """

    #: state-dict prefixes of the trainable parts; everything else is frozen and never saved.
    trainable_prefixes: tuple[str, ...] = ("fused.fusers.", "fused.source_gate.")

    def __init__(
        self,
        learning_rate: float,
        weight_decay: float,
        warmup_fraction: float,
        max_length: int,
        evaluation: EvaluationConfig | None,
        export_dir: str | None,
        default_test_routes: Sequence[str] = ("receiver", "sender", "c2c"),
    ) -> None:
        super().__init__()
        self.learning_rate, self.weight_decay, self.warmup_fraction = learning_rate, weight_decay, warmup_fraction
        self.max_length = max_length
        self.evaluation = evaluation or EvaluationConfig()
        self.answer_mode, self.max_new_tokens = self.evaluation.answer_mode, self.evaluation.max_new_tokens
        self.test_route_names = tuple(self.evaluation.test_routes or default_test_routes)
        self.val_route_names = tuple(self.evaluation.val_routes)
        self.export_dir = export_dir
        self._planner: QueryPlanner | None = None
        self.data_counts: dict[str, int] = defaultdict(int)
        self._reset_evaluation()

    def save_plain_hyperparameters(
        self, sources: dict[str, Any], configs: dict[str, Any], ignore: Sequence[str] = ()
    ) -> None:
        """``save_hyperparameters`` of the calling ``__init__``, with participant sources and config
        dataclasses as plain values, so that checkpoints load with ``torch.load(weights_only=True)``."""
        frame = inspect.currentframe().f_back
        self.save_hyperparameters(ignore=[*sources, *configs, *ignore, "evaluation"], frame=frame)
        self.hparams.update({name: source.describe() for name, source in sources.items()})
        self.hparams.update({name: None if c is None else asdict(c) for name, c in configs.items()})
        self.hparams["evaluation"] = asdict(self.evaluation)

    # --- frozen participants, trainable-only checkpoints ----------------------------------------
    def frozen_models(self) -> list[torch.nn.Module]:
        return [m for m in self.modules() if getattr(m, "_is_fedrefine_participant", False)]

    def train(self, mode: bool = True) -> FusionModule:
        """Only fusers and gates ever enter train mode; the LLMs stay in eval mode (no dropout)."""
        super().train(mode)
        for model in self.frozen_models():
            model.eval()
        return self

    def _is_trainable_key(self, key: str) -> bool:
        return key.startswith(self.trainable_prefixes)

    def state_dict(self, *args: Any, **kwargs: Any):
        """Only the trainable weights: checkpoints never hold the frozen LLMs."""
        full = super().state_dict(*args, **kwargs)
        return OrderedDict((k, v) for k, v in full.items() if self._is_trainable_key(k))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load trainable weights; with ``strict`` every trainable key must be present and nothing else."""
        expected = set(self.state_dict())
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if strict and (missing or unexpected):
            raise KeyError(
                f"Checkpoint does not match this module's fusers: missing {missing[:5]}, unexpected {unexpected[:5]}."
            )
        # The frozen LLM weights are absent from checkpoints by design; only they are left out here.
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def fuser_metadata(self) -> list[dict[str, Any]]:
        return [fuser.metadata() for fuser in self.modules() if isinstance(fuser, Fuser)]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["fedrefine_fusers"] = self.fuser_metadata()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("fedrefine_fusers")
        if saved is None:
            raise KeyError("Checkpoint has no 'fedrefine_fusers' metadata; it was not written by FedRefine.")
        pairs = lambda entries: [(e["sender"], e["receiver"]) for e in entries]  # noqa: E731
        if pairs(saved) != pairs(self.fuser_metadata()):
            describe = lambda entries: ", ".join(  # noqa: E731
                f"{s['name_or_path']}@{s['revision']} -> {r['name_or_path']}@{r['revision']}" for s, r in pairs(entries)
            )
            raise FuserPairMismatchError(
                f"Checkpoint is for {describe(saved)}, but this run's pairs are {describe(self.fuser_metadata())}. "
                f"Use the checkpoint of this pair."
            )

    # --- batches --------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: list, dataloader_idx: int):
        if not batch:
            raise ValueError("Empty batch.")
        if isinstance(batch[0], ChatExample):
            return self.encode_chat_batch(batch)
        if isinstance(batch[0], QuestionWithControls):
            routes = self.test_routes() if self.trainer.testing else self.val_routes()
            return encode_questions(self.fused, batch, routes, self.answer_mode, self.planner, self.evaluation.prefill_answer)
        if isinstance(batch[0], str):
            return batch
        raise TypeError(f"Unsupported batch element {type(batch[0]).__name__}.")

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        if isinstance(batch, dict):
            return {k: self.transfer_batch_to_device(v, device, dataloader_idx) for k, v in batch.items()}
        if hasattr(batch, "to") and not isinstance(batch, Tensor):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def encode_chat_batch(self, examples: Sequence[ChatExample]) -> FusionBatch | None:
        """Encode conversations for the receiver and its senders; too-long ones are truncated or dropped (counted)."""
        return self.encode_for(self.fused, examples)

    def encode_for(self, model: FusedReceiver, examples: Sequence[ChatExample]) -> FusionBatch | None:
        encoded, lengths = [], []
        for example in examples:
            fusion_example = model.encode(example.messages)
            lengths.append(len(fusion_example.receiver_ids))
            response = self.truncate(lengths[-1], encode_response(model.receiver, example.response))
            if response is not None:
                fusion_example.response_ids = response
                encoded.append(fusion_example)
        self.check_not_all_dropped(len(encoded), lengths)
        return model.collate(encoded) if encoded else None

    def truncate(self, prompt_length: int, response: list[int]) -> list[int] | None:
        """Fit a response after a prompt within ``max_length``: truncate it (counted) or drop the sample (counted)."""
        room = self.max_length - prompt_length
        if room < 1:
            self.data_counts["dropped_prompt_too_long"] += 1
            return None
        if len(response) > room:
            self.data_counts["truncated_responses"] += 1
            self.data_counts["truncated_response_tokens"] += len(response) - room
            return response[:room]
        return response

    def check_not_all_dropped(self, kept: int, prompt_lengths: Sequence[int]) -> None:
        if not kept and not self.data_counts["train_samples"]:
            raise ValueError(
                f"model.max_length={self.max_length} is smaller than the receiver prompt of every sample in the "
                f"first batch (shortest: {min(prompt_lengths)} tokens); raise model.max_length."
            )
        self.data_counts["train_samples"] += kept

    @staticmethod
    def response_loss(model: FusedReceiver, batch: FusionBatch, senders: Sequence[str] | None = None) -> Tensor:
        """Mean next-token cross-entropy over the response tokens only."""
        logits = model(batch, senders=senders)[:, :-1]
        mask = batch.response_mask.bool()
        return torch.nn.functional.cross_entropy(logits[mask].float(), batch.response_ids[mask])

    def anneal_gates(self) -> None:
        """Geometric gate-temperature schedule, advanced every optimizer step."""
        progress = self.global_step / max(1, self.trainer.estimated_stepping_batches)
        for fuser in self.modules():
            if isinstance(fuser, Fuser):
                fuser.anneal(progress)

    def log_gates(self, name: str, fuser: Fuser, batch_size: int) -> None:
        logits = fuser.gate_logits()
        self.log_dict({f"gates/{name}/layer_{i:02d}": v for i, v in enumerate(logits.tolist())}, batch_size=batch_size)
        self.log(f"gates/{name}/open_fraction", (logits > 0).float().mean(), batch_size=batch_size)

    # --- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self):
        total = self.trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ValueError("Streaming training data has no length: set trainer.max_steps to the number of steps.")
        parameters = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=self.learning_rate, weight_decay=self.weight_decay)
        warmup = max(1, int(self.warmup_fraction * total))

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def export_directory(self) -> Path:
        return Path(self.export_dir or Path(self.trainer.log_dir or self.trainer.default_root_dir) / "fuser")

    def report_data_counts(self, directory: Path) -> None:
        counts = dict(self.data_counts)
        stream = getattr(self.trainer.datamodule, "train_stream", None)
        if stream is not None:
            counts["skipped_without_answer"] = stream.skipped
        Console().print(f"[bold]Exported to[/] {directory}   data: {counts}")

    # --- evaluation -----------------------------------------------------------------------
    @property
    def planner(self) -> QueryPlanner:
        """Who reads what in rephrased query modes; the receiver rephrases (built on first use)."""
        if self._planner is None:
            config = self.evaluation
            rephraser = Rephraser(self.fused.receiver, config.rephrase, config.rephrase_cache_dir)
            self._planner = QueryPlanner(rephraser, config.options)
        return self._planner

    def test_routes(self) -> list[Route]:
        return [parse_route(name, self.fused.sender_names) for name in self.test_route_names]

    def val_routes(self) -> list[Route]:
        return [parse_route(name, self.fused.sender_names) for name in self.val_route_names]

    #: chooses senders per question for the ``c2c:auto`` route (set by subclasses that support it)
    selection: SenderSelection | None = None

    def _reset_evaluation(self) -> None:
        self.per_question: dict[str, list[tuple[str, bool]]] = defaultdict(list)
        self.selections: list[tuple[str, tuple[str, ...]]] = []
        self.metrics = torch.nn.ModuleDict()
        self.tallies: dict[str, RouteTally] = defaultdict(RouteTally)
        self.failures: list[tuple[str, str]] = []
        self.question_count = 0

    def _evaluate(self, batch: QuestionBatch, routes: Sequence[Route]) -> None:
        self.question_count += len(batch)
        self.failures.extend((batch.ids[row], reason) for row, reason in batch.failures.items())
        for route in routes:
            key = route.name.replace(".", "_")
            if key not in self.metrics:
                self.metrics[key] = MulticlassAccuracy(num_classes=MAX_OPTIONS, average="micro").to(self.device)
            result = run_route(
                self.fused, batch, route, self.answer_mode, self.max_new_tokens,
                selection=self.selection, planner=self.planner, t2t=self.evaluation.t2t,
            )
            correct = (result.predictions == batch.labels).tolist()
            self.per_question[route.name].extend(zip(batch.ids, correct))
            if result.selected is not None:
                self.selections.extend(zip([batch.ids[row] for row in batch.encoded_rows], result.selected))
            # -1 (unanswerable) never equals a label: counted wrong, never skipped.
            predictions = torch.where(result.predictions < 0, (batch.labels + 1) % MAX_OPTIONS, result.predictions)
            self.metrics[key].update(predictions, batch.labels)
            self.tallies[route.name].add(result, batch.labels)

    def on_validation_epoch_start(self) -> None:
        self._reset_evaluation()

    def validation_step(self, batch: QuestionBatch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_routes())

    def on_validation_epoch_end(self) -> None:
        self._log_results("val", self.val_routes())

    def on_test_epoch_start(self) -> None:
        self._reset_evaluation()

    def test_step(self, batch: QuestionBatch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_routes())

    def on_test_epoch_end(self) -> None:
        self._log_results("test", self.test_routes(), show=True)

    def results(self, routes: Sequence[Route] | None = None) -> list[dict[str, Any]]:
        """One row per route: accuracy (torchmetrics) with its 95% interval, questions, failures,
        latency per question (total and per stage), bytes sent, and leakage in rephrased modes."""
        routes = self.test_routes() if routes is None else routes
        rows = []
        for route in routes:
            tally = self.tallies[route.name].row()
            accuracy = float(self.metrics[route.name.replace(".", "_")].compute())
            rows.append(
                {
                    "route": route.name,
                    "senders": "+".join(route.senders),
                    "query_mode": route.query_mode,
                    **tally,
                    "accuracy": accuracy,
                    "questions": self.question_count,
                    "failed": len(self.failures),
                }
            )
        return rows

    def _log_results(self, stage: str, routes: Sequence[Route], show: bool = False) -> None:
        if self.trainer.sanity_checking or not self.metrics:
            return
        rows = self.results(routes)
        for row in rows:
            self.log(f"{stage}/{row['route']}/accuracy", row["accuracy"], prog_bar=row["route"] == "c2c")
            self.log(f"{stage}/{row['route']}/latency_ms", row["latency_ms"])
            self.log(f"{stage}/{row['route']}/bytes_per_token", float(row["bytes_per_token"]))
        self.log(f"{stage}/failed_questions", float(len(self.failures)))
        if show and self.trainer.is_global_zero:
            self._print_table(stage, rows)
            self._save_results(stage, rows)

    def title(self) -> str:
        return f"{'+'.join(self.fused.sender_names)} -> {self.fused.receiver.name}"

    def _print_table(self, stage: str, rows: list[dict[str, Any]]) -> None:
        table = Table(title=f"FedRefine {stage}: {self.title()} ({self.question_count} questions)")
        for column in ("route", "accuracy", "95% CI", "latency ms/question", "bytes/token", "bytes/question", "leakage"):
            table.add_column(column, justify="left" if column == "route" else "right")
        for row in rows:
            leakage = "" if row["leakage_overlap"] is None else f"{100 * row['leakage_overlap']:.0f}%"
            table.add_row(
                row["route"],
                f"{100 * row['accuracy']:.1f}%",
                f"{100 * row['ci_low']:.0f}-{100 * row['ci_high']:.0f}%",
                f"{row['latency_ms']:.1f}",
                f"{row['bytes_per_token']:.0f}",
                f"{row['bytes_per_question']:.0f}",
                leakage,
            )
        console = Console()
        console.print(table)
        if self.failures:
            console.print(f"[red]{len(self.failures)} question(s) could not be encoded and count as wrong:[/]")
            for question_id, reason in self.failures[:10]:
                console.print(f"  {question_id}: {reason}")

    def _save_results(self, stage: str, rows: list[dict[str, Any]]) -> None:
        directory = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"title": self.title(), "rows": rows, "failures": self.failures}
        if self.selections:
            payload["selected_senders"] = {question: list(senders) for question, senders in self.selections}
        (directory / f"{stage}_results.json").write_text(json.dumps(payload, indent=2) + "\n")
        columns = [c for c, value in rows[0].items() if not isinstance(value, dict)]  # W&B cells are scalars
        for logger in self.loggers:
            if hasattr(logger, "log_table"):  # WandbLogger
                logger.log_table(key=f"{stage}/results", columns=columns, data=[[r[c] for c in columns] for r in rows])

    # --- predict --------------------------------------------------------------------------
    def predict_step(self, batch: list[str], batch_idx: int) -> list[dict[str, str]]:
        """Answer free-text prompts with C2C (greedy)."""
        examples = [self.fused.encode([{"role": "user", "content": prompt}]) for prompt in batch]
        generated = self.fused.generate(self.fused.collate(examples).to(self.device), self.max_new_tokens)
        answers = self.fused.receiver.tokenizer.batch_decode(generated, skip_special_tokens=True)
        for prompt, answer in zip(batch, answers):
            Console().print(f"[bold]Q:[/] {prompt}\n[bold]A:[/] {answer}")
        return [{"prompt": p, "answer": a} for p, a in zip(batch, answers)]


def load_or_create_fuser(sender: Participant, receiver: Participant, config: FuserConfig, path: str | None) -> Fuser:
    """The saved fuser at ``path`` (for exactly this pair), or a new one."""
    if path is not None:
        return Fuser.load(path, sender.identity, receiver.identity)
    return Fuser(sender.identity, receiver.identity, config)


def mark_frozen(*participants: Participant) -> None:
    """Tag participants' models so that :meth:`FusionModule.train` keeps them in eval mode."""
    for participant in participants:
        participant.model._is_fedrefine_participant = True
