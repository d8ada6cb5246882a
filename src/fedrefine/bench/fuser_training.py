"""Training what a sweep needs but lacks (a fuser missing from a registry, a gating network): ``fedrefine fit``
with a config, in-process."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrefine.recipes.trainer_cli import build_cli


@dataclass
class FuserTraining:
    """How the runner trains a fuser missing from a registry: ``fedrefine fit`` with a config.

    Args:
        config: the ``fedrefine fit`` config (its receiver and senders must be the sweep's participants).
        sender_args: extra CLI overrides per sender name (e.g. which participant is the sender).
        args: overrides for every run.
        mode_args: extra overrides per fusion mode (e.g. the steps of residual fusers, concat's ``fuse_at``).
        mode_arg: the override that sets the fusion mode.
        root: where training runs are written (one root per fusion mode and sender).
    """

    config: str
    sender_args: dict[str, list[str]] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    mode_args: dict[str, list[str]] = field(default_factory=dict)
    mode_arg: str = "--model.fuser.mode"
    root: str = "runs/bench/fusers"

    def fit(self, sender: str, mode: str, pair: dict[str, dict[str, Any]] | None = None) -> Path:
        """Train F[sender -> receiver] in ``mode`` in its own run root (``<root>/<mode>-<sender>``); returns the
        exported fuser directory. ``pair``: the sweep's ``receiver`` and ``sender`` sources (``class_path`` and
        ``init_args``), passed as overrides ahead of ``args``, so the fuser is trained for exactly the sweep's
        participants without repeating them here."""
        directory = Path(self.root) / f"{mode}-{sender}"
        inherited = [arg for role, source in (pair or {}).items() for arg in (f"--model.{role}", json.dumps(source))]
        build_cli([
            "fit", "--config", self.config, *inherited, *self.args, *self.sender_args.get(sender, []),
            *self.mode_args.get(mode, []), self.mode_arg, mode, "--trainer.default_root_dir", str(directory),
            "--model.export_dir", str(directory / "fuser"), "--overwrite", "true",  # a rerun replaces its own run
        ])
        return directory / "fuser"


@dataclass
class GateTraining:
    """How the runner trains a gating network a sweep names but has not got: ``fedrefine fit`` with a federation
    config (a ``FederationModule`` with ``gating: true``) over the sweep's registry of that fusion mode.

    Args:
        config: the ``fedrefine fit`` config (its receiver and senders must be the sweep's, in the same order).
        args: overrides for the run.
        root: where the training run is written.
    """

    config: str
    args: list[str] = field(default_factory=list)
    root: str = "runs/bench/gates"

    def fit(self, mode: str, registry: Path, export_dir: Path) -> Path:
        """Train the gate over the fusers in ``registry``; it is exported to ``export_dir``, which is returned."""
        build_cli([
            "fit", "--config", self.config, *self.args, "--model.registry", str(registry),
            "--model.export_dir", str(export_dir), "--trainer.default_root_dir", str(Path(self.root) / mode),
        ])
        return export_dir
