"""A receiver's view of a remote fuser registry (``fedrefine serve registry``): list, download, verify, load.

:class:`RemoteFuserRegistry` is a :class:`~fedrefine.fuser.registry.FuserRegistry` whose pairs are the server's.
``get`` downloads a pair's two files into a local cache directory (laid out as a FuserRegistry root) and
uses them only once every file matches the sha256 of the server's listing and ``fuser.json`` names exactly
the pair asked for. Cached files with the right digest are not downloaded again.

Every call has a deadline. Listing, the first call to the server, is retried a bounded number of times
while the server is ``UNAVAILABLE`` (starting up, a dropped connection); any other refusal is raised at
once as a :class:`RegistryDownloadError` naming the endpoint, the gRPC status and what to do.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import grpc
import torch

from fedrefine.fuser import Fuser, FuserPairMismatchError
from fedrefine.fuser.registry import FuserRegistry, MissingFuserError, PairKey
from fedrefine.participants import ParticipantIdentity
from fedrefine.runtime.identities import identity_differences, identity_from_json, identity_json
from fedrefine.runtime.protos import registry_pb2 as pb
from fedrefine.runtime.protos import registry_pb2_grpc as pb_grpc
from fedrefine.runtime.registry_server import FUSER_FILES, pair_text
from fedrefine.runtime.security import ClientSecurity, logger, split_endpoint

#: Tries of the first call (the listing) while the server is UNAVAILABLE, all within ``timeout_s``.
CONNECT_TRIES = 3
#: Seconds before the second try; doubled before each further one.
FIRST_BACKOFF_S = 0.5
#: A download's deadline is ``timeout_s`` plus its size at this rate: a slower one counts as stalled.
MIN_DOWNLOAD_BYTES_PER_S = 10 * 2**20
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HASH_READ_BYTES = 8 << 20
#: Keep gRPC's own reconnect back-off shorter than ours, so that every try really dials the server.
_CHANNEL_OPTIONS: list[tuple[str, object]] = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

T = TypeVar("T")


class RegistryDownloadError(RuntimeError):
    """The remote registry refused a call, or sent something that is not used: a file whose sha256 differs
    from its listing, a fuser for another pair, an incomplete or malformed answer."""


class RegistryUnreachableError(RegistryDownloadError, ConnectionError):
    """The registry's endpoint did not answer within the timeout (not running, wrong address, TLS mismatch)."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a remote fuser, as the server lists it."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class RemoteFuser:
    """A pair the remote registry holds: its exact identities and its files."""

    sender: ParticipantIdentity
    receiver: ParticipantIdentity
    files: tuple[RemoteFile, ...]

    @property
    def pair(self) -> PairKey:
        return (self.sender.key, self.receiver.key)


def file_sha256(path: Path) -> str:
    """The lower-case hex sha256 of the file at ``path`` (read in blocks, never whole)."""
    hasher = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_HASH_READ_BYTES):
            hasher.update(block)
    return hasher.hexdigest()


