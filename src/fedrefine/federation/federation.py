"""A federation: named participants plus the registry of fusers between them.

Any participant can be the receiver; any subset of the others can be its senders, each through
the registry's fuser F[sender -> receiver]. A participant may be served elsewhere
(:class:`~fedrefine.wire.RemoteSource`, e.g. ``fedrefine.runtime.RemoteParticipant``): as a sender it
is then called over its transport.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property

from fedrefine.fuser.registry import FuserRegistry
from fedrefine.fusion import Combine, FusedReceiver
from fedrefine.participants import Participant
from fedrefine.participants.sources import ParticipantSource
from fedrefine.wire import RemoteSender, RemoteSource


class Federation:
    """Participants by name (loaded lazily) and the fuser registry.

    Args:
        participants: name -> where the participant comes from.
        registry: the registry (or its directory) holding F[i->j]; None when every receiver names its own.
    """

    def __init__(self, participants: Mapping[str, ParticipantSource], registry: str | FuserRegistry | None) -> None:
        if len(participants) < 2:
            raise ValueError("A federation needs at least two participants.")
        self.sources = dict(participants)
        self.registry = registry if isinstance(registry, FuserRegistry) or registry is None else FuserRegistry(registry)
        self._loaded: dict[str, Participant] = {}
        self._clients: dict[str, RemoteSender] = {}

    def participant(self, name: str) -> Participant:
        if name not in self.sources:
            raise KeyError(f"Unknown participant {name!r}; the federation has {sorted(self.sources)}.")
        if name not in self._loaded:
            self._loaded[name] = self.sources[name].load()
        return self._loaded[name]

    def client(self, name: str) -> RemoteSender | None:
        """The client of a participant served elsewhere (one per federation), None for in-process ones."""
        source = self.sources[name]
        if not isinstance(source, RemoteSource):
            return None
        if name not in self._clients:
            self._clients[name] = source.client()
        return self._clients[name]

    @cached_property
    def names(self) -> list[str]:
        return list(self.sources)

    def _registry(self, override: FuserRegistry | None = None) -> FuserRegistry:
        registry = override or self.registry
        if registry is None:
            raise ValueError("This federation has no fuser registry: give it the registry's directory.")
        return registry

    def missing_pairs(self) -> list[tuple[str, str]]:
        """Ordered (sender, receiver) name pairs with no fuser in the registry (loads every participant)."""
        return [
            (s, r) for s in self.names for r in self.names
            if s != r and not self._registry().has(self.participant(s).identity, self.participant(r).identity)
        ]

    def receiver(
        self,
        name: str,
        senders: Sequence[str],
        combine: Combine = "parallel",
        registry: FuserRegistry | None = None,
    ) -> FusedReceiver:
        """Participant ``name`` fused with ``senders`` through the fusers of ``registry`` (default: the
        federation's); a missing fuser is an error. A gating network is attached afterwards (``source_gate``):
        one that reads the senders is built from these fusers."""
        if name in senders:
            raise ValueError(f"{name!r} cannot be its own sender.")
        if isinstance(self.sources[name], RemoteSource):
            raise ValueError(f"{name!r} is served elsewhere; a receiver must run here (give it an in-process source).")
        receiver = self.participant(name)
        chosen = [self.participant(s) for s in senders]
        fusers = [self._registry(registry).get(s.identity, receiver.identity) for s in chosen]
        remotes = {s: client for s in senders if (client := self.client(s)) is not None}
        return FusedReceiver(receiver, chosen, fusers, combine, sender_names=list(senders), remotes=remotes)
