"""What a sweep's C2C cells fuse through, per fusion mode: the fuser registry, the gating network (if
any), how missing ones are trained, and the fingerprint of both (the cells' results depend on them)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from fedrefine.bench.fuser_training import FuserTraining, GateTraining
from fedrefine.federation import Federation
from fedrefine.fuser import WEIGHTS_FILE, Fuser
from fedrefine.fuser.registry import FuserRegistry
from fedrefine.fusion import FusedReceiver, gate_saved_in, load_gate
from fedrefine.settings import SettingsError

FUSION_MODES = ("residual", "concat")


class SweepFusion:
    """The fusers (and gates) of one receiver and its senders, per fusion mode.

    Args:
        federation: the sweep's participants.
        receiver: the participant that answers.
        senders: its senders, in the sweep's order.
        registries: fuser registry directory per fusion mode (``residual``, ``concat``).
        gates: a gating network's directory per fusion mode (a ``FederationModule``'s ``export_dir``).
        train_missing: trains fusers missing from a registry (None: a missing fuser is an error).
        train_missing_gate: trains a gate named in ``gates`` but missing there (None: an error).
        gate_singles: whether a lone sender goes through its mode's gate too (False: it fuses pairwise, through its
            fuser alone, as point-to-point communication; a gate trained with every sender present may lower a
            lone sender's weight).
        console: where training is announced.
    """

    def __init__(
        self,
        federation: Federation,
        receiver: str,
        senders: Sequence[str],
        registries: dict[str, str] | None = None,
        gates: dict[str, str] | None = None,
        train_missing: FuserTraining | None = None,
        train_missing_gate: GateTraining | None = None,
        gate_singles: bool = True,
        console: Console | None = None,
    ) -> None:
        self.registries = {mode: FuserRegistry(path) for mode, path in (registries or {}).items()}
        unknown_modes = sorted(set(self.registries) - set(FUSION_MODES))
        if unknown_modes:
            raise SettingsError(f"Registries are keyed by fusion mode 'residual' or 'concat', got {unknown_modes}.")
        self.gates = {mode: Path(path) for mode, path in (gates or {}).items()}
        without_registry = sorted(set(self.gates) - set(self.registries))
        if without_registry:
            raise SettingsError(f"gates names fusion modes {without_registry} without a registry; set registries.<mode> too.")
        self.federation, self.receiver_name, self.sender_names = federation, receiver, list(senders)
        self.train_missing, self.train_missing_gate = train_missing, train_missing_gate
        self.gate_singles = gate_singles
        self.console = console or Console()

    def registry(self, mode: str) -> FuserRegistry:
        if mode not in self.registries:
            raise SettingsError(f"Route c2c.{mode} needs a fuser registry: set registries.{mode} to a directory.")
        return self.registries[mode]

    def prepare(self, modes: Sequence[str]) -> None:
        """Make sure every fuser and named gate of ``modes`` exists, training the missing ones (fusers first:
        a gate is trained over them)."""
        for mode in modes:
            self._prepare_fusers(mode)
        for mode in modes:
            self._prepare_gate(mode)

    def _prepare_fusers(self, mode: str) -> None:
        receiver = self.federation.participant(self.receiver_name)
        registry = self.registry(mode)
        for name in self.sender_names:
            sender = self.federation.participant(name)
            if registry.has(sender.identity, receiver.identity):
                continue
            if self.train_missing is None:
                registry.get(sender.identity, receiver.identity)  # raises MissingFuserError with the fix
            self.console.print(f"[bold]Training the missing fuser[/] {name} -> {self.receiver_name} ({mode})")
            sources = self.federation.sources
            path = self.train_missing.fit(
                name, mode, {"receiver": sources[self.receiver_name].describe(), "sender": sources[name].describe()}
            )
            registry.save(Fuser.load(path, sender.identity, receiver.identity))

    def _prepare_gate(self, mode: str) -> None:
        directory = self.gates.get(mode)
        if directory is None or gate_saved_in(directory):
            return
        if self.train_missing_gate is None:
            raise FileNotFoundError(
                f"gates.{mode} is {directory}, which holds no gating network: train one there (`fedrefine fit` "
                f"with a FederationModule, gating: true, export_dir: {directory}) or set train_missing_gate."
            )
        self.console.print(f"[bold]Training the missing gating network[/] of {self.receiver_name} ({mode})")
        self.train_missing_gate.fit(mode, self.registry(mode).root, directory)

    def gated(self, mode: str | None, n_senders: int) -> bool:
        """Whether a cell of ``mode`` (None: no fusion) with ``n_senders`` senders weighs them through a gate."""
        return mode in self.gates and (n_senders > 1 or self.gate_singles)

    def receiver(self, mode: str, gated: bool = True) -> FusedReceiver:
        """The receiver with every sender through ``mode``'s fusers, weighed by its gate when one is named (and
        ``gated``)."""
        model = self.federation.receiver(self.receiver_name, self.sender_names, registry=self.registry(mode))
        if gated and mode in self.gates:
            model.source_gate = load_gate(self.gates[mode], list(model.fusers))
        return model

    def fingerprints(self, modes: Sequence[str]) -> dict[str, str]:
        """Per fusion mode, a hash of each sender's fuser weights, the gate's, and whether lone senders skip it."""
        receiver = self.federation.participant(self.receiver_name)
        prints = {}
        for mode in modes:
            digest = hashlib.sha256()
            for name in self.sender_names:
                directory = self.registry(mode).directory_for(self.federation.participant(name).identity, receiver.identity)
                digest.update(name.encode() + (directory / WEIGHTS_FILE).read_bytes())
            if mode in self.gates:
                for path in sorted(self.gates[mode].glob("*.safetensors")):
                    digest.update(b"gate" + path.read_bytes())
                if not self.gate_singles:
                    digest.update(b"lone senders pairwise")
            prints[mode] = digest.hexdigest()[:16]
        return prints
