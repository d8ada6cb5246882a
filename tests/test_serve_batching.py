"""The batching participant server: merged requests get exactly their unbatched answers, the queue is bounded
and answers RESOURCE_EXHAUSTED with a retry hint, 64 clients fit the default limits, shutdown ends every call.
Servers run in this process on 127.0.0.1 (free ports); every wait is bounded."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future

import grpc
import pytest
import torch

from conftest import QWEN2_SPEC, chatty
from fedrefine.participants import build_tiny_participant
from fedrefine.runtime.admission import RETRY_AFTER_KEY
from fedrefine.runtime.batcher import MIN_RETRY_AFTER_S, Batcher, BatcherClosed, BatchingConfig, QueueFull
from fedrefine.runtime.model_calls import chat_lengths
from fedrefine.runtime.participant_client import CallSettings, ParticipantClient, retry_hint_s
from fedrefine.runtime.participant_server import ServeLimits, config_parser, instantiate
from fedrefine.runtime.protos import participant_pb2 as pb
from fedrefine.settings import SettingsError
from fedrefine.toyworld.lightning import ToyParticipant
from fedrefine.wire import SenderUnavailable
from fedrefine.wire.format import deserialize_message
from test_hostile_services import Served

WAIT_S = 30


@pytest.fixture(scope="module")
def toy():
    return ToyParticipant(name="llama-sender").load()


# --- the batcher alone ---------------------------------------------------------------------------------
class Recorder:
    """A model call that records the keys and payloads of each call; blocks while ``hold`` is clear."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, list]] = []
        self.hold = threading.Event()
        self.hold.set()

    def __call__(self, key, payloads):
        assert self.hold.wait(WAIT_S)
        self.calls.append((key, list(payloads)))
        return [f"{key}:{p}" for p in payloads]


def blocked(batcher: Batcher, recorder: Recorder) -> None:
    """Keep the worker busy on one job (until ``recorder.hold`` is set)."""
    recorder.hold.clear()
    batcher.submit(None, "blocker", 1)
    deadline = time.monotonic() + WAIT_S
    while batcher.waiting() and time.monotonic() < deadline:  # the worker took it and waits on hold
        time.sleep(0.005)


def test_compatible_jobs_share_one_call_up_to_max_batch_and_the_rest_run_alone():
    recorder = Recorder()
    batcher = Batcher(recorder, BatchingConfig(max_batch=3, max_queue_delay_ms=0))
    blocked(batcher, recorder)
    jobs = [batcher.submit("a", i, 1) for i in range(4)] + [batcher.submit("b", 9, 1), batcher.submit(None, 7, 1)]
    recorder.hold.set()
    results = [batcher.result(job, WAIT_S) for job in jobs]
    assert results == ["a:0", "a:1", "a:2", "a:3", "b:9", "None:7"]  # every caller its own result
    assert [(key, payloads) for key, payloads in recorder.calls[1:]] == [
        ("a", [0, 1, 2]), ("a", [3]), ("b", [9]), (None, [7])]  # oldest first, at most max_batch, keys kept apart
    batcher.close()


def test_a_merged_call_stays_within_max_batch_tokens_and_disabled_batching_merges_nothing():
    recorder = Recorder()
    batcher = Batcher(recorder, BatchingConfig(max_batch=8, max_batch_tokens=10, max_queue_delay_ms=0))
    blocked(batcher, recorder)
    jobs = [batcher.submit("a", i, 4) for i in range(4)]
    recorder.hold.set()
    [batcher.result(job, WAIT_S) for job in jobs]
    assert [payloads for _key, payloads in recorder.calls[1:]] == [[0, 1], [2, 3]]
    batcher.close()

    recorder = Recorder()
    batcher = Batcher(recorder, BatchingConfig(enabled=False, max_queue_delay_ms=0))
    blocked(batcher, recorder)
    jobs = [batcher.submit("a", i, 1) for i in range(3)]
    recorder.hold.set()
    [batcher.result(job, WAIT_S) for job in jobs]
    assert [payloads for _key, payloads in recorder.calls[1:]] == [[0], [1], [2]]
    batcher.close()


