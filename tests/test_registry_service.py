"""The fuser registry as a gRPC service: real ``fedrefine serve registry`` processes and RemoteFuserRegistry.

Two servers per module (plaintext; TLS with a token) over one registry root. Every wait is bounded: the
servers' start by runtime_support, every call by the client's ``timeout_s`` or a gRPC deadline.
"""

from __future__ import annotations

import hashlib
import os
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedrefine.fuser import WEIGHTS_FILE, Fuser, FuserConfig, FuserPairMismatchError
from fedrefine.fuser.registry import FuserRegistry, MissingFuserError
from fedrefine.participants import ParticipantIdentity
from fedrefine.runtime.identities import identity_json
from fedrefine.runtime.protos import registry_pb2 as pb
from fedrefine.runtime.protos import registry_pb2_grpc as pb_grpc
from fedrefine.runtime.registry_client import (
    RegistryDownloadError,
    RegistryUnreachableError,
    RemoteFuserRegistry,
)
from fedrefine.runtime.registry_server import CHUNK_BYTES, SERVICE_NAME, RegistryServicer, StoredFuser, main
from fedrefine.runtime.security import ClientSecurity
from runtime_support import self_signed_certificate, server_process

TIMEOUT_S = 10.0
TOKEN = "federation-secret"


def identity(name: str, num_layers: int = 2) -> ParticipantIdentity:
    """A participant's identity: a fuser needs only its shapes, never the model."""
    return ParticipantIdentity(name, "main", "LlamaForCausalLM", num_layers, 2, 32, 64, 128)


A, B, C = identity("tiny/a"), identity("tiny/b", num_layers=3), identity("tiny/c")


