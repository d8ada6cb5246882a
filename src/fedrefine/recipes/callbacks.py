"""The callbacks every ``fedrefine fit`` run has: a resumable ``last.ckpt`` on Ctrl-C / SIGTERM, per-step randomness
that a resumed run replays exactly, and a progress bar that reads right when steps bound the run.

Periodic checkpoints are Lightning's ``ModelCheckpoint(every_n_train_steps=N, save_last=True)`` (every
shipped config has one); :class:`InterruptCheckpoint` adds the checkpoint at the moment of the
interruption. ``fedrefine fit`` adds it to every run.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.console import Console

from fedrefine.participants.precision import restore_rotary_tables, rotary_tables


def step_seed(global_step: int) -> int:
    """The seed of one optimizer step: a function of the run's seed (``seed_everything``) and the step only.

    Seeding every step from it makes the step's random draws (gate noise, dropout, sender subsets)
    the same whether the run was resumed or not, without checkpointing generator states.
    """
    run_seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    return (run_seed % 2**32) * 2**32 + global_step


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where the run's ``last.ckpt`` lives: the directory of its ``save_last`` ModelCheckpoint (else the first one,
    else ``<default_root_dir>/checkpoints``)."""
    callbacks = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    chosen = next((c for c in callbacks if c.save_last), callbacks[0] if callbacks else None)
    if chosen is not None and chosen.dirpath:
        return Path(chosen.dirpath) / f"{chosen.CHECKPOINT_NAME_LAST}{chosen.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


class InterruptCheckpoint(Callback):
    """Writes a resumable ``last.ckpt`` when ``fit`` is interrupted, then stops with exit code 1.

    The first Ctrl-C is deferred to the end of the running step (so the checkpoint holds a completed
    step); a second one stops at once, leaving the last periodic checkpoint. SIGTERM is turned into
    an exception at a step boundary by Lightning; the checkpoint is written before it propagates.
    Resume with ``fedrefine fit ... --ckpt_path <that file>``.
    """

    def __init__(self) -> None:
        self.requested = False
        self.saved = False
        self._previous_handler: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.requested = self.saved = False
        try:
            self._previous_handler = signal.signal(signal.SIGINT, self._request_stop)
        except ValueError:  # not the main thread (e.g. a notebook worker): Ctrl-C stays Lightning's
            self._previous_handler = None

    def _request_stop(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        Console(stderr=True).print("\n[bold]Interrupted:[/] saving last.ckpt after this step (Ctrl-C again to stop now).")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        requested = self.requested
        if trainer.world_size > 1:  # every rank must save (and stop) at the same step
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if requested:
            self.save(trainer)
            raise KeyboardInterrupt

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and not self.saved:
            self.save(trainer)
        self.restore_handler()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.restore_handler()

    def save(self, trainer: L.Trainer) -> None:
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved = True
        if trainer.is_global_zero:
            Console(stderr=True).print(
                f"[bold]Saved[/] {path} at step {trainer.global_step}; resume with --ckpt_path {path}"
            )

    def restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None


class StepRichProgressBar(RichProgressBar):
    """:class:`~lightning.pytorch.callbacks.RichProgressBar` without the meaningless "/-2" of step-bounded runs."""

    def _get_train_description(self, current_epoch: int) -> str:  # overrides a private hook of the rich bar
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"


class PrecisionPolicy(Callback):
    """What ``trainer.precision`` needs beyond Lightning's own casts (``fedrefine`` adds it to every run):

    - the participants' rotary tables (``inv_freq``) stay float32 when ``bf16-true`` / ``16-true`` casts the module,
      as :func:`~fedrefine.participants.precision.cast_model` keeps them: copied before Lightning casts (``setup``),
      put back when the stage starts;
    - batches reach the module as they are: they are questions, conversations or prompts (frozen dataclasses and
      strings, which Lightning's ``-true`` input conversion refuses), encoded by the module into token ids; the
      fusion code converts every K/V to the dtype of what reads it.
    """

    def __init__(self) -> None:
        self.tables: dict[str, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.tables = rotary_tables(pl_module)
        trainer.precision_plugin.convert_input = _as_is

    def restore(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        restore_rotary_tables(pl_module, self.tables)

    on_fit_start = on_validation_start = on_test_start = on_predict_start = restore


def _as_is(data: Any) -> Any:
    return data