def test_the_head_job_waits_at_most_the_queue_delay_for_others():
    recorder = Recorder()
    batcher = Batcher(recorder, BatchingConfig(max_batch=4, max_queue_delay_ms=150))
    start = time.monotonic()
    first = batcher.submit("a", 0, 1)
    time.sleep(0.03)
    second = batcher.submit("a", 1, 1)
    assert batcher.result(first, WAIT_S) == "a:0" and batcher.result(second, WAIT_S) == "a:1"
    waited = time.monotonic() - start
    assert recorder.calls == [("a", [0, 1])]  # the late one joined within the delay
    assert 0.1 <= waited < 2.0
    batcher.close()


def test_a_full_queue_refuses_with_a_retry_hint_and_close_fails_every_pending_job():
    recorder = Recorder()
    batcher = Batcher(recorder, BatchingConfig(max_queue=2, max_queue_delay_ms=0))
    blocked(batcher, recorder)
    pending = [batcher.submit("a", i, 1) for i in range(2)]
    with pytest.raises(QueueFull, match="queue is full") as full:
        batcher.submit("a", 2, 1)
    assert full.value.retry_after_s > 0
    batcher.close(timeout_s=0.2)
    for job in pending:
        with pytest.raises(BatcherClosed):
            batcher.result(job, WAIT_S)
    with pytest.raises(BatcherClosed):
        batcher.submit("a", 3, 1)
    recorder.hold.set()
    batcher._worker.join(WAIT_S)
    assert not batcher._worker.is_alive()
    assert [payloads for _key, payloads in recorder.calls] == [["blocker"]]  # the pending jobs never ran


def test_a_job_whose_caller_left_or_stopped_waiting_is_never_run():
    recorder = Recorder()
    batcher = Batcher(recorder, BatchingConfig(max_queue_delay_ms=0))
    blocked(batcher, recorder)
    gone = batcher.submit("a", "gone", 1, alive=lambda: False)
    late = batcher.submit("b", "late", 1)
    with pytest.raises(TimeoutError):
        batcher.result(late, 0.05)
    kept = batcher.submit("c", "kept", 1)
    recorder.hold.set()
    assert batcher.result(kept, WAIT_S) == "c:kept"
    with pytest.raises(BatcherClosed, match="client left"):
        batcher.result(gone, WAIT_S)
    assert [payloads for _key, payloads in recorder.calls] == [["blocker"], ["kept"]]
    batcher.close()


def test_a_failing_model_call_fails_each_of_its_callers_and_the_batcher_goes_on():
    def run(key, payloads):
        if "boom" in payloads:
            raise RuntimeError("model failed")
        return payloads

    batcher = Batcher(run, BatchingConfig(max_queue_delay_ms=0))
    with pytest.raises(RuntimeError, match="model failed"):
        batcher.result(batcher.submit("a", "boom", 1), WAIT_S)
    assert batcher.result(batcher.submit("a", "fine", 1), WAIT_S) == "fine"
    batcher.close()


@pytest.mark.parametrize("bad", [{"max_batch": 0}, {"max_queue": -1}, {"max_queue_delay_ms": -1.0}, {"max_wait_s": 0}])
def test_batching_settings_out_of_range_are_refused(bad):
    with pytest.raises(SettingsError, match="Batching settings out of range"):
        BatchingConfig(**bad)


# --- served: merged answers equal unbatched ones -------------------------------------------------------
def concurrently(calls: list) -> list:
    """Run every call in its own thread at once; their results in order (an exception is returned, not raised)."""
    results: list = [None] * len(calls)

    def one(index: int) -> None:
        try:
            results[index] = calls[index]()
        except Exception as err:  # noqa: BLE001 - compared by the test
            results[index] = err

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    return results


