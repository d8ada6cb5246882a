"""A saved gating network, whichever kind it is: the files in its directory say which."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedrefine.fuser import Fuser
from fedrefine.fusion.gating import METADATA_FILE as SOURCE_GATE_FILE
from fedrefine.fusion.gating import SourceGate
from fedrefine.fusion.sender_gate import METADATA_FILE as SENDER_STATE_GATE_FILE
from fedrefine.fusion.sender_gate import SenderStateGate

#: Each kind of gating network by the metadata file it saves.
GATE_KINDS: tuple[tuple[str, type[SourceGate] | type[SenderStateGate]], ...] = (
    (SENDER_STATE_GATE_FILE, SenderStateGate),
    (SOURCE_GATE_FILE, SourceGate),
)


def gate_saved_in(directory: str | Path) -> bool:
    """Whether ``directory`` holds a saved gating network of either kind."""
    return any((Path(directory) / metadata).is_file() for metadata, _ in GATE_KINDS)


def load_gate(directory: str | Path, fusers: Sequence[Fuser]) -> SourceGate | SenderStateGate:
    """The gating network saved in ``directory`` (a ``FederationModule``'s ``export_dir``), for exactly the
    senders and receiver of ``fusers`` (one per sender, in order)."""
    for metadata, kind in GATE_KINDS:
        if (Path(directory) / metadata).is_file():
            return kind.load(directory, fusers)
    names = " or ".join(metadata for metadata, _ in GATE_KINDS)
    raise FileNotFoundError(
        f"No gating network at {directory}: it holds no {names}. Train one with `fedrefine fit` "
        f"(a FederationModule with gating: true) and point here at its export_dir."
    )
