"""The LightningDataModule: chat conversations to train on, multiple-choice questions to evaluate on.

Batches are lists of raw examples; the LightningModule encodes them for its own participants
(each model's tokenizer and chat template) in ``on_before_batch_transfer``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from fedrefine.data.conversations import ChatStream, TrainingDataError, number_rows
from fedrefine.data.loading import open_dataset
from fedrefine.data.question_dataset import QuestionDataset, load_questions


def _as_list(batch: list) -> list:
    return batch


class C2CDataModule(L.LightningDataModule):
    """Chat data for ``fit`` and OpenBookQA-schema questions for ``validate``/``test``.

    Args:
        train_path: OpenHermes-2.5 hub id or a local JSON/JSONL/parquet file in its schema; None: no training data.
        train_samples: the first N conversations are used (streamed, never loaded whole).
        eval_path: OpenBookQA hub id or a local JSON/JSONL/parquet file in its schema.
        eval_config: hub config name of the evaluation set (``main`` for OpenBookQA).
        val_split: split used for validation during ``fit`` and by ``validate``.
        test_split: split used by ``test``.
        num_questions: evaluate on the first N questions of a split (None: all).
        batch_size: training conversations per batch.
        eval_batch_size: questions per evaluation batch (1 gives per-question latency).
        num_workers: DataLoader workers.
        shuffle_buffer: training rows are shuffled through a buffer of this many rows (0: stream order).
        seed: seed of the shuffle.
        response_prefill: a fixed start of every training answer (e.g. ``The correct answer is``) given to
            all participants as an assistant prefill; pair it with ``evaluation.prefill_answer``.
        predict_prompts: free-text prompts for ``predict`` (or a path to a text file, one prompt per line).
    """

    def __init__(
        self,
        train_path: str | None = "teknium/OpenHermes-2.5",
        train_samples: int = 50_000,
        eval_path: str = "allenai/openbookqa",
        eval_config: str | None = "main",
        val_split: str = "validation",
        test_split: str = "test",
        num_questions: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        shuffle_buffer: int = 10_000,
        seed: int = 0,
        response_prefill: str | None = None,
        predict_prompts: list[str] | str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_path, self.train_samples = train_path, train_samples
        self.eval_path, self.eval_config = eval_path, eval_config
        self.val_split, self.test_split, self.num_questions = val_split, test_split, num_questions
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.predict_prompts = predict_prompts
        self.shuffle_buffer, self.seed, self.response_prefill = shuffle_buffer, seed, response_prefill
        self.train_stream: ChatStream | None = None
        self.questions: dict[str, QuestionDataset] = {}

    def setup(self, stage: str) -> None:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        if stage == "fit":
            if self.train_path is None:
                raise TrainingDataError("`fit` needs training data: set data.train_path.")
            if self.train_samples < 1:
                raise TrainingDataError(
                    f"data.train_samples={self.train_samples} leaves no training rows of {self.train_path}; "
                    f"set it to the number of conversations to train on (at least 1)."
                )
            rows = open_dataset(self.train_path, "train", streaming=True, option="data.train_path").take(self.train_samples)
            rows = number_rows(rows)
            if self.shuffle_buffer:
                rows = rows.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            self.train_stream = ChatStream(
                rows, rank=rank, world_size=world, response_prefill=self.response_prefill, source=self.train_path
            )
        if stage in ("fit", "validate"):
            self.questions["val"] = self.load_split(self.val_split)
        if stage == "test":
            self.questions["test"] = self.load_split(self.test_split)

    def load_split(self, split: str) -> QuestionDataset:
        """The evaluation questions of ``split`` (the first ``num_questions``), with their control partners."""
        items = load_questions(self.eval_path, split, self.eval_config, self.num_questions, option="data.eval_path")
        return QuestionDataset(items)

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None and self.trainer.ckpt_path:
            # Resuming mid-pass: the stream restarts at the top, so skip what this rank already trained on.
            # ``processed`` counts the batches whose step ran, also in checkpoints written in on_train_batch_end.
            done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
            self.train_stream.resume_after(done * self.batch_size)
            if self.num_workers > 0 and done:
                rank_zero_warn(
                    f"Resuming mid-pass with data.num_workers={self.num_workers}: workers interleave batches, so the "
                    f"skipped rows are approximate and the run will not repeat the uninterrupted one exactly; use "
                    f"data.num_workers=0 for an exact resume."
                )
        return DataLoader(self.train_stream, batch_size=self.batch_size, collate_fn=_as_list, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _eval_loader(self, name: str) -> DataLoader:
        return DataLoader(self.questions[name], batch_size=self.eval_batch_size, collate_fn=_as_list, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        prompts = self.predict_prompts
        if isinstance(prompts, str):
            prompts = [line.strip() for line in Path(prompts).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError("`predict` needs prompts: set data.predict_prompts to a list or a text file.")
        return DataLoader(prompts, batch_size=self.eval_batch_size, collate_fn=_as_list)