def in_background(call) -> Future:
    """``call()`` in a thread of its own, as a future."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(call())
        except Exception as err:  # noqa: BLE001 - re-raised by future.result()
            future.set_exception(err)

    threading.Thread(target=run, daemon=True).start()
    return future


def prefill_bytes(stub, request) -> bytes:
    return b"".join(chunk.data for chunk in stub.Prefill(request, timeout=WAIT_S))


def prefill_requests(vocab: int) -> list[pb.PrefillRequest]:
    """Requests of two padded widths, differing in rows, layers, sent columns and codec."""
    def rows(count, length, seed):
        return [pb.TokenRow(ids=[(seed * 31 + 7 * i + 3 * j) % (vocab - 3) + 3 for j in range(length - i)])
                for i in range(count)]

    return [
        pb.PrefillRequest(prompts=rows(3, 12, 1), codec="fp32", width=12),
        pb.PrefillRequest(prompts=rows(1, 9, 2), codec="fp32", width=12, layers=[1]),
        pb.PrefillRequest(prompts=rows(2, 12, 3), codec="int8", width=12, layers=[0, 1],
                          sent=[pb.TokenRow(ids=[11, 10]), pb.TokenRow(ids=[11])]),
        pb.PrefillRequest(prompts=rows(4, 10, 4), codec="fp16", width=12),
        pb.PrefillRequest(prompts=rows(2, 20, 5), codec="fp32"),  # another width: its own call
        pb.PrefillRequest(prompts=rows(1, 20, 6), codec="bf16", layers=[0]),
    ]


@pytest.mark.parametrize("make", [lambda: ToyParticipant(name="llama-sender").load(),
                                  lambda: build_tiny_participant(QWEN2_SPEC)], ids=["toy-llama", "tiny-qwen2"])
def test_batched_prefill_messages_equal_the_unbatched_ones(make):
    participant = make()
    requests = prefill_requests(participant.identity.vocab_size)
    with Served(participant, batching=BatchingConfig(enabled=False)) as alone:
        expected = [prefill_bytes(alone.stub(), r) for r in requests]
        assert alone.server.servicer.batcher.batches == len(requests)
    merging = BatchingConfig(max_batch=8, max_queue_delay_ms=500)  # concurrent requests of one width all merge
    with Served(participant, batching=merging) as batched:
        got = concurrently([lambda r=r, s=batched.stub(): prefill_bytes(s, r) for r in requests])
        assert batched.server.servicer.batcher.jobs_run == len(requests)
        assert batched.server.servicer.batcher.batches == 2  # widths 12 and 20
    for request, data, reference in zip(requests, got, expected):
        assert_same_message(participant, data, reference, request.codec)


def assert_same_message(participant, data: bytes, reference: bytes, codec: str) -> None:
    """The same header, masks, layers and K/V, exactly (the bytes themselves may differ: safetensors writes its
    metadata map in no fixed order)."""
    assert load_metadata(data) == load_metadata(reference)
    message, expected = (deserialize_message(d, participant.identity) for d in (data, reference))
    assert torch.equal(message.attention_mask, expected.attention_mask)
    assert torch.equal(message.positions, expected.positions)
    assert (message.sent is None) == (expected.sent is None)
    assert message.sent is None or torch.equal(message.sent, expected.sent)
    assert list(message.layers) == list(expected.layers)
    for j, (keys, values) in expected.layers.items():
        for got, want in zip(message.layers[j], (keys, values)):
            assert got.dtype == want.dtype and torch.equal(got, want), (codec, j)


def load_metadata(data: bytes) -> dict:
    """The safetensors metadata of a wire message (its header: format, version, sender, shapes, codec)."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length])["__metadata__"]


def equal_length_prompts(participant, count: int) -> list[str]:
    """``count`` different prompts whose chat encodings have one length."""
    by_length: dict[int, list[str]] = {}
    for i in range(400):
        prompt = f"Tell me about item {i} please"
        (length,) = chat_lengths(participant, [prompt])
        by_length.setdefault(length, []).append(prompt)
        if len(by_length[length]) == count:
            return by_length[length]
    raise AssertionError("no prompts of one length")


