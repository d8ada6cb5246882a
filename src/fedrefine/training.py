"""LightningModule for one frozen sender -> receiver pair with a trainable fuser.

Training: the sender prefills the prompt (no grad), the fuser writes into the receiver's
cache, the receiver's next-token loss on the response tokens trains the fuser only.
Testing: receiver alone, sender alone, C2C (and controls) on the same questions.
Checkpoints hold the fuser and training state only, never the frozen LLMs.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from fedrefine.data.chat import ChatExample
from fedrefine.data.multiple_choice import QuestionWithControls
from fedrefine.evaluation import AnswerMode, QuestionBatch, encode_questions, run_route
from fedrefine.fuser import Fuser, FuserConfig, FuserPairMismatchError
from fedrefine.pair import C2CPair, PairBatch, PairExample, encode_response
from fedrefine.sources import ParticipantSource

# The frozen LLMs stay in eval mode on purpose, and batches are encoded by the module (it knows the
# tokenizers): Lightning's warnings about both are expected here.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
warnings.filterwarnings("ignore", message=r".*overridden `(on_before_batch_transfer|transfer_batch_to_device)`.*")

FUSER_PREFIX = "pair.fuser."
MAX_OPTIONS = 26


class C2CModule(L.LightningModule):
    """Train and evaluate the fuser of one pair.

    Args:
        receiver: where the receiver comes from.
        sender: where the sender comes from.
        fuser: fuser size and gate settings.
        fuser_path: start from (or evaluate) a saved fuser directory for exactly this pair.
        export_dir: where to write the trained fuser (safetensors + JSON) at the end of ``fit``;
            default ``<log_dir>/fuser``.
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_fraction: share of the optimizer steps spent in linear warm-up (then linear decay to 0).
        max_length: receiver tokens per training sample (prompt + response).
        answer_mode: ``logits`` (argmax over option letters, deterministic) or ``generate`` (greedy + extractor).
        max_new_tokens: generation budget in ``generate`` mode and for ``predict``.
        test_routes: routes ``test`` reports; see :data:`fedrefine.evaluation.ROUTES`.
        val_routes: routes evaluated during ``fit`` validation and ``validate``.
        gate_log_every: log the per-layer gate logits every N optimizer steps.
    """

    def __init__(
        self,
        receiver: ParticipantSource,
        sender: ParticipantSource,
        fuser: FuserConfig | None = None,
        fuser_path: str | None = None,
        export_dir: str | None = None,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_fraction: float = 0.1,
        max_length: int = 2048,
        answer_mode: AnswerMode = "logits",
        max_new_tokens: int = 64,
        test_routes: Sequence[str] = ("receiver", "sender", "c2c"),
        val_routes: Sequence[str] = ("c2c",),
        gate_log_every: int = 50,
    ) -> None:
        super().__init__()
        fuser = fuser or FuserConfig()
        # Plain values only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["receiver", "sender", "fuser"])
        self.hparams.update(receiver=receiver.describe(), sender=sender.describe(), fuser=asdict(fuser))
        receiver_participant, sender_participant = receiver.load(), sender.load()
        if fuser_path is not None:
            fuser_module = Fuser.load(fuser_path, sender_participant.identity, receiver_participant.identity)
        else:
            fuser_module = Fuser(sender_participant.identity, receiver_participant.identity, fuser)
        self.pair = C2CPair(receiver_participant, sender_participant, fuser_module)
        self.export_dir = export_dir
        self.learning_rate, self.weight_decay, self.warmup_fraction = learning_rate, weight_decay, warmup_fraction
        self.max_length, self.answer_mode, self.max_new_tokens = max_length, answer_mode, max_new_tokens
        self.test_routes, self.val_routes = tuple(test_routes), tuple(val_routes)
        self.gate_log_every = gate_log_every
        self.data_counts: dict[str, int] = defaultdict(int)
        self._reset_evaluation()

    @property
    def pair_name(self) -> str:
        return f"{self.pair.sender.name}->{self.pair.receiver.name}"

    # --- frozen participants, fuser-only checkpoints -------------------------------------------
    def train(self, mode: bool = True) -> C2CModule:
        """Only the fuser ever enters train mode; the LLMs stay in eval mode (no dropout)."""
        super().train(mode)
        self.pair.receiver_model.eval()
        self.pair.sender_model.eval()
        return self

    def state_dict(self, *args: Any, destination=None, prefix: str = "", keep_vars: bool = False):
        """Only the fuser's weights: checkpoints never hold the frozen LLMs."""
        return self.pair.fuser.state_dict(destination=destination, prefix=prefix + FUSER_PREFIX, keep_vars=keep_vars)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        foreign = [k for k in state_dict if not k.startswith(FUSER_PREFIX)]
        if foreign:
            raise KeyError(f"Checkpoint holds weights outside the fuser ({foreign[:3]}...); it is not a FedRefine one.")
        fuser_state = {k[len(FUSER_PREFIX) :]: v for k, v in state_dict.items()}
        return self.pair.fuser.load_state_dict(fuser_state, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["fedrefine_fuser"] = self.pair.fuser.metadata()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("fedrefine_fuser")
        if saved is None:
            raise KeyError("Checkpoint has no 'fedrefine_fuser' metadata; it was not written by FedRefine.")
        mine = self.pair.fuser.metadata()
        if (saved["sender"], saved["receiver"]) != (mine["sender"], mine["receiver"]):
            sender, receiver = saved["sender"], saved["receiver"]
            raise FuserPairMismatchError(
                f"Checkpoint is for {sender['name_or_path']}@{sender['revision']} -> "
                f"{receiver['name_or_path']}@{receiver['revision']}, but this run's pair is "
                f"{self.pair.fuser.sender.key} -> {self.pair.fuser.receiver.key}. Use the checkpoint of this pair."
            )

    # --- batches --------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: list, dataloader_idx: int):
        if not batch:
            raise ValueError("Empty batch.")
        if isinstance(batch[0], ChatExample):
            return self.encode_chat_batch(batch)
        if isinstance(batch[0], QuestionWithControls):
            routes = self.test_routes if self.trainer.testing else self.val_routes
            return encode_questions(self.pair, batch, routes, self.answer_mode)
        if isinstance(batch[0], str):
            return batch
        raise TypeError(f"Unsupported batch element {type(batch[0]).__name__}.")

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        if isinstance(batch, (PairBatch, QuestionBatch)):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def encode_chat_batch(self, examples: Sequence[ChatExample]) -> PairBatch | None:
        """Encode conversations for both models; too-long ones are truncated or dropped and counted."""
        encoded: list[PairExample] = []
        for example in examples:
            pair_example = self.pair.encode(example.messages)
            response = encode_response(self.pair.receiver, example.response)
            room = self.max_length - len(pair_example.receiver_ids)
            if room < 1:
                self.data_counts["dropped_prompt_too_long"] += 1
                continue
            if len(response) > room:
                self.data_counts["truncated_responses"] += 1
                self.data_counts["truncated_response_tokens"] += len(response) - room
                response = response[:room]
            pair_example.response_ids = response
            encoded.append(pair_example)
        if not encoded and not self.data_counts["train_samples"]:
            raise ValueError(
                f"model.max_length={self.max_length} is smaller than the receiver prompt of every sample in the first "
                f"batch (shortest: {min(len(self.pair.encode(e.messages).receiver_ids) for e in examples)} tokens); "
                f"raise model.max_length."
            )
        self.data_counts["train_samples"] += len(encoded)
        return self.pair.collate(encoded) if encoded else None

    # --- training -------------------------------------------------------------------------
    def response_loss(self, batch: PairBatch) -> Tensor:
        """Mean next-token cross-entropy over the response tokens only."""
        logits = self.pair(batch)[:, :-1]
        mask = batch.response_mask.bool()
        return torch.nn.functional.cross_entropy(logits[mask].float(), batch.response_ids[mask])

    def training_step(self, batch: PairBatch | None, batch_idx: int) -> Tensor | None:
        if batch is None:  # every sample of the batch was too long
            return None
        total = self.trainer.estimated_stepping_batches
        self.pair.fuser.anneal(self.global_step / max(1, total))
        loss = self.response_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        self.log("train/gate_temperature", self.pair.fuser.temperature, batch_size=len(batch))
        if self.gate_log_every and self.global_step % self.gate_log_every == 0:
            logits = self.pair.fuser.gate_logits()
            self.log_dict({f"gates/layer_{i:02d}": v for i, v in enumerate(logits.tolist())}, batch_size=len(batch))
            self.log("gates/open_fraction", (logits > 0).float().mean(), batch_size=len(batch))
        return loss

    def configure_optimizers(self):
        total = self.trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ValueError("Streaming training data has no length: set trainer.max_steps to the number of steps.")
        optimizer = torch.optim.AdamW(
            self.pair.fuser.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay
        )
        warmup = max(1, int(self.warmup_fraction * total))

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_end(self) -> None:
        directory = self.export_dir or str(Path(self.trainer.log_dir or self.trainer.default_root_dir) / "fuser")
        if self.trainer.is_global_zero:
            self.pair.fuser.save(directory)
            counts = dict(self.data_counts)
            stream = getattr(self.trainer.datamodule, "train_stream", None)
            if stream is not None:
                counts["skipped_without_answer"] = stream.skipped
            Console().print(f"[bold]Fuser exported to[/] {directory}   data: {counts}")

    # --- evaluation -----------------------------------------------------------------------
    def _reset_evaluation(self) -> None:
        self.metrics = torch.nn.ModuleDict()
        self.route_seconds: dict[str, float] = defaultdict(float)
        self.failures: list[tuple[str, str]] = []
        self.question_count = 0

    def _evaluate(self, batch: QuestionBatch, routes: Sequence[str]) -> None:
        self.question_count += len(batch)
        self.failures.extend((batch.ids[row], reason) for row, reason in batch.failures.items())
        for route in routes:
            if route not in self.metrics:
                self.metrics[route] = MulticlassAccuracy(num_classes=MAX_OPTIONS, average="micro").to(self.device)
            result = run_route(self.pair, batch, route, self.answer_mode, self.max_new_tokens)
            # -1 (unanswerable) never equals a label: counted wrong, never skipped.
            predictions = torch.where(result.predictions < 0, (batch.labels + 1) % MAX_OPTIONS, result.predictions)
            self.metrics[route].update(predictions, batch.labels)
            self.route_seconds[route] += result.seconds

    def on_validation_epoch_start(self) -> None:
        self._reset_evaluation()

    def validation_step(self, batch: QuestionBatch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_routes)

    def on_validation_epoch_end(self) -> None:
        self._log_results("val")

    def on_test_epoch_start(self) -> None:
        self._reset_evaluation()

    def test_step(self, batch: QuestionBatch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_routes)

    def on_test_epoch_end(self) -> None:
        self._log_results("test", show=True)

    def results(self) -> list[dict[str, Any]]:
        """One row per route: accuracy, questions, failures, average latency per question."""
        rows = []
        for route, metric in self.metrics.items():
            rows.append(
                {
                    "route": route,
                    "accuracy": float(metric.compute()),
                    "questions": self.question_count,
                    "failed": len(self.failures),
                    "latency_ms": 1000 * self.route_seconds[route] / max(1, self.question_count),
                }
            )
        return rows

    def _log_results(self, stage: str, show: bool = False) -> None:
        if self.trainer.sanity_checking or not self.metrics:
            return
        rows = self.results()
        for row in rows:
            self.log(f"{stage}/{row['route']}/accuracy", row["accuracy"], prog_bar=row["route"] == "c2c")
            self.log(f"{stage}/{row['route']}/latency_ms", row["latency_ms"])
        self.log(f"{stage}/failed_questions", float(len(self.failures)))
        if not show or not self.trainer.is_global_zero:
            return
        self._print_table(stage, rows)
        self._save_results(stage, rows)

    def _print_table(self, stage: str, rows: list[dict[str, Any]]) -> None:
        table = Table(title=f"FedRefine {stage}: {self.pair_name} ({self.question_count} questions)")
        for column in ("route", "accuracy", "latency ms/question"):
            table.add_column(column, justify="left" if column == "route" else "right")
        for row in rows:
            table.add_row(row["route"], f"{100 * row['accuracy']:.1f}%", f"{row['latency_ms']:.1f}")
        console = Console()
        console.print(table)
        if self.failures:
            console.print(f"[red]{len(self.failures)} question(s) could not be encoded and count as wrong:[/]")
            for question_id, reason in self.failures[:10]:
                console.print(f"  {question_id}: {reason}")

    def _save_results(self, stage: str, rows: list[dict[str, Any]]) -> None:
        directory = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"pair": self.pair_name, "rows": rows, "failures": self.failures}
        (directory / f"{stage}_results.json").write_text(json.dumps(payload, indent=2) + "\n")
        columns = list(rows[0])
        for logger in self.loggers:
            if hasattr(logger, "log_table"):  # WandbLogger
                logger.log_table(key=f"{stage}/results", columns=columns, data=[[r[c] for c in columns] for r in rows])

    # --- predict --------------------------------------------------------------------------
    def predict_step(self, batch: list[str], batch_idx: int) -> list[dict[str, str]]:
        """Answer free-text prompts with C2C (greedy)."""
        examples = [self.pair.encode([{"role": "user", "content": prompt}]) for prompt in batch]
        generated = self.pair.generate(self.pair.collate(examples).to(self.device), self.max_new_tokens)
        answers = self.pair.receiver.tokenizer.batch_decode(generated, skip_special_tokens=True)
        for prompt, answer in zip(batch, answers):
            Console().print(f"[bold]Q:[/] {prompt}\n[bold]A:[/] {answer}")
        return [{"prompt": p, "answer": a} for p, a in zip(batch, answers)]
