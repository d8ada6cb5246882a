"""Interrupted runs: Ctrl-C / SIGTERM write a resumable last.ckpt, shipped configs save one at a step
interval, and a resumed run ends with the same fuser bytes as an uninterrupted one."""

import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fedrefine.recipes.trainer_cli import build_cli

CONFIGS = sorted(Path(__file__).parent.parent.glob("configs/*.yaml"))


class SignalAtStep(Callback):
    """Sends ``signum`` to this process during training step ``step`` (as a user or a scheduler would)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def tiny_args(root: Path, *extra: str) -> list[str]:
    # 24 usable rows in batches of 8: 3 steps per pass, so 8 steps cross pass boundaries mid-way.
    return ["--config", "configs/tiny.yaml", "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]", "--trainer.max_steps", "8",
            "--trainer.val_check_interval", "4", "--data.train_samples", "24", "--data.shuffle_buffer", "24",
            "--model.fuser.dropout", "0.1", "--model.export_dir", str(root / "fuser"), *extra]


def fit(args: list[str], *callbacks: Callback, ckpt_path: Path | None = None) -> None:
    cli = build_cli(args, run=False)  # the CLI's trainer, with its InterruptCheckpoint, run by hand
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_saves_last_ckpt_and_resumes_to_the_same_fuser_bytes(tmp_path, signum):
    fit(tiny_args(tmp_path / "straight"))
    straight = (tmp_path / "straight" / "fuser" / "fuser.safetensors").read_bytes()

    root = tmp_path / "interrupted"
    handler = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a shell's background job
    with pytest.raises(SystemExit) as stopped:
        fit(tiny_args(root), SignalAtStep(5, signum))
    assert stopped.value.code == 1 if signum == signal.SIGINT else isinstance(stopped.value, SIGTERMException)
    last = root / "checkpoints" / "last.ckpt"
    assert last.is_file() and not (root / "fuser").exists()  # nothing exported as if finished
    assert torch.load(last, weights_only=False)["global_step"] == 6  # the step that was running completed
    assert signal.getsignal(signal.SIGINT) is handler  # the handler is put back

    fit(tiny_args(root), ckpt_path=last)
    assert (root / "fuser" / "fuser.safetensors").read_bytes() == straight


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_saves_a_resumable_last_ckpt_at_a_step_interval(config):
    trainer = yaml.safe_load(config.read_text())["trainer"]
    step_checkpoints = [
        c["init_args"] for c in trainer["callbacks"]
        if c["class_path"].endswith("ModelCheckpoint") and c.get("init_args", {}).get("every_n_train_steps")
    ]
    assert len(step_checkpoints) == 1 and step_checkpoints[0]["save_last"] is True
    assert 0 < step_checkpoints[0]["every_n_train_steps"] <= trainer["max_steps"] // 4
    assert trainer.get("val_check_interval") is None or "check_val_every_n_epoch" in trainer  # steps, not epochs