def test_batched_hints_equal_the_unbatched_ones():
    participant = chatty(QWEN2_SPEC)
    prompts = equal_length_prompts(participant, 5)
    requests = [pb.HintRequest(prompts=prompts[:2], max_new_tokens=6, batch_size=1),
                pb.HintRequest(prompts=prompts[2:3], max_new_tokens=6),
                pb.HintRequest(prompts=prompts[3:], max_new_tokens=6),
                pb.HintRequest(prompts=["a", "a much longer prompt than the first"], max_new_tokens=6)]  # alone

    def replies(stub, request):
        return [(r.text, tuple(r.token_ids)) for r in stub.Hint(request, timeout=WAIT_S).replies]

    with Served(participant, batching=BatchingConfig(enabled=False)) as alone:
        expected = [replies(alone.stub(), r) for r in requests]
    with Served(participant, batching=BatchingConfig(max_batch=8, max_queue_delay_ms=500)) as batched:
        got = concurrently([lambda r=r, s=batched.stub(): replies(s, r) for r in requests])
        assert batched.server.servicer.batcher.batches == 2  # the three equal-length requests merged; the mixed one alone
    assert got == expected
    assert any(ids for reply in expected for _text, ids in reply)  # the replies are not empty


# --- served: limits, refusals, shutdown ----------------------------------------------------------------
def held_full(served: Served) -> tuple[threading.Event, pb.PrefillRequest, list[Future]]:
    """A queue of one held full: the model blocked (until the event is set) on one call, another waiting."""
    release, run = threading.Event(), served.server.servicer.batcher.run
    served.server.servicer.batcher.run = lambda key, payloads: (release.wait(WAIT_S), run(key, payloads))[1]  # a slow model
    request = pb.PrefillRequest(prompts=[pb.TokenRow(ids=[5, 6, 7])], codec="fp32")
    running = in_background(lambda s=served.stub(): prefill_bytes(s, request))  # takes the model
    time.sleep(0.3)
    queued = in_background(lambda s=served.stub(): prefill_bytes(s, request))  # fills the queue
    time.sleep(0.3)
    return release, request, [running, queued]


def test_a_full_queue_is_refused_resource_exhausted_with_a_retry_hint(toy):
    with Served(toy, batching=BatchingConfig(max_queue=1, max_queue_delay_ms=0)) as served:
        release, request, calls = held_full(served)
        with pytest.raises(grpc.RpcError) as refused:
            list(served.stub().Prefill(request, timeout=WAIT_S))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in refused.value.details()
        hint = dict(refused.value.trailing_metadata())[RETRY_AFTER_KEY]
        assert int(hint) >= 1
        release.set()
        for call in calls:
            assert isinstance(call.result(WAIT_S), bytes)


def test_the_client_calls_again_after_the_retry_hint_while_the_queue_is_full_and_never_past_its_limits(toy):
    with Served(toy, batching=BatchingConfig(max_queue=1, max_queue_delay_ms=0)) as served:
        release, _, calls = held_full(served)
        endpoint = f"grpc://127.0.0.1:{served.port}"

        def prefill(retries: int):
            client = ParticipantClient(endpoint, toy.identity, calls=CallSettings(deadline_s=WAIT_S, busy_retries=retries))
            return client.prefill(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long), [0], None, "fp32", 128,
                                  [toy.identity.key])

        with pytest.raises(SenderUnavailable, match="queue is full") as refused:  # no retries: refused at once
            prefill(0)
        assert refused.value.reason == "refused"
        waited = time.monotonic()
        with pytest.raises(SenderUnavailable, match="queue is full"):  # two retries, each after the hint: still full
            prefill(2)
        assert time.monotonic() - waited >= 2 * MIN_RETRY_AFTER_S
        threading.Timer(0.5, release.set).start()  # the queue drains while the client waits and calls again
        delivery = prefill(1000)
        assert delivery.message.attention_mask.shape == (1, 3)
        for call in calls:
            assert isinstance(call.result(WAIT_S), bytes)


