"""Senders in their own processes (``fedrefine serve participant``), reached over gRPC on 127.0.0.1.

Real server processes with the toy world's participants; every wait is bounded (server start-up,
call deadlines, connection attempts), so a failing test fails instead of hanging.
"""

from __future__ import annotations

import time

import grpc
import pytest
import torch
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedrefine.data.question_dataset import QuestionDataset
from fedrefine.evaluation import EvaluationConfig, Evaluator
from fedrefine.fuser import Fuser, FuserConfig
from fedrefine.fusion import FusedReceiver
from fedrefine.fusion.batch import FusionBatch
from fedrefine.runtime.participant_client import CallSettings, ParticipantClient, RemoteParticipant
from fedrefine.runtime.protos import participant_pb2 as pb
from fedrefine.runtime.protos import participant_pb2_grpc as pb_grpc
from fedrefine.runtime.security import ClientSecurity
from fedrefine.tasks.routes import parse_routes
from fedrefine.tasks.t2t import T2TConfig
from fedrefine.toyworld.lightning import ToyParticipant
from fedrefine.toyworld.world import ToyWorld
from fedrefine.wire import SenderUnavailable
from fusion_support import fused_logits
from runtime_support import self_signed_certificate, server_process

TOKEN = "federation-secret"
SENDERS = {"llama": "llama-sender", "qwen2": "qwen2-sender"}


def serve_config(directory, toy_name, **extra):
    path = directory / f"{toy_name}-{len(list(directory.glob('*.yaml')))}.yaml"
    config = {"participant": {"class_path": "fedrefine.toyworld.lightning.ToyParticipant", "init_args": {"name": toy_name}}}
    path.write_text(yaml.safe_dump({**config, **extra}))
    return str(path)