class RegistryConnection:
    """The calls to one ``fedrefine serve registry`` server: its listing, and a pair's files streamed into a
    directory, each kept only once its size and sha256 match the listing.

    Every call carries the federation's token and a deadline; the listing is retried while the server is
    UNAVAILABLE, and a failed call is raised as a :class:`RegistryDownloadError` (or
    :class:`RegistryUnreachableError`) naming the endpoint, the gRPC status and what to do.

    Args:
        endpoint: ``grpc://host:port``, or ``grpcs://host:port`` for TLS.
        security: the federation's token and, for ``grpcs://``, TLS material.
        timeout_s: deadline of each call, and of the retried connection set-up as a whole; a download gets
            this plus its size at :data:`MIN_DOWNLOAD_BYTES_PER_S`.
    """

    def __init__(self, endpoint: str, security: ClientSecurity, timeout_s: float) -> None:
        target, tls = split_endpoint(endpoint)
        self.endpoint, self.timeout_s, self.security = endpoint, timeout_s, security
        self._channel = self.security.channel(target, tls, _CHANNEL_OPTIONS)
        self._stub = pb_grpc.FuserRegistryStub(self._channel)
        #: Files this connection fetched over the network, in order.
        self.downloaded: list[Path] = []

    # --- the listing -------------------------------------------------------------------------------
    def list_fusers(self) -> dict[PairKey, RemoteFuser]:
        """The server's fusers by (sender key, receiver key), listed now (with connection retries)."""
        reply = self._with_retries(lambda remaining: self._stub.List(
            pb.ListRequest(), timeout=remaining, metadata=self.security.metadata()), "List")
        return _parse_listing(reply, self._malformed)

    def _malformed(self, what: str) -> RegistryDownloadError:
        return RegistryDownloadError(f"The fuser registry at {self.endpoint} sent a malformed listing: {what}. "
                                     f"Is the server a FedRefine registry of this version?")

    # --- downloads ---------------------------------------------------------------------------------
    def download(self, remote: RemoteFuser, files: list[RemoteFile], directory: Path) -> None:
        """Stream ``files`` into ``directory``; each is kept only once its size and sha256 match the listing."""
        listed = {f.name: f for f in files}
        received: list[str] = []
        request = pb.DownloadRequest(sender_identity_json=identity_json(remote.sender),
                                     receiver_identity_json=identity_json(remote.receiver), files=list(listed))
        deadline = self.timeout_s + sum(f.size for f in files) / MIN_DOWNLOAD_BYTES_PER_S
        current: _Incoming | None = None
        try:
            for chunk in self._stub.Download(request, timeout=deadline, metadata=self.security.metadata()):
                if current is None or chunk.name != current.file.name:
                    if current is not None:
                        self._keep(current, remote)
                        received.append(current.file.name)
                    current = self._start(chunk, listed, received, remote, directory)
                current.write(chunk, self._corrupt_stream)
            if current is not None:
                self._keep(current, remote)
                received.append(current.file.name)
        except grpc.RpcError as err:
            raise self._refusal(err, f"the download of {pair_text(remote.pair)}") from None
        finally:
            if current is not None:
                current.discard()
        if missing := [name for name in listed if name not in received]:
            raise self._corrupt_stream(f"the download of {pair_text(remote.pair)} ended without {missing}")

    def _start(self, chunk: pb.FileChunk, listed: dict[str, RemoteFile], received: list[str], remote: RemoteFuser,
               directory: Path) -> _Incoming:
        file = listed.get(chunk.name)
        if file is None or chunk.name in received:
            raise self._corrupt_stream(f"it sent {chunk.name!r}, which was not asked for (or sent twice)")
        if chunk.offset != 0:
            raise self._corrupt_stream(f"{chunk.name} started at offset {chunk.offset}")
        if (chunk.size, chunk.sha256) != (file.size, file.sha256):
            raise RegistryDownloadError(
                f"{chunk.name} of the fuser for {pair_text(remote.pair)} changed on the registry at {self.endpoint} "
                f"since it was listed (now {chunk.size} bytes, sha256 {chunk.sha256}; listed {file.size} bytes, "
                f"sha256 {file.sha256}). Call refresh() and get it again."
            )
        handle = tempfile.NamedTemporaryFile(dir=directory, prefix=f".{file.name}.", suffix=".partial", delete=False)
        return _Incoming(file, handle, Path(handle.name), hashlib.sha256(), 0)

    def _keep(self, incoming: _Incoming, remote: RemoteFuser) -> None:
        """Move a completely received file into place if its size and sha256 are the listed ones; else refuse."""
        file = incoming.file
        incoming.handle.close()
        if incoming.written != file.size:
            raise self._corrupt_stream(f"{file.name} ended after {incoming.written} of its {file.size} bytes")
        actual = incoming.hasher.hexdigest()
        if actual != file.sha256:
            raise RegistryDownloadError(
                f"{file.name} of the fuser for {pair_text(remote.pair)} from {self.endpoint} failed its checksum: "
                f"expected sha256 {file.sha256} (the registry's listing), got {actual}. The file was not kept. "
                f"It was corrupted on the way or on the server: retry, and if it persists have the registry's "
                f"operator re-export the fuser."
            )
        final = incoming.partial.with_name(file.name)
        os.replace(incoming.partial, final)
        incoming.kept = True
        self.downloaded.append(final)

    def _corrupt_stream(self, what: str) -> RegistryDownloadError:
        return RegistryDownloadError(f"The fuser registry at {self.endpoint} sent an unusable download: {what}. "
                                     f"Nothing of it was kept; retry.")

    # --- calls -------------------------------------------------------------------------------------
    def _with_retries(self, call: Callable[[float], T], what: str) -> T:
        """``call(remaining seconds)``, tried up to :data:`CONNECT_TRIES` times within ``timeout_s`` while
        the server is UNAVAILABLE, with a doubling back-off."""
        start = time.monotonic()
        deadline = start + self.timeout_s
        backoff = FIRST_BACKOFF_S
        for attempt in range(1, CONNECT_TRIES + 1):
            try:
                return call(max(deadline - time.monotonic(), 0.001))
            except grpc.RpcError as err:
                left = deadline - time.monotonic()
                if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == CONNECT_TRIES or left <= backoff:
                    raise self._refusal(err, what, attempt, time.monotonic() - start) from None
                logger.info("Fuser registry at %s unavailable (try %d of %d); retrying in %.1f s.",
                            self.endpoint, attempt, CONNECT_TRIES, backoff)
                time.sleep(backoff)
                backoff *= 2
        raise AssertionError("unreachable")  # the loop returns or raises

    def _refusal(
        self, err: grpc.RpcError, what: str, tries: int = 1, seconds: float | None = None
    ) -> RegistryDownloadError | MissingFuserError:
        """The error to raise for a failed call, naming the endpoint, the gRPC status and what to do."""
        return _refusal_error(err, self.endpoint, self.timeout_s, self.security, what, tries, seconds)

    def close(self) -> None:
        """Close the channel to the server."""
        self._channel.close()


