"""``fedrefine serve registry``: a :class:`~fedrefine.fuser.registry.FuserRegistry` directory as a gRPC service.

    List      -> every ordered pair held, with the exact identities and each file's name, size, sha256
    Download  -> the files of one pair's fuser, streamed in 1 MiB chunks (sha256 and size on a file's first)
    health    -> gRPC's standard health service

The root is laid out as :class:`FuserRegistry` writes it (one directory per fuser, ``fuser.json`` beside
``fuser.safetensors``) and is read afresh on every call, so fusers saved while the server runs are served.
Fusers are keyed by the exact identities in their ``fuser.json``: a request for any other pair is
``NOT_FOUND``, never a near match. Only the two files of a fuser directory are ever sent, and only when
they are regular files (no symlink) inside the root, in a directory that is no symlink either. Digests are
kept while a file's inode, size, modification and change times stay the same (an edit that restores the
modification time still changes the change time), and every file is hashed again as it is sent: a file that
changed under the server is never served with a stale digest (the call is ``ABORTED``, its digest forgotten).
Downloads are admitted by a :class:`~fedrefine.runtime.admission.CallGate` (bounded per client and in total,
each send with a deadline), so List and health stay answerable.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import grpc

from fedrefine.fuser import METADATA_FILE, WEIGHTS_FILE, Fuser
from fedrefine.fuser.registry import PairKey
from fedrefine.participants import ParticipantIdentity
from fedrefine.runtime.admission import CallGate, RequestError, checked, refuse
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
DEFAULT_MAX_CALLS, DEFAULT_MAX_CALLS_PER_CLIENT, DEFAULT_SEND_TIMEOUT_S = 8, 4, 10.0


def pair_text(pair: PairKey) -> str:
    return f"{pair[0]} -> {pair[1]}"


# --- the files served ----------------------------------------------------------------------------
class FileDigests:
    """sha256 of served files, cached by (path, inode, size, modification and change time): a changed file is
    hashed again."""

    def __init__(self) -> None:
        self._cache: dict[tuple, str] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(path: Path, handle: BinaryIO) -> tuple:
        info = os.fstat(handle.fileno())
        return str(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns

    def forget(self, path: Path) -> None:
        with self._lock:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != str(path)}

    def digest(self, path: Path, handle: BinaryIO) -> str:
        """The digest of the open file ``handle`` (of ``path``), from the cache when its stat still matches."""
        key = self._key(path, handle)
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


def open_served(root: Path, path: Path) -> BinaryIO:
    """``path`` opened for reading if it is a regular file (not a symlink) in a directory that is no symlink,
    resolving inside ``root``; else :class:`PermissionError` naming why."""
    if path.parent.is_symlink() or path.is_symlink():
        raise PermissionError(f"{path} is a symlink; a registry serves only regular files inside its root")
    if not path.resolve().is_relative_to(root.resolve()):
        raise PermissionError(f"{path} resolves outside the registry root {root}")
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    handle = os.fdopen(descriptor, "rb")
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        handle.close()
        raise PermissionError(f"{path} is not a regular file")
    return handle


#: Longest identity JSON a Download request may carry (a real one is a few hundred characters).
MAX_IDENTITY_CHARS = 16384


def check_download(request: pb.DownloadRequest) -> tuple[ParticipantIdentity, ParticipantIdentity, list[str]]:
    """(sender, receiver, file names) of a Download request, every field bounded; else :class:`RequestError`."""
    longest = max(len(request.sender_identity_json), len(request.receiver_identity_json))
    if longest > MAX_IDENTITY_CHARS:
        raise RequestError(f"an identity of {longest:,} characters; at most {MAX_IDENTITY_CHARS:,}")
    try:
        sender = identity_from_json(request.sender_identity_json, "sender")
        receiver = identity_from_json(request.receiver_identity_json, "receiver")
    except (ValueError, TypeError, RecursionError) as err:
        raise RequestError(str(err)[:200]) from None
    if len(request.files) > len(FUSER_FILES):
        raise RequestError(f"{len(request.files)} files asked for; a fuser has {len(FUSER_FILES)}")
    names = list(request.files) or list(FUSER_FILES)
    refused = [name[:40] for name in names if name not in FUSER_FILES]
    if refused:
        raise RequestError(f"a fuser's files are {list(FUSER_FILES)}; {refused} are not among them")
    if len(set(names)) != len(names):
        raise RequestError(f"files {names} name a file twice")
    return sender, receiver, names


class RegistryServicer(pb_grpc.FuserRegistryServicer):
    """The gRPC methods of the registry over the fuser directories under ``root``.

    Args:
        root: a registry directory as :class:`~fedrefine.fuser.registry.FuserRegistry` writes it.
        gate: admits Downloads (default: :class:`CallGate` with the ``fedrefine serve registry`` defaults).
    """

    def __init__(self, root: str | Path, gate: CallGate | None = None) -> None:
        self.root = Path(root)
        self.gate = gate or CallGate(DEFAULT_MAX_CALLS, DEFAULT_MAX_CALLS_PER_CLIENT, DEFAULT_SEND_TIMEOUT_S)
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
                for name in FUSER_FILES:
                    open_served(self.root, directory / name).close()
            except FileNotFoundError:
                self._warn_once(f"Not serving {directory}: {WEIGHTS_FILE} is missing beside {METADATA_FILE}.")
                continue
            except OSError as err:  # symlinks (ELOOP from O_NOFOLLOW), files outside the root, not regular files
                self._warn_once(f"Not serving {directory}: {err}.")
                continue
            try:
                metadata = Fuser.read_metadata(directory)
                sender = ParticipantIdentity.from_dict(metadata["sender"])
                receiver = ParticipantIdentity.from_dict(metadata["receiver"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                self._warn_once(f"Not serving {directory}: its {METADATA_FILE} cannot be read ({err}).")
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
        with open_served(self.root, path) as handle:
            return pb.FileEntry(name=path.name, size=os.fstat(handle.fileno()).st_size,
                                sha256=self._digests.digest(path, handle))

    # --- Download ----------------------------------------------------------------------------------
    def Download(self, request: pb.DownloadRequest, context: grpc.ServicerContext) -> Iterator[pb.FileChunk]:
        sender, receiver, names = checked(check_download, context, "Download", request)
        with self.gate.admit(context, "Download") as call:
            yield from self.gate.stream(call, self._download(sender, receiver, names, context))

    def _download(self, sender, receiver, names: list[str], context: grpc.ServicerContext) -> Iterator[pb.FileChunk]:
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
        """``path`` in :data:`CHUNK_BYTES` pieces, the first with its size and sha256 (at least one chunk); the bytes
        sent are hashed again, and a file that no longer matches its digest ends the call ``ABORTED``."""
        try:
            handle = open_served(self.root, path)
        except FileNotFoundError:
            refuse(context, grpc.StatusCode.NOT_FOUND, f"{path.name} of this fuser was removed while it was being sent")
        except PermissionError as err:
            refuse(context, grpc.StatusCode.NOT_FOUND, f"{path.name} of this fuser is not served ({err})")
        except OSError as err:
            refuse(context, grpc.StatusCode.UNAVAILABLE, f"{path.name} of this fuser cannot be read now ({err}); retry")
        with handle:
            size = os.fstat(handle.fileno()).st_size
            digest = self._digests.digest(path, handle)
            chunk = pb.FileChunk(name=path.name, offset=0, size=size, sha256=digest)
            offset, sent = 0, hashlib.sha256()
            while True:  # one chunk even for an empty file, so the client sees every file it asked for
                want = min(CHUNK_BYTES, size - offset)
                chunk.data = handle.read(want)
                if len(chunk.data) < want:
                    self._digests.forget(path)
                    refuse(context, grpc.StatusCode.ABORTED, f"{path.name} shrank while it was being sent; retry")
                sent.update(chunk.data)
                if offset + want >= size and sent.hexdigest() != digest:  # checked before the last piece leaves
                    self._digests.forget(path)
                    refuse(context, grpc.StatusCode.ABORTED, f"{path.name} changed while it was being sent; retry")
                yield chunk
                offset += want
                if offset >= size or not context.is_active():
                    return
                chunk = pb.FileChunk(name=path.name, offset=offset)


def serve_registry(
    root: str | Path, host: str = "127.0.0.1", port: int = 0, security: ServerSecurity | None = None,
    gate: CallGate | None = None,
) -> tuple[grpc.Server, int]:
    """A (not yet started) registry server over ``root`` and the port it is bound to."""
    security = security or ServerSecurity()
    servicer = RegistryServicer(root, gate)
    held = servicer.scan()
    if held:
        logger.info("serving %d fusers from %s", len(held), servicer.root)
    else:
        logger.warning("%s holds no fusers yet; List answers an empty registry until some are saved there.", root)
    server = new_server(security, workers=servicer.gate.workers)
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
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-calls", type=int, default=DEFAULT_MAX_CALLS,
                        help=f"Downloads at once, over all clients (default {DEFAULT_MAX_CALLS}); more are refused "
                             "RESOURCE_EXHAUSTED. List and health are never limited.")
    limits.add_argument("--max-calls-per-client", type=int, default=DEFAULT_MAX_CALLS_PER_CLIENT,
                        help=f"The same, per client connection (default {DEFAULT_MAX_CALLS_PER_CLIENT}).")
    limits.add_argument("--send-timeout-s", type=float, default=DEFAULT_SEND_TIMEOUT_S,
                        help=f"A chunk its client does not take within this long cancels the call "
                             f"(default {DEFAULT_SEND_TIMEOUT_S:g}).")
    add_address_arguments(parser)
    add_security_arguments(parser)
    return parser


def main(argv: list[str]) -> None:
    parser = config_parser()
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"--root {args.root} is not a directory; point it at a registry directory "
                     f"(FuserRegistry(root).save(fuser) writes one).")
    try:
        gate = CallGate(args.max_calls, args.max_calls_per_client, args.send_timeout_s)
    except ValueError as err:
        parser.error(str(err))
    server, port = serve_registry(args.root, args.host, args.port, security_from(args), gate)
    serve_forever(server, port, "fuser registry", args.ready_file)