def random_fuser(sender: ParticipantIdentity, receiver: ParticipantIdentity, hidden_size: int, seed: int) -> Fuser:
    """A fuser with seeded random weights (a fresh one's projections are zero, which would hide a mix-up)."""
    torch.manual_seed(seed)
    fuser = Fuser(sender, receiver, FuserConfig(hidden_size=hidden_size))
    with torch.no_grad():
        for parameter in fuser.parameters():
            parameter.normal_(std=0.1)
    return fuser


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A registry root: A -> B large enough to span several 1 MiB chunks; B -> A, A -> C and C -> B small
    (C -> B is only for the test that damages a served file)."""
    root = tmp_path_factory.mktemp("registry")
    registry = FuserRegistry(root)
    registry.save(random_fuser(A, B, hidden_size=192, seed=0))
    registry.save(random_fuser(B, A, hidden_size=8, seed=1))
    registry.save(random_fuser(A, C, hidden_size=8, seed=2))
    registry.save(random_fuser(C, B, hidden_size=8, seed=3))
    return root


@pytest.fixture(scope="module")
def endpoint(root, tmp_path_factory) -> str:
    """A plaintext registry server without a token."""
    with server_process(["registry", "--root", str(root)], tmp_path_factory.mktemp("plain"), "registry") as (_, port):
        yield f"grpc://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def secure(root, tmp_path_factory) -> tuple[str, Path, Path]:
    """A TLS registry server (self-signed certificate) that requires the token: (endpoint, cert, token file)."""
    workdir = tmp_path_factory.mktemp("secure")
    cert, key = self_signed_certificate(workdir)
    token_file = workdir / "token"
    token_file.write_text(TOKEN + "\n")
    args = ["registry", "--root", str(root), "--cert-file", str(cert), "--key-file", str(key),
            "--token-file", str(token_file)]
    with server_process(args, workdir, "secure-registry") as (_, port):
        yield f"grpcs://localhost:{port}", cert, token_file


def state(fuser: Fuser) -> dict[str, torch.Tensor]:
    return {name: tensor.detach() for name, tensor in fuser.state_dict().items()}


def assert_same_weights(loaded: Fuser, original: Fuser) -> None:
    expected, found = state(original), state(loaded)
    assert found.keys() == expected.keys()
    for name, tensor in expected.items():
        assert found[name].dtype == tensor.dtype and torch.equal(found[name], tensor), name


def test_a_downloaded_fuser_is_bit_for_bit_the_saved_one_and_is_then_served_from_the_cache(root, endpoint, tmp_path):
    original = FuserRegistry(root).get(A, B)
    cache = tmp_path / "cache"
    with RemoteFuserRegistry(endpoint, cache, timeout_s=TIMEOUT_S) as remote:
        assert remote.pairs() == FuserRegistry(root).pairs()
        assert remote.has(A, B) and not remote.has(B, C)
        assert remote.missing([A, B, C]) == [(B.key, C.key), (C.key, A.key)]
        fuser = remote.get(A, B)
        assert remote.get(A, B) is fuser  # loaded once, kept
        directory = remote.directory_for(A, B)
        assert sorted(path.name for path in remote.downloaded) == ["fuser.json", WEIGHTS_FILE]
    assert_same_weights(fuser, original)
    assert fuser.config == original.config and fuser.layer_map == original.layer_map
    assert sorted(path.name for path in directory.iterdir()) == ["fuser.json", WEIGHTS_FILE]  # no partial files
    assert FuserRegistry(cache).pairs() == [(A.key, B.key)]  # the cache is a registry root of its own

    with RemoteFuserRegistry(endpoint, cache, timeout_s=TIMEOUT_S) as again:
        assert_same_weights(again.get(A, B), original)
        assert again.downloaded == []  # both files were cached with the listed digests

    weights = directory / WEIGHTS_FILE
    damaged = bytearray(weights.read_bytes())
    damaged[-1] ^= 0xFF
    weights.write_bytes(bytes(damaged))
    with RemoteFuserRegistry(endpoint, cache, timeout_s=TIMEOUT_S) as repaired:
        assert_same_weights(repaired.get(A, B), original)
        assert repaired.downloaded == [weights]  # only the damaged file came again


def test_a_file_rewritten_with_the_same_size_and_time_is_hashed_again_never_served_with_a_stale_digest(
    root, endpoint, tmp_path
):
    cache = tmp_path / "cache"
    with RemoteFuserRegistry(endpoint, cache, timeout_s=TIMEOUT_S) as remote:
        listed = {f.name: f.sha256 for f in remote.remote_fusers()[(C.key, B.key)].files}  # the server hashes now
        # Change the served bytes behind the server's back: same size, same modification time. The server
        # notices (the change time moved) and sends the new digest: the client refuses a file that changed
        # since it was listed, keeps nothing of it, and gets it whole after a refresh.
        weights = FuserRegistry(root).directory_for(C, B) / WEIGHTS_FILE
        before = weights.stat()
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
        os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
        actual = hashlib.sha256(data).hexdigest()
        with pytest.raises(RegistryDownloadError, match="changed on the registry .* since it was listed") as refused:
            remote.get(C, B)
        message = str(refused.value)
        assert WEIGHTS_FILE in message and listed[WEIGHTS_FILE] in message and actual in message
        kept = sorted(path.name for path in remote.directory_for(C, B).iterdir())
        assert kept == ["fuser.json"]  # the verified file stays; the changed one and its partial file are gone
        remote.refresh()
        assert {f.name: f.sha256 for f in remote.remote_fusers()[(C.key, B.key)].files}[WEIGHTS_FILE] == actual
        remote.get(C, B)
        assert hashlib.sha256((remote.directory_for(C, B) / WEIGHTS_FILE).read_bytes()).hexdigest() == actual


def test_pairs_the_registry_does_not_hold_are_refused_by_name(endpoint, tmp_path):
    with RemoteFuserRegistry(endpoint, tmp_path / "cache", timeout_s=TIMEOUT_S) as remote:
        with pytest.raises(MissingFuserError, match=f"no fuser for {C.key} -> {A.key}") as missing:
            remote.get(C, A)
        assert f"{A.key} -> {B.key}" in str(missing.value)  # what is available
        reshaped = identity("tiny/b", num_layers=4)  # the same key as B, other shapes: not B's fuser
        with pytest.raises(FuserPairMismatchError, match="receiver num_layers held 3, asked 4"):
            remote.get(A, reshaped)
        assert not (tmp_path / "cache").exists()  # nothing was downloaded

    channel = grpc.insecure_channel(endpoint.removeprefix("grpc://"))
    stub = pb_grpc.FuserRegistryStub(channel)

    def download(sender: str, receiver: str, files: tuple[str, ...] = ()) -> list[pb.FileChunk]:
        request = pb.DownloadRequest(sender_identity_json=sender, receiver_identity_json=receiver, files=files)
        return list(stub.Download(request, timeout=TIMEOUT_S))

    refusals = [
        (grpc.StatusCode.NOT_FOUND, f"no fuser for {C.key} -> {A.key} (available: ", (identity_json(C), identity_json(A))),
        (grpc.StatusCode.NOT_FOUND, "trained for other identities", (identity_json(A), identity_json(reshaped))),
        (grpc.StatusCode.INVALID_ARGUMENT, "sender identity is not JSON", ("{not json", identity_json(A))),
        (grpc.StatusCode.INVALID_ARGUMENT, "missing fields ['vocab_size']",
         (identity_json(A).replace(', "vocab_size": 128', ""), identity_json(B))),
        (grpc.StatusCode.INVALID_ARGUMENT, "are not among them", (identity_json(A), identity_json(B), ("../fuser.json",))),
    ]
    for code, text, args in refusals:
        with pytest.raises(grpc.RpcError) as refused:
            download(*args)
        assert refused.value.code() == code and text in refused.value.details(), refused.value.details()

    listed = {(f.sender_identity_json, f.receiver_identity_json): f for f in stub.List(pb.ListRequest(), timeout=TIMEOUT_S).fusers}
    entry = listed[(identity_json(A), identity_json(B))]
    chunks = download(identity_json(A), identity_json(B), (WEIGHTS_FILE,))
    size = next(f.size for f in entry.files if f.name == WEIGHTS_FILE)
    assert size > 2 * CHUNK_BYTES and len(chunks) == -(-size // CHUNK_BYTES)
    assert all(len(c.data) <= CHUNK_BYTES for c in chunks)
    assert [c.offset for c in chunks] == [i * CHUNK_BYTES for i in range(len(chunks))]
    assert (chunks[0].size, chunks[0].sha256) == next((f.size, f.sha256) for f in entry.files if f.name == WEIGHTS_FILE)
    assert hashlib.sha256(b"".join(c.data for c in chunks)).hexdigest() == chunks[0].sha256
    channel.close()


class MislabellingServicer(RegistryServicer):
    """A registry whose index is wrong: it offers B -> A's directory as the fuser for A -> C (valid digests)."""

    def scan(self):
        return {(A.key, C.key): StoredFuser(A, C, super().scan()[(B.key, A.key)].directory)}