def _parse_listing(reply: pb.ListReply, malformed: Callable[[str], RegistryDownloadError]
                   ) -> dict[PairKey, RemoteFuser]:
    """The fusers of a List reply by pair; ``malformed(what)`` is raised for an unusable one."""
    listing: dict[PairKey, RemoteFuser] = {}
    for entry in reply.fusers:
        try:
            sender = identity_from_json(entry.sender_identity_json, "sender")
            receiver = identity_from_json(entry.receiver_identity_json, "receiver")
        except ValueError as err:
            raise malformed(f"a listed fuser's {err}") from None
        files = tuple(RemoteFile(f.name, f.size, f.sha256) for f in entry.files)
        names = sorted(f.name for f in files)
        if names != sorted(FUSER_FILES):
            raise malformed(f"the fuser for {sender.key} -> {receiver.key} is listed with files {names}, "
                            f"not a fuser's {sorted(FUSER_FILES)}")
        if bad := [f.name for f in files if not _SHA256.fullmatch(f.sha256)]:
            raise malformed(f"{bad} of {sender.key} -> {receiver.key} are listed without a sha256 digest")
        fuser = RemoteFuser(sender, receiver, files)
        if fuser.pair in listing:
            raise malformed(f"{pair_text(fuser.pair)} is listed twice")
        listing[fuser.pair] = fuser
    return listing