def client_security(tmp, ca=None):
    return ClientSecurity(token_file=str(tmp / "token"), ca_file=ca)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Four served participants: llama over TLS, qwen2 plaintext, a slow qwen2 and a llama sending truncated messages."""
    tmp = tmp_path_factory.mktemp("servers")
    (tmp / "token").write_text(TOKEN + "\n")
    cert, key = self_signed_certificate(tmp)
    token = ["--token-file", str(tmp / "token")]
    plans = {
        "llama": ([serve_config(tmp, "llama-sender"), "--cert-file", str(cert), "--key-file", str(key)], "grpcs"),
        "qwen2": ([serve_config(tmp, "qwen2-sender")], "grpc"),
        "slow_qwen2": ([serve_config(tmp, "qwen2-sender", drill={"delay_s": 3.0})], "grpc"),
        "bad_llama": ([serve_config(tmp, "llama-sender", drill={"truncate": True})], "grpc"),
    }
    with _started(tmp, plans, token) as endpoints:
        yield tmp, cert, endpoints


class _started:
    def __init__(self, tmp, plans, token):
        self.tmp, self.plans, self.token, self.contexts = tmp, plans, token, []

    def __enter__(self):
        endpoints = {}
        for name, (config, scheme) in self.plans.items():
            context = server_process(["participant", "--config", *config[:1], *config[1:], *self.token], self.tmp, name)
            _, port = context.__enter__()
            self.contexts.append(context)
            endpoints[name] = f"{scheme}://127.0.0.1:{port}" if scheme == "grpc" else f"grpcs://localhost:{port}"
        return endpoints

    def __exit__(self, *exc):
        for context in reversed(self.contexts):
            context.__exit__(*exc)


@pytest.fixture(scope="module")
def toy():
    participants = {name: ToyParticipant(toy_name).load() for name, toy_name in {"receiver": "receiver", **SENDERS}.items()}
    torch.manual_seed(0)
    config = FuserConfig(hidden_size=32, dropout=0.0, gate_init=2.0)
    fusers = {
        name: Fuser(participants[name].identity, participants["receiver"].identity, config).eval() for name in SENDERS
    }
    for fuser in fusers.values():  # random, not trained: remote and in-process must agree whatever the weights
        for layer in fuser.layers:
            for stream in (layer.key, layer.value):
                torch.nn.init.normal_(stream.projection.weight, std=0.3)
    world = ToyWorld()
    # six questions about a held-out entity of each private group (llama knows group 0, qwen2 group 1)
    questions = QuestionDataset(world.questions(world.held_out(0)[:1])[:6] + world.questions(world.held_out(1)[:1])[:6])
    return participants, fusers, questions


def receiver_for(toy, names, remotes=None):
    participants, fusers, _ = toy
    return FusedReceiver(
        participants["receiver"], [participants[n] for n in names], [fusers[n] for n in names],
        sender_names=list(names), remotes=remotes or {},
    ).eval()


def client(servers, name, sender, deadline_s=30.0, security=None):
    tmp, cert, endpoints = servers
    security = security or client_security(tmp, str(cert) if endpoints[name].startswith("grpcs") else None)
    expected = ToyParticipant(SENDERS[sender]).load().identity
    return ParticipantClient(endpoints[name], expected, security, CallSettings(deadline_s=deadline_s, connect_timeout_s=10.0))


def evaluate(model, questions, routes, batch_size=6, **config):
    evaluation = EvaluationConfig(answer_mode="cloze", **config)
    report = Evaluator(model, parse_routes(routes, model.sender_names), evaluation).run(questions, batch_size)
    return {row["route"]: row for row in report.rows()}, report


def predictions(report, route):
    return [ok for _, ok in report.per_question[route]]


def test_remote_senders_answer_exactly_as_in_process_and_report_measured_transfer(servers, toy):
    questions = toy[2]
    local = receiver_for(toy, ["llama", "qwen2"])
    remote = receiver_for(toy, ["llama", "qwen2"], {"llama": client(servers, "llama", "llama"),
                                                     "qwen2": client(servers, "qwen2", "qwen2")})
    routes = ["c2c:llama", "c2c"]
    local_rows, local_report = evaluate(local, questions, routes)
    remote_rows, remote_report = evaluate(remote, questions, routes)
    for route in routes:
        assert predictions(remote_report, route) == predictions(local_report, route)
        assert remote_rows[route]["accuracy"] == local_rows[route]["accuracy"]
        assert remote_rows[route]["senders_dropped"] == {}
        assert remote_rows[route]["transfer_ms"] > 0  # measured, not modelled
        # what the transport carried: the fp32 message plus the chunks' protobuf and gRPC framing
        assert remote_rows[route]["transport_bytes_per_question"] > remote_rows[route]["bytes_per_question"] > 0
    assert remote_rows["c2c"]["senders_contributed"] == {"llama": 12, "qwen2": 12}
    assert "transfer_ms" not in local_rows["c2c"]


def test_a_remote_message_equals_the_in_process_one_after_a_lossless_round_trip(servers, toy):
    model = receiver_for(toy, ["llama"], {"llama": client(servers, "llama", "llama")})
    local = receiver_for(toy, ["llama"])
    batch = batch_of(local, toy[2])
    delivery = model.sending.deliver("llama", batch.senders["llama"])
    expected = local.sending.send("llama", batch.senders["llama"])
    assert delivery.message.layers.keys() == expected.layers.keys()
    sent = expected.attention_mask.bool()  # (B, N): every real position travels (fuse_at: prompt)
    for j, pair in expected.layers.items():
        for got, want in zip(delivery.message.layers[j], pair):  # (B, H, N, D) each
            assert torch.equal(got.transpose(1, 2)[sent], want.transpose(1, 2)[sent])
    assert delivery.transport_bytes > delivery.message.wire_bytes == delivery.message.nbytes
    assert delivery.sender_seconds > 0 and delivery.seconds >= delivery.sender_seconds


def batch_of(model: FusedReceiver, questions) -> FusionBatch:
    from fedrefine.evaluation.question_batch import QuestionEncoder, Variant

    encoder = QuestionEncoder(model, parse_routes(["c2c"], model.sender_names), "cloze")
    return encoder.encode([questions[i] for i in range(4)]).fusion[Variant("item", "original")]


def test_fused_prepare_with_remote_senders_overlaps_and_matches_in_process_logits(servers, toy):
    remote = receiver_for(toy, ["llama", "qwen2"], {"llama": client(servers, "llama", "llama"),
                                                     "qwen2": client(servers, "qwen2", "qwen2")})
    local = receiver_for(toy, ["llama", "qwen2"])
    batch = batch_of(local, toy[2])
    with torch.no_grad():
        assert torch.equal(fused_logits(remote, batch), fused_logits(local, batch))


def test_a_sender_slower_than_its_deadline_is_dropped_for_that_query(servers, toy):
    questions = toy[2]
    remote = receiver_for(toy, ["llama", "qwen2"], {"llama": client(servers, "llama", "llama"),
                                                     "qwen2": client(servers, "slow_qwen2", "qwen2", deadline_s=1.0)})
    llama_only = receiver_for(toy, ["llama"])
    start = time.monotonic()
    rows, report = evaluate(remote, questions, ["c2c"])
    assert time.monotonic() - start < 30  # two batches, each waiting at most the 1 s deadline for the slow one
    _, expected = evaluate(llama_only, questions, ["c2c"])
    assert predictions(report, "c2c") == predictions(expected, "c2c")
    assert rows["c2c"]["senders_dropped"] == {"qwen2": {"deadline": 12}}
    assert rows["c2c"]["senders_contributed"] == {"llama": 12}
    assert {d["sender"] for d in report.dropped} == {"qwen2"} and len(report.dropped) == 12


def test_a_truncated_message_is_refused_and_its_sender_left_out(servers, toy):
    remote = receiver_for(toy, ["llama", "qwen2"], {"llama": client(servers, "bad_llama", "llama"),
                                                     "qwen2": client(servers, "qwen2", "qwen2")})
    rows, report = evaluate(remote, toy[2], ["c2c"])
    _, expected = evaluate(receiver_for(toy, ["qwen2"]), toy[2], ["c2c"])
    assert predictions(report, "c2c") == predictions(expected, "c2c")
    assert rows["c2c"]["senders_dropped"] == {"llama": {"invalid_message": 12}}
    assert "truncated" in report.dropped[0]["why"]


def test_an_oversized_message_is_refused(servers, toy):
    model = receiver_for(toy, ["qwen2"], {"qwen2": client(servers, "qwen2", "qwen2")})
    batch = batch_of(model, toy[2])
    remote = model.remotes["qwen2"]
    sender = batch.senders["qwen2"]
    with pytest.raises(SenderUnavailable, match="over the limit") as err:
        remote.prefill(sender.input_ids, sender.attention_mask, [0], None, "fp32", 128, [remote.expected.key], 1000)
    assert err.value.reason == "invalid_message"


def test_wrong_or_missing_token_is_refused(servers, toy):
    tmp, _, endpoints = servers
    (tmp / "wrong").write_text("not-the-token")
    wrong = client(servers, "qwen2", "qwen2", security=ClientSecurity(token_file=str(tmp / "wrong")))
    with pytest.raises(SenderUnavailable, match="UNAUTHENTICATED") as err:
        wrong.connect()
    assert err.value.reason == "refused"
    channel = grpc.insecure_channel(endpoints["qwen2"].removeprefix("grpc://"))
    with pytest.raises(grpc.RpcError) as raw:
        pb_grpc.ParticipantStub(channel).Identity(pb.IdentityRequest(), timeout=10)
    assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # health checks need no token
    channel.close()
    assert "Refused /fedrefine.participant.v1.Participant/Identity" in (tmp / "qwen2.log").read_text()


def test_tls_needs_the_servers_certificate(servers, toy):
    tmp, cert, _ = servers
    good = client(servers, "llama", "llama")
    assert good.connect() is not None
    untrusted = client(servers, "llama", "llama", security=ClientSecurity(token_file=str(tmp / "token")))
    untrusted.calls = CallSettings(connect_timeout_s=2.0, connect_retries=1)
    with pytest.raises(SenderUnavailable) as err:
        untrusted.connect()
    assert err.value.reason == "unreachable"


def test_a_sender_serving_another_identity_is_refused(servers, toy):
    impostor = client(servers, "qwen2", "llama")  # the llama fuser's link, but the server runs qwen2
    with pytest.raises(SenderUnavailable, match="trained for") as err:
        impostor.connect()
    assert err.value.reason == "identity"
    model = receiver_for(toy, ["llama"], {"llama": impostor})
    rows, _ = evaluate(model, toy[2], ["c2c"])
    assert rows["c2c"]["senders_dropped"] == {"llama": {"identity": 12}}


def test_t2t_hints_come_from_the_remote_sender(servers, toy):
    local = receiver_for(toy, ["qwen2"])
    remote = receiver_for(toy, ["qwen2"], {"qwen2": client(servers, "qwen2", "qwen2")})
    config = {"t2t": T2TConfig(budget=4)}
    local_rows, local_report = evaluate(local, toy[2], ["t2t"], **config)
    remote_rows, remote_report = evaluate(remote, toy[2], ["t2t"], **config)
    assert predictions(remote_report, "t2t") == predictions(local_report, "t2t")
    assert remote_rows["t2t"]["senders_contributed"] == {"qwen2": 12}
    assert remote_rows["t2t"]["transport_bytes_per_question"] > 0 and remote_rows["t2t"]["transfer_ms"] > 0


def test_rephrase_is_offered_only_when_configured(servers, toy):
    with pytest.raises(SenderUnavailable, match="does not offer rephrasing"):
        client(servers, "qwen2", "qwen2").rephrase(["Where does Zorbix live?"])


def test_a_sender_killed_mid_evaluation_degrades_to_the_others_without_hanging(tmp_path, toy):
    (tmp_path / "token").write_text(TOKEN)
    config = serve_config(tmp_path, "qwen2-sender")
    questions = toy[2]
    llama_only = receiver_for(toy, ["llama"])
    _, expected = evaluate(llama_only, questions, ["c2c"])
    with server_process(["participant", "--config", config, "--token-file", str(tmp_path / "token")], tmp_path, "doomed") as (process, port):
        remote_qwen2 = ParticipantClient(f"grpc://127.0.0.1:{port}", toy[0]["qwen2"].identity,
                                         client_security(tmp_path), CallSettings(deadline_s=10.0, connect_timeout_s=2.0))
        model = receiver_for(toy, ["llama", "qwen2"], {"qwen2": remote_qwen2})
        evaluator = Evaluator(model, parse_routes(["c2c"], model.sender_names), EvaluationConfig(answer_mode="cloze"))
        from fedrefine.evaluation.report import EvaluationReport

        report = EvaluationReport(evaluator.routes)
        evaluator.evaluate([questions[i] for i in range(6)], report)  # both senders
        process.kill()
        process.wait(timeout=10)
        start = time.monotonic()
        evaluator.evaluate([questions[i] for i in range(6, 12)], report)  # qwen2 is gone
        assert time.monotonic() - start < 30
    row = report.rows()[0]
    assert row["senders_contributed"] == {"llama": 12, "qwen2": 6}
    assert row["senders_dropped"] == {"qwen2": {"unreachable": 6}}
    assert predictions(report, "c2c")[6:] == predictions(expected, "c2c")[6:]


def test_remote_participant_source_checks_its_endpoint():
    with pytest.raises(ValueError, match="grpc:// or grpcs://"):
        RemoteParticipant("http://127.0.0.1:1", ToyParticipant("llama-sender"))
    with pytest.raises(ValueError, match="no port"):
        RemoteParticipant("grpc://127.0.0.1", ToyParticipant("llama-sender"))


def test_a_sender_that_is_down_costs_one_connection_set_up_per_retry_interval(toy):
    down = ParticipantClient("grpc://127.0.0.1:1", toy[0]["llama"].identity,
                             calls=CallSettings(deadline_s=5.0, connect_timeout_s=0.5, connect_retries=2, retry_after_s=60.0))
    with pytest.raises(SenderUnavailable, match="2 connection attempts") as first:
        down.connect()
    start = time.monotonic()
    with pytest.raises(SenderUnavailable) as again:
        down.connect()
    assert time.monotonic() - start < 0.1 and again.value is first.value and first.value.reason == "unreachable"


def test_a_bench_sweep_with_remote_senders_gives_the_in_process_accuracies(servers, toy, tmp_path):
    from fedrefine.bench.runner import BenchSweep
    from fedrefine.fuser.registry import FuserRegistry
    from fedrefine.toyworld.lightning import ToyWorldDataModule

    tmp, cert, endpoints = servers
    participants, fusers, _ = toy
    registries = {}
    for mode in ("residual", "concat"):
        registry = FuserRegistry(tmp_path / mode)
        for name in SENDERS:
            registry.save(fusers[name] if mode == "residual" else Fuser(
                participants[name].identity, participants["receiver"].identity, FuserConfig(mode=mode, hidden_size=16)))
        registries[mode] = str(registry.root)
    remote = {
        "llama": RemoteParticipant(endpoints["llama"], ToyParticipant("llama-sender"), client_security(tmp, str(cert))),
        "qwen2": RemoteParticipant(endpoints["qwen2"], ToyParticipant("qwen2-sender"), client_security(tmp)),
    }
    local = {n: ToyParticipant(s) for n, s in SENDERS.items()}

    def sweep(senders, name):
        return BenchSweep(
            participants={"receiver": ToyParticipant("receiver"), **senders}, receiver="receiver",
            senders=list(SENDERS), data=ToyWorldDataModule(test_split="all_held_out", data_dir=str(tmp_path / "data")),
            registries=registries, routes=["c2c.residual", "c2c.concat", "t2t"], query_modes=["original"],
            num_questions=8, batch_size=4, evaluation=EvaluationConfig(answer_mode="cloze", t2t=T2TConfig(budget=4)),
            output_dir=str(tmp_path / name), name=name,
        ).run(command="test")

    in_process, over_grpc = sweep(local, "local"), sweep(remote, "remote")
    assert [r["key"] for r in over_grpc] == [r["key"] for r in in_process]
    for here, there in zip(in_process, over_grpc):
        assert there["accuracy"] == here["accuracy"], there["key"]
        if there["key"].startswith("c2c"):
            assert there["transport_bytes_per_question"] > 0 and there["senders_dropped"] == {}
            # measured on the wire, not modelled from the bytes at link_mbit_per_s
            assert there["transfer_s"] != pytest.approx(there["bytes_per_question"] * 8 / 100e6)


def test_mutual_tls_refuses_a_client_without_its_certificate(tmp_path, toy):
    server_cert, server_key = self_signed_certificate(tmp_path, "server")
    client_cert, client_key = self_signed_certificate(tmp_path, "client")
    config = serve_config(tmp_path, "qwen2-sender")
    tls = ["--cert-file", str(server_cert), "--key-file", str(server_key), "--client-ca-file", str(client_cert)]
    with server_process(["participant", "--config", config, *tls], tmp_path, "mtls") as (_, port):
        endpoint, identity = f"grpcs://localhost:{port}", toy[0]["qwen2"].identity
        calls = CallSettings(connect_timeout_s=3.0, connect_retries=1)
        with_certificate = ClientSecurity(ca_file=str(server_cert), cert_file=str(client_cert), key_file=str(client_key))
        assert ParticipantClient(endpoint, identity, with_certificate, calls).connect() is not None
        without = ParticipantClient(endpoint, identity, ClientSecurity(ca_file=str(server_cert)), calls)
        with pytest.raises(SenderUnavailable) as err:
            without.connect()
        assert err.value.reason == "unreachable"