def test_a_fuser_for_another_pair_is_refused_even_with_matching_digests(root, tmp_path):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_FuserRegistryServicer_to_server(MislabellingServicer(root), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with RemoteFuserRegistry(f"grpc://127.0.0.1:{port}", tmp_path / "cache", timeout_s=TIMEOUT_S) as remote:
            with pytest.raises(RegistryDownloadError, match="sent a fuser for another pair") as refused:
                remote.get(A, C)
            assert f"names {B.key} -> {A.key}" in str(refused.value)
            assert list(remote.directory_for(A, C).iterdir()) == []  # not left in the cache either
    finally:
        server.stop(0).wait(5)


def test_calls_without_the_right_token_are_unauthenticated(secure, tmp_path):
    address, cert, token_file = secure
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-secret")
    for security, given in ((ClientSecurity(ca_file=str(cert)), "no token was given"),
                            (ClientSecurity(ca_file=str(cert), token_file=str(wrong)), "the token given is not")):
        with RemoteFuserRegistry(address, tmp_path / "cache", security, timeout_s=TIMEOUT_S) as remote:
            with pytest.raises(RegistryDownloadError, match="UNAUTHENTICATED") as refused:
                remote.pairs()
            assert given in str(refused.value) and address in str(refused.value)
    # Health stays open without a token (load balancers and probes call it so).
    channel = ClientSecurity(ca_file=str(cert)).channel(address.removeprefix("grpcs://"), True, [])
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT_S)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    channel.close()


def test_tls_with_the_self_signed_certificate_works_and_fails_without_it(root, secure, tmp_path):
    address, cert, token_file = secure
    trusted = ClientSecurity(ca_file=str(cert), token_file=str(token_file))
    with RemoteFuserRegistry(address, tmp_path / "cache", trusted, timeout_s=TIMEOUT_S) as remote:
        assert_same_weights(remote.get(A, C), FuserRegistry(root).get(A, C))
    untrusted = ClientSecurity(token_file=str(token_file))  # system roots do not know the self-signed certificate
    with RemoteFuserRegistry(address, tmp_path / "other", untrusted, timeout_s=3.0) as remote:
        with pytest.raises(RegistryUnreachableError, match="UNAVAILABLE") as refused:
            remote.pairs()
        assert "ca_file" in str(refused.value) and address in str(refused.value)
    plaintext = address.replace("grpcs://", "grpc://")
    with RemoteFuserRegistry(plaintext, tmp_path / "plain", trusted, timeout_s=3.0) as remote:
        with pytest.raises(RegistryUnreachableError, match=f"Cannot reach the fuser registry at {plaintext}"):
            remote.pairs()


def test_serving_a_root_that_does_not_exist_is_a_clear_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--root", str(tmp_path / "nowhere")])
    assert exited.value.code == 2
    assert f"--root {tmp_path / 'nowhere'} is not a directory" in capsys.readouterr().err
