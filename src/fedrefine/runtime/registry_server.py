"""``fedrefine serve registry``: a :class:`~fedrefine.fuser.registry.FuserRegistry` directory as a gRPC service.

    List      -> every ordered pair held, with the exact identities and each file's name, size, sha256
    Download  -> the files of one pair's fuser, streamed in 1 MiB chunks (sha256 and size on a file's first)
    health    -> gRPC's standard health service

The root is laid out as :class:`FuserRegistry` writes it (one directory per fuser, ``fuser.json`` beside
``fuser.safetensors``) and is read afresh on every call, so fusers saved while the server runs are served.
Fusers are keyed by the exact identities in their ``fuser.json``: a request for any other pair is
``NOT_FOUND``, never a near match. Only the two files of a fuser directory are ever sent. Digests are
computed when a file is first served and kept while its size and modification time stay the same.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import grpc

from fedrefine.fuser import METADATA_FILE, WEIGHTS_FILE, Fuser
from fedrefine.fuser.registry import PairKey
from fedrefine.participants import ParticipantIdentity
from fedrefine.runtime.identities import identity_differences, identity_from_json, identity_json
from fedrefine.runtime.protos import registry_pb2 as pb
from fedrefine.runtime.protos import registry_pb2_grpc as pb_grpc
from fedrefine.runtime.security import ServerSecurity, logger
from fedrefine.runtime.serving import (
    add_address_arguments,
    add_health,
    add_security_arguments,
    new_server,
    security_from,
    serve_forever,
)

SERVICE_NAME = "fedrefine.registry.v1.FuserRegistry"
#: Bytes of file data per streamed chunk (well under gRPC's 4 MiB default message size).
CHUNK_BYTES = 1 << 20
#: The files of one fuser, in the order they are sent; nothing else is ever served.
FUSER_FILES = (METADATA_FILE, WEIGHTS_FILE)
_READ_BYTES = 8 << 20


def pair_text(pair: PairKey) -> str:
    return f"{pair[0]} -> {pair[1]}"


# --- the files served ----------------------------------------------------------------------------
class FileDigests:
    """sha256 of served files, cached by (path, size, modification time): a changed file is hashed again."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def digest(self, path: Path, handle: BinaryIO) -> str:
        """The digest of the open file ``handle`` (of ``path``), from the cache when its stat still matches."""
        stat = os.fstat(handle.fileno())
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            known = self._cache.get(key)
        if known is not None:
            return known
        handle.seek(0)
        hasher = hashlib.sha256()
        while block := handle.read(_READ_BYTES):
            hasher.update(block)
        handle.seek(0)
        with self._lock:
            self._cache[key] = hasher.hexdigest()
        return self._cache[key]


@dataclass(frozen=True)
class StoredFuser:
    """One fuser directory under the root and the exact pair its ``fuser.json`` names."""

    sender: ParticipantIdentity
    receiver: ParticipantIdentity
    directory: Path


