"""Abusive clients against the participant and registry services: slow readers, requests past every bound,
files outside the registry root. Servers run in this process on 127.0.0.1 (free ports); every wait is bounded."""

from __future__ import annotations

import logging
import os
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedrefine.fuser import METADATA_FILE, WEIGHTS_FILE, Fuser, FuserConfig
from fedrefine.fuser.registry import FuserRegistry
from fedrefine.participants import ParticipantIdentity, TinySpec, build_tiny_participant
from fedrefine.runtime.admission import RequestError
from fedrefine.runtime.identities import identity_json
from fedrefine.runtime.participant_server import ServeLimits, serve_participant
from fedrefine.runtime.protos import participant_pb2 as pb
from fedrefine.runtime.protos import participant_pb2_grpc as pb_grpc
from fedrefine.runtime.protos import registry_pb2 as rpb
from fedrefine.runtime.protos import registry_pb2_grpc as rpb_grpc
from fedrefine.runtime.registry_server import check_download, serve_registry
from fedrefine.runtime.requests import check_hint, check_prefill

#: A sender whose K/V are 32 KB per token: a 1,024-token Prefill is a 32 MB message (more than gRPC buffers).
WIDE = TinySpec("wide-sender", "llama", num_layers=8, hidden_size=64, num_heads=8, num_kv_heads=8, head_dim=64, seed=3)


@pytest.fixture(scope="module")
def wide():
    return build_tiny_participant(WIDE)


class Served:
    """A participant server in this process and a channel to it (closed and stopped on exit)."""

    def __init__(self, participant, limits: ServeLimits | None = None, batching=None) -> None:
        self.server, self.port = serve_participant(participant, limits=limits, batching=batching)
        self.server.start()
        self.channels: list[grpc.Channel] = []

    def channel(self) -> grpc.Channel:
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}", options=[
            ("grpc.max_receive_message_length", 8 << 20), ("grpc.use_local_subchannel_pool", 1)])  # a connection each
        self.channels.append(channel)
        return channel

    def stub(self) -> pb_grpc.ParticipantStub:
        return pb_grpc.ParticipantStub(self.channel())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for channel in self.channels:
            channel.close()
        self.server.stop(None).wait(5)


def big_request(participant, prompts=4, tokens=256) -> pb.PrefillRequest:
    rows = [pb.TokenRow(ids=[(7 * i + j) % 200 + 3 for j in range(tokens)]) for i in range(prompts)]
    return pb.PrefillRequest(prompts=rows, codec="fp32")


def code_of(call) -> grpc.StatusCode:
    try:
        for _ in call:
            pass
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


# --- defect 5: slow readers ------------------------------------------------------------------------
def test_slow_readers_cannot_freeze_health_identity_or_the_other_clients(wide):
    limits = ServeLimits(max_calls=2, max_calls_per_client=2, send_timeout_s=1.0)
    with Served(wide, limits) as served:
        readers = [served.stub().Prefill(big_request(wide), timeout=30) for _ in range(12)]  # never read
        time.sleep(1.0)  # every call has reached the server: two are sending, the rest refused
        health = health_pb2_grpc.HealthStub(served.channel())
        for _ in range(3):
            start = time.perf_counter()
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING
            served.stub().Identity(pb.IdentityRequest(), timeout=2)
            assert time.perf_counter() - start < 1.0
        small = pb.PrefillRequest(prompts=[pb.TokenRow(ids=[5, 6, 7])], codec="fp32")
        start, chunks = time.monotonic(), None
        while chunks is None and time.monotonic() - start < 10:  # busy slots are refused; stalled ones give way
            try:
                chunks = list(served.stub().Prefill(small, timeout=20))
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                time.sleep(0.2)
        assert chunks and chunks[0].total_bytes > 0 and time.monotonic() - start < 5  # within the send timeout
        codes = [code_of(r) for r in readers]
        # most readers were refused (no reply slot freed in time) or cancelled (evicted, or past its send timeout);
        # the ones holding the max_calls slots at the end, and the few whose batch finished last (still within their
        # wait for a slot when this test starts reading), may read their reply whole: how many depends on the CPU
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) + codes.count(grpc.StatusCode.CANCELLED) >= 8
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 2
        assert grpc.StatusCode.CANCELLED in codes  # a stalled reader was cancelled (the other may read on: OK)
        assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED, grpc.StatusCode.OK}
        assert list(served.stub().Prefill(small, timeout=20))  # the slots are free again