def _refusal_error(err: grpc.RpcError, endpoint: str, timeout_s: float, security: ClientSecurity, what: str,
                   tries: int = 1, seconds: float | None = None) -> RegistryDownloadError | MissingFuserError:
    """The error to raise for a failed call to ``endpoint``, naming it, the gRPC status and what to do."""
    code: grpc.StatusCode = err.code()
    status = f"{code.name}: {err.details()}"
    if code == grpc.StatusCode.UNAVAILABLE:
        tls = " For a grpcs:// endpoint, check ca_file (the CA or self-signed certificate that signed the " \
              "server's) and server_name." if endpoint.startswith("grpcs://") else ""
        took = "" if seconds is None else f" in {seconds:.1f} s"
        return RegistryUnreachableError(
            f"Cannot reach the fuser registry at {endpoint} for {what} ({tries} "
            f"tr{'y' if tries == 1 else 'ies'}{took}, timeout_s {timeout_s:g}; {status}). Is `fedrefine serve "
            f"registry` running there, and is the address right?{tls}"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return RegistryUnreachableError(
            f"The fuser registry at {endpoint} did not finish {what} in time ({status}). Raise timeout_s "
            f"(now {timeout_s:g} s) for a slow link, or check the server."
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        given = "no token was given" if not security.metadata() else "the token given is not this registry's"
        return RegistryDownloadError(
            f"The fuser registry at {endpoint} refused {what}: {status} ({given}). Give the federation's "
            f"token with ClientSecurity(token_file=...) or token_env."
        )
    if code == grpc.StatusCode.NOT_FOUND:
        return MissingFuserError(f"The fuser registry at {endpoint} refused {what}: {status}.")
    return RegistryDownloadError(f"The fuser registry at {endpoint} refused {what}: {status}.")


class RemoteFuserRegistry(FuserRegistry):
    """The fusers of a ``fedrefine serve registry`` server, downloaded on first use into ``cache_dir``.

    ``pairs``, ``has`` and ``missing`` answer from the server's listing (fetched on first use; ``refresh``
    forgets it); ``get`` downloads, verifies and loads one pair's fuser. The registry is read-only.
    The calls to the server are a :class:`RegistryConnection`'s.

    Args:
        endpoint: ``grpc://host:port``, or ``grpcs://host:port`` for TLS.
        cache_dir: where downloaded fusers are kept, one sub-directory per pair (a FuserRegistry root).
        security: the federation's token and, for ``grpcs://``, TLS material; None: no token, system roots.
        timeout_s: deadline of each call, and of the retried connection set-up as a whole; a download gets
            this plus its size at :data:`MIN_DOWNLOAD_BYTES_PER_S`.
        map_location: where loaded fusers live.
    """

    def __init__(
        self,
        endpoint: str,
        cache_dir: str | Path,
        security: ClientSecurity | None = None,
        timeout_s: float = 30.0,
        map_location: str | torch.device = "cpu",
    ) -> None:
        super().__init__(cache_dir, map_location)
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}.")
        self._connection = RegistryConnection(endpoint, security or ClientSecurity(), timeout_s)
        self.endpoint, self.timeout_s = endpoint, timeout_s
        self.security = self._connection.security
        self._remote: dict[PairKey, RemoteFuser] | None = None
        #: Files this registry fetched over the network (not those found in the cache), in order.
        self.downloaded: list[Path] = self._connection.downloaded

    # --- the listing -------------------------------------------------------------------------------
    def remote_fusers(self) -> dict[PairKey, RemoteFuser]:
        """The server's fusers by (sender key, receiver key), listed on first use and kept until ``refresh``."""
        if self._remote is None:
            self._remote = self._connection.list_fusers()
        return self._remote

    def refresh(self) -> None:
        """Forget the listing (and the loaded fusers): the next call lists the server again."""
        self._remote = None
        self._loaded.clear()

    def _scan(self) -> dict[PairKey, Path]:  # what FuserRegistry's pairs / has / missing read
        return {pair: self.directory_for(f.sender, f.receiver) for pair, f in self.remote_fusers().items()}

    # --- get ---------------------------------------------------------------------------------------
    def get(self, sender: ParticipantIdentity, receiver: ParticipantIdentity) -> Fuser:
        """F[sender -> receiver]: downloaded (unless cached with the listed sha256s), verified, loaded, kept."""
        pair = (sender.key, receiver.key)
        if pair not in self._loaded:
            remote = self.remote_fusers().get(pair)
            if remote is None:  # perhaps saved on the server since the listing
                self._remote = None
                remote = self.remote_fusers().get(pair)
            if remote is None:
                available = ", ".join(pair_text(p) for p in self.pairs()) or "none"
                raise MissingFuserError(
                    f"The fuser registry at {self.endpoint} has no fuser for {pair_text(pair)} (available: "
                    f"{available}). Train one with `fedrefine fit` and save it into the registry's root on the "
                    f"server, or leave this sender out."
                )
            if (remote.sender, remote.receiver) != (sender, receiver):
                differences = [f"{role} {difference}" for role, held, asked in
                               (("sender", remote.sender, sender), ("receiver", remote.receiver, receiver))
                               for difference in identity_differences(held, asked)]
                raise FuserPairMismatchError(
                    f"The fuser registry at {self.endpoint} holds a fuser for {pair_text(pair)} trained for other "
                    f"identities ({'; '.join(differences)}). Train one for this exact pair with `fedrefine fit`."
                )
            directory = self.directory_for(sender, receiver)
            self._fetch(remote, directory)
            self._check_pair(directory, sender, receiver)
            self._loaded[pair] = Fuser.load(directory, sender, receiver, map_location=self.map_location)
        return self._loaded[pair]

    def save(self, fuser: Fuser) -> Path:
        raise NotImplementedError(
            f"The fuser registry at {self.endpoint} is read-only here: a receiver downloads fusers, it never "
            f"uploads them. Save {pair_text((fuser.sender.key, fuser.receiver.key))} into the registry's root on the "
            f"server (FuserRegistry(root).save(fuser)); the running `fedrefine serve registry` lists it at once."
        )

    def _fetch(self, remote: RemoteFuser, directory: Path) -> None:
        """Make ``directory`` hold ``remote``'s files with their listed digests, downloading those it lacks."""
        directory.mkdir(parents=True, exist_ok=True)
        stale = []
        for file in remote.files:
            path = directory / file.name
            if path.is_file() and path.stat().st_size == file.size and file_sha256(path) == file.sha256:
                continue
            if path.exists():
                logger.info("Cached %s does not match the registry's sha256; downloading it again.", path)
                path.unlink()
            stale.append(file)
        if stale:
            self._connection.download(remote, stale, directory)

    def _check_pair(self, directory: Path, sender: ParticipantIdentity, receiver: ParticipantIdentity) -> None:
        """Refuse (and remove) downloaded files whose ``fuser.json`` names another pair than the one asked for."""
        metadata = Fuser.read_metadata(directory)
        named = (ParticipantIdentity.from_dict(metadata["sender"]), ParticipantIdentity.from_dict(metadata["receiver"]))
        if named != (sender, receiver):
            for name in FUSER_FILES:
                (directory / name).unlink(missing_ok=True)
            raise RegistryDownloadError(
                f"The fuser registry at {self.endpoint} sent a fuser for another pair: asked for "
                f"{pair_text((sender.key, receiver.key))}, its fuser.json names {pair_text((named[0].key, named[1].key))}"
                f"{'' if (named[0].key, named[1].key) != (sender.key, receiver.key) else ' with other shapes'}. "
                f"It was not used (and removed from {directory}); the registry's root holds a mislabelled fuser: "
                f"tell its operator."
            )

    # --- lifetime ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the channel to the server (loaded fusers and the cache stay usable)."""
        self._connection.close()

    def __enter__(self) -> RemoteFuserRegistry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass
class _Incoming:
    """A file being received: its listing, the temporary file it goes to, its running digest and length."""

    file: RemoteFile
    handle: BinaryIO
    partial: Path
    hasher: hashlib._Hash
    written: int
    kept: bool = False

    def write(self, chunk: pb.FileChunk, corrupt: Callable[[str], RegistryDownloadError]) -> None:
        if chunk.offset != self.written:
            raise corrupt(f"{self.file.name} jumped to offset {chunk.offset} after {self.written} bytes")
        if self.written + len(chunk.data) > self.file.size:
            raise corrupt(f"{self.file.name} is longer than its listed {self.file.size} bytes")
        self.handle.write(chunk.data)
        self.hasher.update(chunk.data)
        self.written += len(chunk.data)

    def discard(self) -> None:
        """Remove the temporary file unless it was kept."""
        self.handle.close()
        if not self.kept:
            self.partial.unlink(missing_ok=True)