class RegistryServicer(pb_grpc.FuserRegistryServicer):
    """The gRPC methods of the registry over the fuser directories under ``root``.

    Args:
        root: a registry directory as :class:`~fedrefine.fuser.registry.FuserRegistry` writes it.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._digests = FileDigests()
        self._warned: set[str] = set()

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning("%s", message)

    def scan(self) -> dict[PairKey, StoredFuser]:
        """The fusers under the root now, by (sender key, receiver key).

        A directory that cannot be served (unreadable ``fuser.json``, no weights file) is left out with a
        warning naming it; of two directories for one pair, the later by name is served (as FuserRegistry
        does) and the other named in a warning.
        """
        found: dict[PairKey, StoredFuser] = {}
        for metadata_file in sorted(self.root.glob(f"*/{METADATA_FILE}")):
            directory = metadata_file.parent
            try:
                metadata = Fuser.read_metadata(directory)
                sender = ParticipantIdentity.from_dict(metadata["sender"])
                receiver = ParticipantIdentity.from_dict(metadata["receiver"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                self._warn_once(f"Not serving {directory}: its {METADATA_FILE} cannot be read ({err}).")
                continue
            if not (directory / WEIGHTS_FILE).is_file():
                self._warn_once(f"Not serving {directory}: {WEIGHTS_FILE} is missing beside {METADATA_FILE}.")
                continue
            pair = (sender.key, receiver.key)
            if pair in found:
                self._warn_once(f"{found[pair].directory} and {directory} both hold a fuser for "
                                f"{pair_text(pair)}; serving {directory}. Remove the stale one.")
            found[pair] = StoredFuser(sender, receiver, directory)
        return found

    def _available(self, stored: dict[PairKey, StoredFuser]) -> str:
        return ", ".join(pair_text(pair) for pair in sorted(stored)) or "none"

    # --- List --------------------------------------------------------------------------------------
    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListReply:
        reply = pb.ListReply()
        for pair, stored in sorted(self.scan().items()):
            try:
                files = [self._entry(stored.directory / name) for name in FUSER_FILES]
            except OSError as err:  # removed or made unreadable since the scan
                self._warn_once(f"Not listing {pair_text(pair)} from {stored.directory}: {err}")
                continue
            reply.fusers.add(
                sender_identity_json=identity_json(stored.sender),
                receiver_identity_json=identity_json(stored.receiver),
                files=files,
            )
        return reply

    def _entry(self, path: Path) -> pb.FileEntry:
        with path.open("rb") as handle:
            return pb.FileEntry(name=path.name, size=os.fstat(handle.fileno()).st_size,
                                sha256=self._digests.digest(path, handle))

    # --- Download ----------------------------------------------------------------------------------
    def Download(self, request: pb.DownloadRequest, context: grpc.ServicerContext) -> Iterator[pb.FileChunk]:
        try:
            sender = identity_from_json(request.sender_identity_json, "sender")
            receiver = identity_from_json(request.receiver_identity_json, "receiver")
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        names = list(request.files) or list(FUSER_FILES)
        refused = [name for name in names if name not in FUSER_FILES]
        if refused:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a fuser's files are {list(FUSER_FILES)}; "
                                                            f"{refused} are not among them")
        if len(set(names)) != len(names):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"files {names} name a file twice")
        stored = self.scan()
        pair = (sender.key, receiver.key)
        fuser = stored.get(pair)
        if fuser is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"this registry has no fuser for {pair_text(pair)} "
                                                     f"(available: {self._available(stored)})")
        if (fuser.sender, fuser.receiver) != (sender, receiver):
            differences = [f"{role} {difference}" for role, held, asked in
                           (("sender", fuser.sender, sender), ("receiver", fuser.receiver, receiver))
                           for difference in identity_differences(held, asked)]
            context.abort(grpc.StatusCode.NOT_FOUND, f"this registry's fuser for {pair_text(pair)} was trained for "
                          f"other identities ({'; '.join(differences)}): train one for this exact pair")
        for name in names:
            yield from self._file_chunks(fuser.directory / name, context)

    def _file_chunks(self, path: Path, context: grpc.ServicerContext) -> Iterator[pb.FileChunk]:
        """``path`` in :data:`CHUNK_BYTES` pieces, the first with its size and sha256 (at least one chunk)."""
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"{path.name} of this fuser was removed while it was being sent")
        except OSError as err:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{path.name} of this fuser cannot be read now ({err}); retry")
        with handle:
            size = os.fstat(handle.fileno()).st_size
            chunk = pb.FileChunk(name=path.name, offset=0, size=size, sha256=self._digests.digest(path, handle))
            offset = 0
            while True:  # one chunk even for an empty file, so the client sees every file it asked for
                want = min(CHUNK_BYTES, size - offset)
                chunk.data = handle.read(want)
                if len(chunk.data) < want:
                    context.abort(grpc.StatusCode.ABORTED, f"{path.name} shrank while it was being sent; retry")
                yield chunk
                offset += want
                if offset >= size or not context.is_active():
                    return
                chunk = pb.FileChunk(name=path.name, offset=offset)


def serve_registry(
    root: str | Path, host: str = "127.0.0.1", port: int = 0, security: ServerSecurity | None = None
) -> tuple[grpc.Server, int]:
    """A (not yet started) registry server over ``root`` and the port it is bound to."""
    security = security or ServerSecurity()
    servicer = RegistryServicer(root)
    held = servicer.scan()
    if held:
        logger.info("serving %d fusers from %s", len(held), servicer.root)
    else:
        logger.warning("%s holds no fusers yet; List answers an empty registry until some are saved there.", root)
    server = new_server(security)
    pb_grpc.add_FuserRegistryServicer_to_server(servicer, server)
    add_health(server, SERVICE_NAME)
    bound = security.add_port(server, f"{host}:{port}")
    return server, bound


def config_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedrefine serve registry",
        description="Serve a fuser registry directory over gRPC: fusers by exact (sender, receiver) identity.",
    )
    parser.add_argument("--root", required=True, type=Path, metavar="DIR",
                        help="the registry directory (one sub-directory per fuser, as FuserRegistry.save writes)")
    add_address_arguments(parser)
    add_security_arguments(parser)
    return parser


def main(argv: list[str]) -> None:
    parser = config_parser()
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"--root {args.root} is not a directory; point it at a registry directory "
                     f"(FuserRegistry(root).save(fuser) writes one).")
    server, port = serve_registry(args.root, args.host, args.port, security_from(args))
    serve_forever(server, port, "fuser registry", args.ready_file)