def test_a_send_its_reader_never_takes_is_cancelled_after_the_send_timeout(wide, caplog):
    with Served(wide, ServeLimits(max_calls=1, send_timeout_s=0.5)) as served, caplog.at_level(logging.WARNING):
        reader = served.stub().Prefill(big_request(wide), timeout=30)  # never read: alone, it is never evicted
        start = time.monotonic()

        def cancelled() -> bool:
            return any("took nothing for 0.5 s (send_timeout_s)" in r.getMessage() for r in caplog.records)

        while not cancelled() and time.monotonic() - start < 10:
            time.sleep(0.05)
        assert cancelled() and time.monotonic() - start < 5  # the server gave up on it (and freed its thread)
        assert code_of(reader) == grpc.StatusCode.CANCELLED


# --- defect 6: every request field bounded, refusals coded, short and logged ---------------------------
@pytest.mark.parametrize("request_, code, says", [
    (pb.PrefillRequest(prompts=[pb.TokenRow(ids=[5])], codec="fp32", width=16384),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "width 16384 for 1 prompts; at most 8192"),
    (pb.PrefillRequest(prompts=[pb.TokenRow(ids=[5, 6])], codec="int4", group_size=-3),
     grpc.StatusCode.INVALID_ARGUMENT, "group_size -3 is not in 1.."),
    (pb.PrefillRequest(prompts=[pb.TokenRow(ids=[5, 6])], codec="fp32", layers=list(range(100_000))),
     grpc.StatusCode.INVALID_ARGUMENT, "100000 layers asked of a 8-layer model"),
    (pb.PrefillRequest(prompts=[pb.TokenRow(ids=[5, 6])], codec="fp32", layers=[0, 0, 99] * 2),
     grpc.StatusCode.INVALID_ARGUMENT, "layers [0, 0, 99, 0, 0, 99] are not distinct layers of a 8-layer model"),
    (pb.PrefillRequest(prompts=[pb.TokenRow(ids=[5, 6])], codec="fp32", sent=[pb.TokenRow(ids=list(range(50)))]),
     grpc.StatusCode.INVALID_ARGUMENT, "sent row 0 names 50 columns of a 2-column batch"),
    (pb.PrefillRequest(texts=["x" * 70_000], codec="fp32"),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "a text of 70,000 characters; at most 65,536"),
    (pb.HintRequest(prompts=["hello"], max_new_tokens=4, batch_size=-1),
     grpc.StatusCode.INVALID_ARGUMENT, "batch_size must be in 0..64"),
    (pb.HintRequest(prompts=["word " * 12_000], max_new_tokens=4),
     grpc.StatusCode.RESOURCE_EXHAUSTED, "a prompt of"),
    (pb.HintRequest(prompts=["hi"] * 65, max_new_tokens=4),
     grpc.StatusCode.INVALID_ARGUMENT, "65 prompts; at most 64"),
])
def test_requests_past_a_bound_are_refused_with_a_short_coded_logged_message(wide, caplog, request_, code, says):
    with Served(wide, ServeLimits()) as served, caplog.at_level(logging.WARNING, "fedrefine.runtime"):
        stub = served.stub()
        start = time.perf_counter()
        with pytest.raises(grpc.RpcError) as err:
            if isinstance(request_, pb.HintRequest):
                stub.Hint(request_, timeout=10)
            else:
                list(stub.Prefill(request_, timeout=10))
        assert time.perf_counter() - start < 2.0  # refused before any model runs
        assert err.value.code() == code and says in err.value.details() and len(err.value.details()) <= 300
        assert any(says in r.getMessage() and code.name in r.getMessage() for r in caplog.records)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=12), max_size=5),
    layers=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=12),
    sent=st.lists(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=12), max_size=5),
    codec=st.sampled_from(["fp32", "int4", "int9", ""]),
    group_size=st.integers(-(2**31), 2**31 - 1),
    width=st.integers(-(2**31), 2**31 - 1),
)
def test_fuzz_prefill_requests_are_planned_within_the_limits_or_refused(wide, rows, layers, sent, codec, group_size, width):
    limits = ServeLimits(max_batch=4, max_tokens=40, max_prompt_tokens=16)
    request = pb.PrefillRequest(prompts=[pb.TokenRow(ids=r) for r in rows], layers=layers, codec=codec,
                                group_size=group_size, width=width, sent=[pb.TokenRow(ids=r) for r in sent])
    try:
        plan = check_prefill(request, wide, limits)
    except RequestError as err:
        assert err.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert len(err.detail) < 300
        return
    batch, columns = plan.input_ids.shape
    assert batch <= 4 and columns <= 16 and batch * columns <= 40
    assert all(0 <= j < WIDE.num_layers for j in plan.layers)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(st.text(max_size=40), max_size=6), new=st.integers(-(2**31), 2**31 - 1),
       batch=st.integers(-(2**31), 2**31 - 1))
