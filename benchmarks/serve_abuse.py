"""Abuse and load against served participants: slow readers, oversized and malformed requests, hostile senders.

    python benchmarks/serve_abuse.py [--readers 8 16 32] [--window-s 6]

Everything runs in this process on 127.0.0.1 (free ports), every loop bounded in count and time:

    slow readers   N clients (a connection each) open a large Prefill (4 x 256 tokens, ~32 MB in fp32) and never
                   read it, re-opening it as soon as the server ends it, for ``--window-s`` seconds; meanwhile a
                   well-behaved client calls health and Identity every 50 ms, and on another connection small
                   Prefills one after another (retrying a refused one after 50 ms). Their latencies (p50, p99)
                   are recorded; the small Prefill's includes its retries. The server runs with the default
                   ServeLimits.
    bad requests   oversized and malformed Prefill, Hint and registry Download requests: each must be refused
                   INVALID_ARGUMENT or RESOURCE_EXHAUSTED before any model runs.
    hostile sender the toy world's Llama-style sender served with each tampering of ``fedrefine.runtime.drills``
                   beside an honest Qwen2-style sender: the receiver answers 12 held-out questions with C2C; the
                   hostile sender must be dropped on every question with its reason, and the answers equal the
                   honest sender's alone.

Writes ``benchmarks/results/serve_abuse.{json,md}``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedrefine.bench.records import git_commit, markdown_table, script_command, write_results
from fedrefine.data.question_dataset import QuestionDataset
from fedrefine.evaluation import EvaluationConfig, Evaluator
from fedrefine.fuser import Fuser, FuserConfig
from fedrefine.fuser.registry import FuserRegistry
from fedrefine.fusion import FusedReceiver
from fedrefine.participants import ParticipantIdentity, TinySpec, build_tiny_participant
from fedrefine.runtime.drills import TAMPERINGS
from fedrefine.runtime.identities import identity_json
from fedrefine.runtime.participant_client import CallSettings, ParticipantClient
from fedrefine.runtime.participant_server import FaultDrill, ServeLimits, serve_participant
from fedrefine.runtime.protos import participant_pb2 as pb
from fedrefine.runtime.protos import participant_pb2_grpc as pb_grpc
from fedrefine.runtime.protos import registry_pb2 as rpb
from fedrefine.runtime.protos import registry_pb2_grpc as rpb_grpc
from fedrefine.runtime.registry_server import serve_registry
from fedrefine.tasks.routes import parse_routes
from fedrefine.toyworld.lightning import ToyParticipant
from fedrefine.toyworld.world import ToyWorld

#: A sender whose K/V are 32 KB per token: a 1,024-token Prefill is a 32 MB message.
WIDE = TinySpec("wide-sender", "llama", num_layers=8, hidden_size=64, num_heads=8, num_kv_heads=8, head_dim=64, seed=3)
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


def channel(port: int) -> grpc.Channel:
    """A channel with its own connection (gRPC shares one between channels to one target by default)."""
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1),
                                                               ("grpc.max_receive_message_length", 8 << 20)])


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"n": len(values), "p50_ms": round(statistics.median(ordered) * 1000, 1), "p99_ms": round(p99 * 1000, 1),
            "max_ms": round(ordered[-1] * 1000, 1)}


# --- slow readers ------------------------------------------------------------------------------------
def slow_readers(participant, readers: int, window_s: float) -> dict:
    server, port = serve_participant(participant, limits=ServeLimits())
    server.start()
    rows = [pb.TokenRow(ids=[(7 * i + j) % 200 + 3 for j in range(256)]) for i in range(4)]
    big = pb.PrefillRequest(prompts=rows, codec="fp32")
    small = pb.PrefillRequest(prompts=[pb.TokenRow(ids=[5, 6, 7, 8])], codec="fp32")
    stop = time.monotonic() + window_s
    opened = Counter()

    def reader() -> None:  # never reads; re-opens when the server ends its call (bounded by the window)
        with channel(port) as own:
            stub = pb_grpc.ParticipantStub(own)
            while time.monotonic() < stop:
                call = stub.Prefill(big, timeout=window_s + 5)
                opened.add()
                while not call.done() and time.monotonic() < stop:
                    time.sleep(0.05)
                call.cancel()

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(readers)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # the readers hold their calls
    latency: dict[str, list[float]] = {"health": [], "identity": [], "small_prefill": []}
    failures: dict[str, int] = {"health": 0, "identity": 0, "small_prefill": 0}
    refusals = Counter()

    def probe() -> None:  # health and Identity every 50 ms, on their own connection
        with channel(port) as good:
            health, stub = health_pb2_grpc.HealthStub(good), pb_grpc.ParticipantStub(good)
            while time.monotonic() < stop:
                for name, call in (("health", lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5)),
                                   ("identity", lambda: stub.Identity(pb.IdentityRequest(), timeout=5))):
                    start = time.perf_counter()
                    try:
                        call()
                        latency[name].append(time.perf_counter() - start)
                    except grpc.RpcError:
                        failures[name] += 1
                time.sleep(0.05)

    def prefills() -> None:  # small Prefills one after another, a refused one retried after 50 ms
        with channel(port) as good:
            stub = pb_grpc.ParticipantStub(good)
            while time.monotonic() < stop:
                start = time.perf_counter()
                for _attempt in range(400):
                    try:
                        list(stub.Prefill(small, timeout=10))
                        latency["small_prefill"].append(time.perf_counter() - start)
                        break
                    except grpc.RpcError as err:
                        if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                            failures["small_prefill"] += 1
                            break
                        refusals.add()
                        time.sleep(0.05)
                else:
                    failures["small_prefill"] += 1
                time.sleep(0.05)

    good_clients = [threading.Thread(target=probe, daemon=True), threading.Thread(target=prefills, daemon=True)]
    for thread in good_clients:
        thread.start()
    for thread in good_clients:
        thread.join(timeout=window_s + 30)
    small_refusals = refusals.value
    for thread in threads:
        thread.join(timeout=window_s + 10)
    server.stop(None).wait(5)
    return {"readers": readers, "window_s": window_s, "reader_calls_opened": opened.value,
            **{f"{name}": percentiles(values) for name, values in latency.items()},
            "failures": failures, "small_prefill_refusals_retried": small_refusals}


class Counter:
    def __init__(self) -> None:
        self.value, self._lock = 0, threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.value += 1


# --- bad requests ------------------------------------------------------------------------------------
def bad_requests(participant) -> list[dict]:
    server, port = serve_participant(participant, limits=ServeLimits())
    server.start()
    ident = identity_json(ParticipantIdentity("tiny/a", "main", "LlamaForCausalLM", 2, 2, 32, 64, 128))
    one = [pb.TokenRow(ids=[5, 6])]
    cases = {
        "prefill width 16384 for one token": pb.PrefillRequest(prompts=[pb.TokenRow(ids=[5])], codec="fp32", width=16384),
        "prefill 65 prompts": pb.PrefillRequest(prompts=one * 65, codec="fp32"),
        "prefill 9000-token prompt": pb.PrefillRequest(prompts=[pb.TokenRow(ids=[5] * 9000)], codec="fp32"),
        "prefill 70,000 prompt tokens": pb.PrefillRequest(prompts=[pb.TokenRow(ids=[5] * 8000)] * 9, codec="fp32"),
        "prefill token id outside the vocabulary": pb.PrefillRequest(prompts=[pb.TokenRow(ids=[10**6])], codec="fp32"),
        "prefill negative group size": pb.PrefillRequest(prompts=one, codec="int4", group_size=-3),
        "prefill unknown codec": pb.PrefillRequest(prompts=one, codec="int3"),
        "prefill 100,000 layers": pb.PrefillRequest(prompts=one, codec="fp32", layers=list(range(100_000))),
        "prefill repeated layers": pb.PrefillRequest(prompts=one, codec="fp32", layers=[0, 0]),
        "prefill sent columns outside the prompt": pb.PrefillRequest(prompts=one, codec="fp32",
                                                                     sent=[pb.TokenRow(ids=[7])]),
        "prefill both prompts and texts": pb.PrefillRequest(prompts=one, texts=["x"], codec="fp32"),
        "prefill 200 KB text": pb.PrefillRequest(texts=["word " * 40_000], codec="fp32"),
        "hint 200 KB prompt": pb.HintRequest(prompts=["word " * 40_000], max_new_tokens=4),
        "hint negative batch size": pb.HintRequest(prompts=["hi"], max_new_tokens=4, batch_size=-1),
        "hint 10,000 new tokens": pb.HintRequest(prompts=["hi"], max_new_tokens=10_000),
        "hint 65 prompts": pb.HintRequest(prompts=["hi"] * 65, max_new_tokens=4),
        "rephrase on a participant without rephrasing": pb.RephraseRequest(queries=["q"]),
    }
    results = []
    with channel(port) as own:
        stub = pb_grpc.ParticipantStub(own)
        for name, request in cases.items():
            method = {pb.PrefillRequest: lambda r: list(stub.Prefill(r, timeout=20)), pb.HintRequest:
                      lambda r: stub.Hint(r, timeout=20), pb.RephraseRequest: lambda r: stub.Rephrase(r, timeout=20)}
            results.append(_refused(name, lambda: method[type(request)](request),
                                    {grpc.StatusCode.UNIMPLEMENTED} if "rephrase" in name else REFUSALS))
    server.stop(None).wait(5)
    root = Path(tempfile.mkdtemp(prefix="fedrefine-abuse-registry-"))
    FuserRegistry(root)  # an empty registry: requests are checked before anything is looked up
    server, port = serve_registry(root)
    server.start()
    downloads = {
        "download identity that is not JSON": rpb.DownloadRequest(sender_identity_json="{", receiver_identity_json=ident),
        "download 1 MB identity": rpb.DownloadRequest(sender_identity_json="x" * 2**20, receiver_identity_json=ident),
        "download ../ file name": rpb.DownloadRequest(sender_identity_json=ident, receiver_identity_json=ident,
                                                      files=["../../etc/passwd"]),
        "download 1,000 files": rpb.DownloadRequest(sender_identity_json=ident, receiver_identity_json=ident,
                                                    files=["fuser.json"] * 1000),
    }
    with channel(port) as own:
        stub = rpb_grpc.FuserRegistryStub(own)
        for name, request in downloads.items():
            results.append(_refused(name, lambda: list(stub.Download(request, timeout=20)), REFUSALS))
    server.stop(None).wait(5)
    return results


def _refused(name: str, call, expected: set) -> dict:
    start = time.perf_counter()
    try:
        call()
        code, detail = grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        code, detail = err.code(), err.details() or ""
    return {"case": name, "code": code.name, "refused": code in expected, "detail": detail,
            "detail_chars": len(detail), "ms": round((time.perf_counter() - start) * 1000, 1)}


# --- hostile senders ---------------------------------------------------------------------------------
def hostile_senders() -> list[dict]:
    participants = {n: ToyParticipant(t).load() for n, t in
                    {"receiver": "receiver", "llama": "llama-sender", "qwen2": "qwen2-sender"}.items()}
    torch.manual_seed(0)
    fusers = {n: Fuser(participants[n].identity, participants["receiver"].identity,
                       FuserConfig(hidden_size=32, dropout=0.0, gate_init=2.0)).eval() for n in ("llama", "qwen2")}
    for fuser in fusers.values():
        for layer in fuser.layers:
            for stream in (layer.key, layer.value):
                torch.nn.init.normal_(stream.projection.weight, std=0.3)
    world = ToyWorld()
    questions = QuestionDataset(world.questions(world.held_out(0)[:1])[:6] + world.questions(world.held_out(1)[:1])[:6])

    def evaluate(names, remotes):
        model = FusedReceiver(participants["receiver"], [participants[n] for n in names], [fusers[n] for n in names],
                              sender_names=list(names), remotes=remotes).eval()
        report = Evaluator(model, parse_routes(["c2c"], model.sender_names),
                           EvaluationConfig(answer_mode="cloze")).run(questions, 6)
        return report.rows()[0], [ok for _, ok in report.per_question["c2c"]]

    _, honest_alone = evaluate(["qwen2"], {})
    drill = FaultDrill()
    server, port = serve_participant(participants["llama"], drill=drill)
    server.start()
    results = []
    for tampering in TAMPERINGS:
        drill.tamper = tampering
        client = ParticipantClient(f"grpc://127.0.0.1:{port}", participants["llama"].identity,
                                   calls=CallSettings(deadline_s=30))
        try:
            row, answers = evaluate(["llama", "qwen2"], {"llama": client})
            dropped = row["senders_dropped"].get("llama", {})
            results.append({
                "tampering": tampering, "dropped": sum(dropped.values()) == len(questions), "reasons": dropped,
                "contributed": row["senders_contributed"], "evaluation_completed": row["questions"] == len(questions),
                "answers_equal_honest_sender_alone": answers == honest_alone,
            })
        except Exception as err:  # noqa: BLE001 - an evaluation that did not finish is the failure recorded
            results.append({"tampering": tampering, "dropped": False, "evaluation_completed": False,
                            "error": f"{type(err).__name__}: {err}"[:300]})
        finally:
            client.close()
    server.stop(None).wait(5)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readers", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--window-s", type=float, default=6.0)
    parser.add_argument("--out", default="benchmarks/results/serve_abuse")
    args = parser.parse_args()
    wide = build_tiny_participant(WIDE)
    slow = [slow_readers(wide, n, args.window_s) for n in args.readers]
    bad = bad_requests(wide)
    hostile = hostile_senders()
    at_most = max(slow, key=lambda r: r["readers"])
    payload = {
        "command": script_command(), "commit": git_commit(),
        "machine": f"{platform.node()} {platform.machine()} torch {torch.__version__}, {torch.get_num_threads()} threads",
        "server_limits": vars(ServeLimits()),
        "health_p99_ms_under_slow_readers": at_most["health"]["p99_ms"],
        "slow_readers_at_most": at_most["readers"],
        "slow_readers": slow,
        "bad_requests_all_refused": all(r["refused"] for r in bad),
        "bad_requests": bad,
        "hostile_all_dropped": all(r["dropped"] and r["evaluation_completed"] for r in hostile),
        "hostile_senders": hostile,
    }
    lines = ["# Abuse and load against served participants", "",
             f"`{payload['command']}` at {payload['commit']} ({payload['machine']})", "",
             f"Health p99 with {at_most['readers']} slow readers: **{payload['health_p99_ms_under_slow_readers']} ms**; "
             f"bad requests all refused: **{payload['bad_requests_all_refused']}**; hostile senders all dropped with the "
             f"evaluation completed: **{payload['hostile_all_dropped']}**.", "", "## Slow readers", "",
             *markdown_table(["readers", "calls opened", "health p50/p99 ms", "Identity p50/p99 ms",
                              "small Prefill p50/p99 ms", "small Prefill retries", "failures"],
                             [[r["readers"], r["reader_calls_opened"], f"{r['health']['p50_ms']} / {r['health']['p99_ms']}",
                               f"{r['identity']['p50_ms']} / {r['identity']['p99_ms']}",
                               f"{r['small_prefill']['p50_ms']} / {r['small_prefill']['p99_ms']}",
                               r["small_prefill_refusals_retried"], r["failures"]] for r in slow]),
             "", "## Bad requests", "",
             *markdown_table(["case", "status", "ms", "detail"], [[r["case"], r["code"], r["ms"], r["detail"][:90]]
                                                                 for r in bad]),
             "", "## Hostile sender (Llama-style, beside an honest Qwen2-style sender)", "",
             *markdown_table(["tampering", "dropped on every question", "reasons", "evaluation completed",
                              "answers = honest sender alone"],
                             [[r["tampering"], r["dropped"], r.get("reasons", r.get("error")), r["evaluation_completed"],
                               r.get("answers_equal_honest_sender_alone")] for r in hostile]), ""]
    write_results(args.out, payload, "\n".join(lines))


if __name__ == "__main__":
    main()
