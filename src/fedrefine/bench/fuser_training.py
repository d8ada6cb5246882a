"""Training a fuser a sweep needs but its registry lacks: ``fedrefine fit`` with a config, in-process."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedrefine.trainer_cli import build_cli


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