def test_fuzz_hint_requests_are_bounded_or_refused(wide, prompts, new, batch):
    limits = ServeLimits(max_batch=4, max_tokens=60, max_new_tokens=8)
    try:
        checked_prompts, max_new_tokens, batch_size = check_hint(
            pb.HintRequest(prompts=prompts, max_new_tokens=new, batch_size=batch), wide, limits)
    except RequestError as err:
        assert len(err.detail) < 300
        return
    assert len(checked_prompts) <= 4 and 0 <= max_new_tokens <= 8 and 1 <= batch_size <= 16


_IDENTITY = ParticipantIdentity("tiny/a", "main", "LlamaForCausalLM", 2, 2, 32, 64, 128)


@settings(max_examples=80, deadline=None)
@given(sender=st.one_of(st.text(max_size=60), st.just(identity_json(_IDENTITY))),
       receiver=st.one_of(st.text(max_size=60), st.just(identity_json(_IDENTITY))),
       files=st.lists(st.text(max_size=20) | st.sampled_from(["fuser.json", "fuser.safetensors"]), max_size=4))
def test_fuzz_download_requests_are_checked_or_refused(sender, receiver, files):
    try:
        _, _, names = check_download(rpb.DownloadRequest(sender_identity_json=sender, receiver_identity_json=receiver,
                                                         files=files))
    except RequestError as err:
        assert len(err.detail) < 300
        return
    assert set(names) <= {"fuser.json", "fuser.safetensors"} and len(set(names)) == len(names)


# --- defect 7: the registry serves regular files inside its root only --------------------------------
def identity(name: str) -> ParticipantIdentity:
    return ParticipantIdentity(name, "main", "LlamaForCausalLM", 2, 2, 32, 64, 128)


def test_the_registry_serves_no_symlink_and_nothing_outside_its_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    registry, elsewhere = FuserRegistry(root), FuserRegistry(outside)
    a, b, c, d = (identity(f"tiny/{x}") for x in "abcd")
    registry.save(Fuser(a, b, FuserConfig(hidden_size=8)))  # a regular fuser: served
    linked_dir = elsewhere.save(Fuser(a, c, FuserConfig(hidden_size=8)))  # a whole directory linked in
    os.symlink(linked_dir, root / linked_dir.name)
    own = registry.save(Fuser(a, d, FuserConfig(hidden_size=8)))  # its weights a link to a file outside
    secret = outside / "secret.bin"
    secret.write_bytes(b"not for the federation")
    (own / WEIGHTS_FILE).unlink()
    os.symlink(secret, own / WEIGHTS_FILE)
    server, port = serve_registry(root)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = rpb_grpc.FuserRegistryStub(channel)
            listed = {(e.sender_identity_json, e.receiver_identity_json) for e in stub.List(rpb.ListRequest(), timeout=10).fusers}
            assert listed == {(identity_json(a), identity_json(b))}
            for receiver in (c, d):
                request = rpb.DownloadRequest(sender_identity_json=identity_json(a),
                                              receiver_identity_json=identity_json(receiver))
                with pytest.raises(grpc.RpcError) as err:
                    list(stub.Download(request, timeout=10))
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
            good = rpb.DownloadRequest(sender_identity_json=identity_json(a), receiver_identity_json=identity_json(b))
            assert {chunk.name for chunk in stub.Download(good, timeout=10)} == {METADATA_FILE, WEIGHTS_FILE}
    finally:
        server.stop(None).wait(5)
