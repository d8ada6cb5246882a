"""What FedRefine's Lightning recipes share: frozen participants, checkpoints of the declared trainable parts only,
the optimizer and schedule, the response loss, and ``validate``/``test``/``predict`` through the one evaluation loop.

A recipe (:mod:`~fedrefine.recipes.c2c`, :mod:`~fedrefine.recipes.co_c2c`, :mod:`~fedrefine.recipes.federation`)
builds its participants and fusers in ``__init__``, sets ``self.fused`` (the
:class:`~fedrefine.fusion.FusedReceiver` that ``validate``/``test`` evaluate), declares its trainable parts, and
reads top-down from there: ``training_step`` (send, fuse, loss, log), then ``on_train_end`` (export).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from rich.console import Console
from torch import Tensor, nn

from fedrefine.data.conversations import ChatExample
from fedrefine.data.question_dataset import QuestionWithControls
from fedrefine.evaluation import EvaluationConfig, EvaluationReport, Evaluator, QueryPlanner
from fedrefine.evaluation.report import CLOZE_COLUMNS, log_table
from fedrefine.federation.selection import SenderSelection
from fedrefine.fuser import Fuser, FuserConfig
from fedrefine.fusion import FusedReceiver, FusionBatch
from fedrefine.participants import Participant
from fedrefine.privacy.rephrase import Rephraser
from fedrefine.recipes.callbacks import step_seed
from fedrefine.recipes.chat_batches import ChatBatchEncoder
from fedrefine.recipes.settings import check_last_token_settings, check_saved_fuser_settings, check_trained_dtypes
from fedrefine.recipes.trainable import TrainableOnly
from fedrefine.tasks.routes import parse_routes
from fedrefine.wire import LinkConfig

# The frozen LLMs stay in eval mode on purpose, and batches are encoded by the module (it knows the
# tokenizers): Lightning's warnings about both are expected here.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r".*overridden `(on_before_batch_transfer|transfer_batch_to_device)`.*")


class FusionModule(TrainableOnly, L.LightningModule):
    """The shared base of the C2C, Co-C2C and federation recipes (see the module docstring); checkpoints hold only
    the trainable parts (:class:`~fedrefine.recipes.trainable.TrainableOnly`)."""

    #: chooses senders per question for the ``c2c:auto`` route (set by recipes that support it)
    selection: SenderSelection | None = None

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
        self.evaluation = evaluation or EvaluationConfig()
        self.route_names = {"test": tuple(self.evaluation.test_routes or default_test_routes),
                            "val": tuple(self.evaluation.val_routes)}
        self.export_dir = export_dir
        self.chat_batches = ChatBatchEncoder(max_length)
        self._planner: QueryPlanner | None = None
        self.evaluator: Evaluator | None = None
        self.report: EvaluationReport | None = None

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

    def setup(self, stage: str) -> None:
        fusers = [m for m in self.modules() if isinstance(m, Fuser)]
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        check_last_token_settings(fusers, self.evaluation, datamodule if stage == "fit" else None)
        for fused in self.modules():
            if isinstance(fused, FusedReceiver):
                fused.sending.check(self.evaluation.link)

    # --- training -------------------------------------------------------------------------
    @property
    def training_link(self) -> LinkConfig | None:
        """The link training messages travel over: the evaluation's with ``link.in_training``, else none (in-process
        tensors, every layer the fusers read)."""
        return self.evaluation.link if self.evaluation.link.in_training else None

    def on_before_batch_transfer(self, batch: list, dataloader_idx: int):
        """Conversations are encoded here for every participant (the module knows their tokenizers); questions
        and free-text prompts go to the step as they are (the evaluation loop rephrases and encodes them)."""
        if not batch:
            raise ValueError("Empty batch.")
        if isinstance(batch[0], ChatExample):
            return self.encode_chat_batch(batch)
        if isinstance(batch[0], (QuestionWithControls, str)):
            return batch
        raise TypeError(f"Unsupported batch element {type(batch[0]).__name__}.")

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        if isinstance(batch, dict):
            return {k: self.transfer_batch_to_device(v, device, dataloader_idx) for k, v in batch.items()}
        if isinstance(batch, list):  # questions or prompts: moved once encoded
            return batch
        if hasattr(batch, "to") and not isinstance(batch, Tensor):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def encode_chat_batch(self, examples: Sequence[ChatExample]) -> FusionBatch | None:
        """Encode conversations for the receiver and its senders; too-long ones are truncated or dropped (counted)."""
        return self.chat_batches.batch(self.fused, examples)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seed the step's random draws (gate noise, dropout, sender subsets) from the run seed and the step,
        so that a resumed run draws exactly what the uninterrupted one did (see :func:`step_seed`)."""
        torch.manual_seed(step_seed(self.global_step))

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

    def configure_optimizers(self):
        """AdamW over the trainable parameters, linear warm-up then linear decay to 0, stepped every optimizer step."""
        total = self.trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ValueError("Streaming training data has no length: set trainer.max_steps to the number of steps.")
        optimizer = torch.optim.AdamW(
            [p for p in self.parameters() if p.requires_grad], lr=self.learning_rate, weight_decay=self.weight_decay
        )
        warmup = max(1, int(self.warmup_fraction * total))

        def schedule(step: int) -> float:
            return (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def export_directory(self) -> Path:
        """``export_dir``, else ``<default_root_dir>/fuser`` (the run's root, whatever the logger)."""
        return Path(self.export_dir or Path(self.trainer.default_root_dir) / "fuser")

    def report_data_counts(self, directory: Path) -> None:
        """Print where the result went and what the data held: rows per pass over this rank's training rows
        (counted once, not summed over passes), and the samples encoded over the whole run."""
        stream = getattr(self.trainer.datamodule, "train_stream", None)
        Console().print(f"[bold]Exported to[/] {directory}")
        if stream is not None and stream.passes:
            finished = stream.complete_pass is not None
            counts = (stream.complete_pass if finished else stream.last_pass).as_dict()
            scope = "per pass" if finished else "in the first pass (not finished)"
            Console().print(f"training rows {scope}: {counts}; passes started: {stream.passes}")
        Console().print(f"samples encoded over the run (repeats across passes included): {dict(self.chat_batches.counts)}")

    # --- validate / test / predict ---------------------------------------------------------
    @property
    def planner(self) -> QueryPlanner:
        """Who reads what in rephrased query modes; the receiver rephrases (built on first use)."""
        if self._planner is None:
            config = self.evaluation
            rephraser = Rephraser(self.fused.receiver, config.rephrase, config.rephrase_cache_dir)
            self._planner = QueryPlanner(rephraser, config.options)
        return self._planner

    def start_evaluation(self, stage: str) -> None:
        """A fresh evaluator and report for the ``test`` or ``val`` routes."""
        routes = parse_routes(self.route_names[stage], self.fused.sender_names)
        self.evaluator = Evaluator(self.fused, routes, self.evaluation, self.planner, self.selection)
        self.report = EvaluationReport(routes, self.device)

    def on_validation_epoch_start(self) -> None:
        self.start_evaluation("val")

    def validation_step(self, batch: list[QuestionWithControls], batch_idx: int) -> None:
        self.evaluator.evaluate(batch, self.report, self.device)

    def on_validation_epoch_end(self) -> None:
        self._log_results("val")

    def on_test_epoch_start(self) -> None:
        self.start_evaluation("test")

    def test_step(self, batch: list[QuestionWithControls], batch_idx: int) -> None:
        self.evaluator.evaluate(batch, self.report, self.device)

    def on_test_epoch_end(self) -> None:
        self._log_results("test", show=True)

    def results(self) -> list[dict[str, Any]]:
        """The last evaluation's rows (see :meth:`EvaluationReport.rows`)."""
        return self.report.rows()

    def title(self) -> str:
        return f"{'+'.join(self.fused.sender_names)} -> {self.fused.receiver.name}"

    def _log_results(self, stage: str, show: bool = False) -> None:
        if self.trainer.sanity_checking or self.report.empty:
            return
        rows = self.report.rows()
        for row in rows:
            self.log(f"{stage}/{row['route']}/accuracy", row["accuracy"], prog_bar=row["route"] == "c2c")
            for name in CLOZE_COLUMNS:  # cloze mode: lm-eval's acc (sum) and acc_norm (chars)
                if name in row:
                    self.log(f"{stage}/{row['route']}/{name}", row[name])
            self.log(f"{stage}/{row['route']}/latency_ms", row["latency_ms"])
            self.log(f"{stage}/{row['route']}/bytes_per_token", float(row["bytes_per_token"]))
        self.log(f"{stage}/failed_questions", float(len(self.report.failures) + len(self.report.route_failures)))
        if show and self.trainer.is_global_zero:
            self.report.print_table(f"FedRefine {stage}: {self.title()}")
            directory = Path(self.trainer.default_root_dir)  # the run's root, whatever the logger
            self.report.save_json(directory / f"{stage}_results.json", self.title())
            log_table(self.loggers, f"{stage}/results", rows)

    def predict_step(self, batch: list[str], batch_idx: int) -> list[dict[str, str]]:
        """Answer free-text prompts with C2C (greedy), every sender sending once over the evaluation's link."""
        encoder = self.fused.encoder
        prompts = encoder.collate([encoder.encode([{"role": "user", "content": prompt}]) for prompt in batch]).to(self.device)
        messages = self.fused.send(prompts, link=self.evaluation.link).messages
        generated = self.fused.generate(prompts, messages, self.evaluation.max_new_tokens)
        answers = self.fused.receiver.tokenizer.batch_decode(generated, skip_special_tokens=True)
        for prompt, answer in zip(batch, answers):
            Console().print(f"[bold]Q:[/] {prompt}\n[bold]A:[/] {answer}")
        return [{"prompt": p, "answer": a} for p, a in zip(batch, answers)]


def response_loss(logits: Tensor, batch: FusionBatch) -> Tensor:
    """Mean next-token cross-entropy over the response tokens only (every token of the batch weighs the same), from
    the fused receiver's logits (B, 1 + R, V)."""
    predicting = logits[:, :-1]  # (B, R, V): the logits that predict each response token
    mask = batch.response_mask.bool()
    return nn.functional.cross_entropy(predicting[mask].float(), batch.response_ids[mask])


def response_losses(logits: Tensor, batch: FusionBatch) -> Tensor:
    """(B,) each sample's mean next-token cross-entropy over its response tokens, from logits (B, 1 + R, V)."""
    predicting = logits[:, :-1].float()  # (B, R, V)
    mask = batch.response_mask.to(predicting.dtype)  # (B, R)
    losses = nn.functional.cross_entropy(predicting.transpose(1, 2), batch.response_ids, reduction="none")  # (B, R)
    return (losses * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def load_or_create_fuser(
    sender: Participant, receiver: Participant, config: FuserConfig | None, path: str | None
) -> Fuser:
    """The saved fuser at ``path`` (for exactly this pair), or a new one with ``config`` (None: the defaults).

    A saved fuser keeps the settings it was trained with; a ``config`` that says otherwise is refused
    rather than silently ignored (see :func:`check_saved_fuser_settings`).
    """
    dtypes = {"sender_dtype": dtype_name(sender), "receiver_dtype": dtype_name(receiver)}
    if path is None:
        fuser = Fuser(sender.identity, receiver.identity, config or FuserConfig())
        fuser.trained_with = dtypes
        return fuser
    fuser = Fuser.load(path, sender.identity, receiver.identity)
    check_saved_fuser_settings(fuser.config, config, path)
    check_trained_dtypes(fuser, dtypes, path)
    return fuser


def dtype_name(participant: Participant) -> str:
    """``float32``, ``bfloat16``, ...: the dtype a participant's weights were loaded in."""
    return str(participant.model.dtype).removeprefix("torch.")


def mark_frozen(*participants: Participant) -> None:
    """Tag participants' models so that :meth:`TrainableOnly.train` keeps them in eval mode."""
    for participant in participants:
        participant.model._is_fedrefine_participant = True