@pytest.mark.parametrize("code, metadata, expected", [
    (grpc.StatusCode.RESOURCE_EXHAUSTED, ((RETRY_AFTER_KEY, "250"),), 0.25),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, (), None),  # a bounded request field: no hint, no retry
    (grpc.StatusCode.RESOURCE_EXHAUSTED, ((RETRY_AFTER_KEY, "-5"),), None),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, ((RETRY_AFTER_KEY, "1e9"),), None),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, ((RETRY_AFTER_KEY, "86400000"),), None),  # a day: over the longest wait
    (grpc.StatusCode.UNAVAILABLE, ((RETRY_AFTER_KEY, "250"),), None),
])
def test_a_retry_hint_is_read_only_from_a_full_queue_refusal_and_only_within_bounds(code, metadata, expected):
    class Refusal(grpc.RpcError):
        def code(self):
            return code

        def trailing_metadata(self):
            return metadata

    assert retry_hint_s(Refusal()) == expected


def test_64_clients_at_once_fit_the_default_limits_and_nothing_is_refused(toy):
    limits = ServeLimits()
    assert (limits.max_calls, limits.max_calls_per_client) == (8, 4)
    with Served(toy, limits, BatchingConfig()) as served:
        stubs = [served.stub() for _ in range(64)]
        request = pb.PrefillRequest(prompts=[pb.TokenRow(ids=[5, 6, 7, 8] * 4)] * 2, codec="fp32")
        results = concurrently([lambda s=s: prefill_bytes(s, request) for s in stubs])
        assert [r for r in results if not isinstance(r, bytes)] == []  # none refused, none failed
        assert len({len(r) for r in results}) == 1  # the same message each (its metadata map's order may vary)
        assert served.server.servicer.batcher.batches < 64  # they shared model calls


def test_stopping_the_server_ends_queued_calls_and_the_model_thread(toy):
    served = Served(toy, batching=BatchingConfig(max_queue_delay_ms=0))
    release, run = threading.Event(), served.server.servicer.batcher.run
    served.server.servicer.batcher.run = lambda key, payloads: (release.wait(WAIT_S), run(key, payloads))[1]  # a stuck model
    request = pb.PrefillRequest(prompts=[pb.TokenRow(ids=[5, 6, 7])], codec="fp32")
    calls = [in_background(lambda s=served.stub(): prefill_bytes(s, request)) for _ in range(3)]
    time.sleep(0.3)
    start = time.monotonic()
    served.server.stop(None).wait(5)  # the calls in flight end at once: one running, two queued
    for call in calls:
        with pytest.raises(grpc.RpcError):
            call.result(WAIT_S)
    assert time.monotonic() - start < 5
    deadline = time.monotonic() + 10
    while served.server.servicer.batcher.waiting() and time.monotonic() < deadline:  # the queued jobs are failed (not run)
        time.sleep(0.05)
    assert served.server.servicer.batcher.waiting() == 0
    release.set()
    served.server.servicer.batcher._worker.join(WAIT_S)
    assert not served.server.servicer.batcher._worker.is_alive()
    assert served.server.servicer.batcher.batches <= 1  # only the batch that was running when it stopped
    for channel in served.channels:
        channel.close()


def test_the_serve_config_carries_the_batching_settings(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("participant:\n  class_path: fedrefine.toyworld.lightning.ToyParticipant\n"
                      "  init_args: {name: llama-sender}\n"
                      "batching: {max_batch: 4, max_queue_delay_ms: 2.5, max_queue: 9}\n")
    parser = config_parser()
    init = instantiate(parser, parser.parse_args(["--config", str(config)]))
    assert init.batching == BatchingConfig(max_batch=4, max_queue_delay_ms=2.5, max_queue=9)
    for shipped in ("toy_llama", "toy_qwen2"):
        init = instantiate(parser, parser.parse_args(["--config", f"configs/serve/{shipped}.yaml"]))
        assert isinstance(init.batching, BatchingConfig) and init.batching.enabled
