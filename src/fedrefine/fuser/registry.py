"""The server's store of fusers F[i->j] for the ordered pairs of a federation.

On disk: one directory per fuser under the registry root (``fuser.safetensors`` +
``fuser.json``), named after both identities; the JSON's exact identities are the keys::

    <root>/<sender name>-<revision>__to__<receiver name>-<revision>/fuser.json, fuser.safetensors

(each identity's ``name@revision`` with characters other than letters, digits, ``.``, ``_`` and ``-`` made
``-``; :meth:`FuserRegistry.directory_for` gives the name). A fuser in a folder of another name is refused
when the registry is read, naming the folder it belongs in. Fusers are loaded lazily on first use and kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from itertools import permutations
from pathlib import Path

import torch

from fedrefine.fuser.files import METADATA_FILE, FuserFileError
from fedrefine.fuser.fuser import Fuser
from fedrefine.participants import ParticipantIdentity

PairKey = tuple[str, str]  # (sender key, receiver key)


class MissingFuserError(KeyError):
    """The registry holds no fuser for a requested ordered pair."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _slug(identity: ParticipantIdentity) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", identity.key).strip("-")


class FuserRegistry:
    """Fusers for ordered pairs (sender -> receiver), keyed by exact participant identity.

    Args:
        root: the registry directory (created on first save).
        map_location: where loaded fusers live.
    """

    def __init__(self, root: str | Path, map_location: str | torch.device = "cpu") -> None:
        self.root = Path(root)
        self.map_location = map_location
        self._loaded: dict[PairKey, Fuser] = {}
        self._index: dict[PairKey, Path] | None = None

    def directory_for(self, sender: ParticipantIdentity, receiver: ParticipantIdentity) -> Path:
        return self.root / f"{_slug(sender)}__to__{_slug(receiver)}"

    def _scan(self) -> dict[PairKey, Path]:
        if self._index is None:
            self._index = {}
            for metadata_file in sorted(self.root.glob(f"*/{METADATA_FILE}")):
                metadata = Fuser.read_metadata(metadata_file.parent)
                sender = ParticipantIdentity.from_dict(metadata["sender"])
                receiver = ParticipantIdentity.from_dict(metadata["receiver"])
                expected = self.directory_for(sender, receiver)
                if metadata_file.parent.name != expected.name:
                    raise FuserFileError(
                        f"{metadata_file.parent} holds the fuser {sender.key} -> {receiver.key}, which the registry "
                        f"keeps in {expected}: rename the folder to {expected.name}."
                    )
                self._index[(sender.key, receiver.key)] = metadata_file.parent
        return self._index

    def pairs(self) -> list[PairKey]:
        """Ordered pairs (sender key, receiver key) that have a fuser."""
        return sorted(self._scan())

    def missing(self, participants: Iterable[ParticipantIdentity]) -> list[PairKey]:
        """Ordered pairs of ``participants`` that have no fuser yet."""
        keys = [p.key for p in participants]
        return [pair for pair in permutations(keys, 2) if pair not in self._scan()]

    def has(self, sender: ParticipantIdentity, receiver: ParticipantIdentity) -> bool:
        return (sender.key, receiver.key) in self._scan()

    def save(self, fuser: Fuser) -> Path:
        """Store a fuser under its pair (replacing an older one for the same pair)."""
        directory = fuser.save(self.directory_for(fuser.sender, fuser.receiver))
        self._scan()[(fuser.sender.key, fuser.receiver.key)] = directory
        self._loaded.pop((fuser.sender.key, fuser.receiver.key), None)
        return directory

    def get(self, sender: ParticipantIdentity, receiver: ParticipantIdentity) -> Fuser:
        """The fuser F[sender -> receiver], loaded on first use; a missing pair is an error, never a fall-back."""
        pair = (sender.key, receiver.key)
        if pair not in self._loaded:
            directory = self._scan().get(pair)
            if directory is None:
                available = ", ".join(f"{s} -> {r}" for s, r in self.pairs()) or "none"
                raise MissingFuserError(
                    f"The registry at {self.root} has no fuser for {sender.key} -> {receiver.key} "
                    f"(available: {available}). Train one with `fedrefine fit` and add it with "
                    f"`FuserRegistry.save`, or leave this sender out."
                )
            self._loaded[pair] = Fuser.load(directory, sender, receiver, map_location=self.map_location)
        return self._loaded[pair]
