"""Evaluation routes end to end: parsing, query modes through the real encode/run path, bytes, leakage."""

import pytest
import torch

from fedrefine.data.question_dataset import QuestionDataset
from fedrefine.evaluation import EvaluationConfig, Evaluator, QueryPlanner, Variant
from fedrefine.evaluation.metrics import wilson_interval
from fedrefine.evaluation.question_batch import QuestionEncoder
from fedrefine.fuser import Fuser, FuserConfig
from fedrefine.fusion import FusedReceiver
from fedrefine.privacy.leakage import InputRecorder, content_words
from fedrefine.privacy.rephrase import RephraseConfig, Rephraser
from fedrefine.tasks.multiple_choice import MultipleChoiceItem
from fedrefine.tasks.routes import Route, RouteError, parse_routes
from fedrefine.tasks.t2t import T2TConfig

DISTINCTIVE = {"zorblax", "quenford", "glimmerstone"}
ITEMS = [
    MultipleChoiceItem("q0", "Which colour does the zorblax of Quenford have?", ("red", "blue", "green", "pink"), tuple("ABCD"), "B"),
    MultipleChoiceItem("q1", "Where was the glimmerstone found?", ("a cave", "a river", "a hill", "a town"), tuple("ABCD"), "C"),
]


def parse_route(text, senders):
    return Route.parse(text).resolve(senders)


def test_route_names_parse_and_bad_ones_say_what_is_allowed():
    senders = ["llama", "qwen2"]
    assert parse_route("c2c:llama+qwen2@private", senders).query_mode == "private"
    assert parse_route("t2t:qwen2", senders).senders == ("qwen2",)
    assert parse_route("c2c_random_kv", senders).control == "random_kv"
    assert parse_route("c2c:auto", senders).auto
    concat = parse_route("c2c.concat:qwen2_mismatched", senders)
    assert (concat.kind, concat.fusion, concat.senders, concat.control) == ("c2c", "concat", ("qwen2",), "mismatched")
    for bad in ["sender", "c2c:mistral", "t2t_mismatched", "c2c@secret", "sender:llama@shared", "c2c_reordered@shared",
                "t2t.concat", "c2c.mixed", "c2c:llama+"]:
        with pytest.raises(RouteError, match="route|ambiguous"):
            parse_route(bad, senders)


@pytest.mark.parametrize("text", ["receiver", "sender:llama", "c2c", "c2c.residual:llama+qwen2", "c2c:auto",
                                  "c2c.concat:qwen2_random_kv", "t2t:llama@private", "receiver@shared"])
def test_route_text_round_trips(text):
    route = Route.parse(text)
    assert str(route) == text and Route.parse(str(route)) == route and route.label == text


def test_resolved_routes_name_their_senders_and_keep_their_label():
    route = parse_route("sender", ["llama"])
    assert route.senders == ("llama",) and route.label == "sender" and str(route) == "sender:llama"
    assert [r.senders for r in parse_routes(["c2c", "t2t:qwen2"], ["llama", "qwen2"])] == [("llama", "qwen2"), ("qwen2",)]


def test_wilson_interval():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)


@pytest.fixture
def world(chatty_receiver, llama_chatty, qwen2_chatty):
    return chatty_receiver, [llama_chatty, qwen2_chatty]


def federated(receiver, senders, mode):
    config = FuserConfig(hidden_size=8, mode=mode)
    fusers = [Fuser(s.identity, receiver.identity, config) for s in senders]
    return FusedReceiver(receiver, senders, fusers, sender_names=["llama", "qwen2"]).eval()


def run(model, routes, planner, items=ITEMS):
    questions = QuestionDataset(items)
    parsed = parse_routes(routes, model.sender_names)
    report = Evaluator(model, parsed, EvaluationConfig(t2t=T2TConfig(budget=3)), planner).run(questions, batch_size=2)
    return {row["route"]: row for row in report.rows()}


@pytest.mark.parametrize("mode, routes", [("concat", ["c2c@private", "t2t@private", "c2c@shared"]),
                                           ("residual", ["c2c@shared", "t2t@shared", "receiver@shared"])])
def test_rephrased_routes_keep_the_original_from_senders(world, mode, routes):
    receiver, senders = world
    recorders = [InputRecorder(s) for s in senders]
    for recorder in recorders:
        recorder.__enter__()
    try:
        model = federated(receiver, [r.participant for r in recorders], mode)
        planner = QueryPlanner(Rephraser(receiver, RephraseConfig(max_new_tokens=6)))
        results = run(model, routes, planner)
    finally:
        for recorder in recorders:
            recorder.__exit__(None, None, None)
    for recorder in recorders:
        assert recorder.texts  # the senders did read something
        assert not DISTINCTIVE & content_words(recorder.received_text())
    for name, row in results.items():
        if not name.startswith("receiver"):
            assert row["leakage_overlap"] is not None and row["questions"] == 2
            assert row["rephrase_ms"] > 0


def test_reports_count_the_questions_whose_rephrasing_invented_a_name(world, monkeypatch):
    from fedrefine.participants.generation import Reply
    from fedrefine.privacy import rephrase

    def garble_the_first(participant, prompts, **kwargs):  # the zorblax question's rephrasing invents "Zorbax"
        return [Reply("Which colour is Zorbax?" if "zorblax" in p else "Where was it found?", (1,), 0.1) for p in prompts]

    monkeypatch.setattr(rephrase, "generate_replies", garble_the_first)
    receiver, senders = world
    planner = QueryPlanner(Rephraser(receiver, RephraseConfig(max_new_tokens=6, candidates=1)))
    rows = run(federated(receiver, senders, "concat"), ["c2c", "receiver@private", "t2t@private", "c2c@shared"], planner)
    assert rows["c2c"]["rephrasings_unfaithful"] is None and rows["receiver@private"]["rephrasings_unfaithful"] is None
    assert rows["t2t@private"]["rephrasings_unfaithful"] == rows["c2c@shared"]["rephrasings_unfaithful"] == 0.5
    assert rows["c2c@shared"]["questions"] == 2  # counted, never dropped
    assert rows["t2t@private"]["rephrase_ms"] == pytest.approx(rows["c2c@shared"]["rephrase_ms"]) == 100  # greedy: once


def test_every_question_pays_for_its_rephrasing_even_when_another_asks_the_same(world, monkeypatch):
    from fedrefine.participants.generation import Reply
    from fedrefine.privacy import rephrase

    monkeypatch.setattr(rephrase, "generate_replies", lambda participant, prompts, **kwargs: [
        Reply("Which colour is it?", (1,), 0.1) for _ in prompts])
    receiver, senders = world
    again = MultipleChoiceItem("q2", ITEMS[0].question_stem, ("pink", "green", "blue", "red"), tuple("ABCD"), "C")
    planner = QueryPlanner(Rephraser(receiver, RephraseConfig(max_new_tokens=6, candidates=1)))
    rows = run(federated(receiver, senders, "concat"), ["c2c@private", "c2c@shared"], planner, items=[ITEMS[0], again])
    assert rows["c2c@private"]["rephrase_ms"] == pytest.approx(rows["c2c@shared"]["rephrase_ms"]) == pytest.approx(100)


def test_original_routes_do_reach_senders_and_bytes_are_exact(world):
    receiver, senders = world
    recorders = [InputRecorder(s) for s in senders]
    for recorder in recorders:
        recorder.__enter__()
    try:
        model = federated(receiver, [r.participant for r in recorders], "residual")
        results = run(model, ["c2c", "t2t", "receiver"], QueryPlanner())
    finally:
        for recorder in recorders:
            recorder.__exit__(None, None, None)
    assert DISTINCTIVE <= content_words(" ".join(r.received_text() for r in recorders))  # the check can fail
    # C2C: K and V at fp32 of the sender layers the fuser reads (the 4-layer qwen2 sender's top layer
    # feeds no receiver layer under the bottom-up map, so it is not sent); T2T: 4 bytes per token id
    carried = {"llama": 2, "qwen2": 3}
    expected = sum(carried[n] * s.identity.num_kv_heads * s.identity.head_dim * 2 * 4 for n, s in zip(carried, senders))
    assert results["c2c"]["bytes_per_token"] == expected
    assert results["t2t"]["bytes_per_token"] == 8
    assert results["receiver"]["bytes_per_token"] == 0 and results["c2c"]["leakage_overlap"] is None
    assert {"sender_ms", "receiver_ms"} <= set(results["c2c"])


def test_private_mode_with_residual_fusion_is_refused(world):
    receiver, senders = world
    model = federated(receiver, senders, "residual")
    with pytest.raises(RouteError, match="'private' cannot run route 'c2c@private'.*'c2c.concat' or 't2t'"):
        run(model, ["c2c@private"], QueryPlanner(Rephraser(receiver)))
    with pytest.raises(RouteError, match="asks for concat fusion, but the receiver's fusers are residual"):
        run(model, ["c2c.concat"], QueryPlanner())
    Route.parse("c2c.concat")  # the route the error suggests is one the parser takes


def test_last_token_residual_fusion_runs_in_private_mode_on_the_shared_answer_prefix(world):
    """Each sender reads its own rephrasing plus the answer prefix; only the last prompt token (in that prefix) is
    aligned, fused and sent: nothing of the user's text reaches a sender, and every question is scored."""
    receiver, senders = world
    recorders = [InputRecorder(s) for s in senders]
    for recorder in recorders:
        recorder.__enter__()
    try:
        config = FuserConfig(hidden_size=8, fuse_at="last")
        fusers = [Fuser(r.participant.identity, receiver.identity, config) for r in recorders]
        model = FusedReceiver(receiver, [r.participant for r in recorders], fusers, sender_names=["llama", "qwen2"]).eval()
        planner = QueryPlanner(Rephraser(receiver, RephraseConfig(max_new_tokens=6)))
        questions = QuestionDataset(ITEMS)
        routes = parse_routes(["c2c@private"], model.sender_names)
        evaluation = EvaluationConfig(answer_mode="cloze", prefill_answer=True)
        rows = {r["route"]: r for r in Evaluator(model, routes, evaluation, planner).run(questions, batch_size=2).rows()}
        encoded = QuestionEncoder(model, routes, mode="cloze", prefill=True, planner=planner).encode(
            [questions[i] for i in range(len(ITEMS))])
    finally:
        for recorder in recorders:
            recorder.__exit__(None, None, None)
    for recorder in recorders:
        assert recorder.texts and not DISTINCTIVE & content_words(recorder.received_text())
    original = parse_routes(["c2c"], model.sender_names)  # the senders read the user's text here: not recorded
    rows |= {r["route"]: r for r in Evaluator(model, original, evaluation).run(questions, batch_size=2).rows()}
    assert rows["c2c@private"]["questions"] == rows["c2c"]["questions"] == len(ITEMS)
    assert rows["c2c@private"]["failed"] == 0
    private = next(v for v in encoded.fusion if v.query_mode == "private")
    for name in model.sender_names:
        alignment = encoded.fusion[private].senders[name].alignment  # (B, N_t)
        assert (alignment[:, -1] >= 0).all()  # the last prompt token reads the sender's answer prefix
        assert (alignment[:, : -len("The correct answer is".split())] < 0).all()  # the question is never aligned
    assert rows["c2c@private"]["bytes_per_token"] == rows["c2c"]["bytes_per_token"]  # one position per prompt either way


def test_prefill_answer_lets_senders_read_the_answer_prefix(world):
    receiver, senders = world
    model = federated(receiver, senders, "residual")
    questions = [QuestionDataset(ITEMS)[i] for i in range(len(ITEMS))]
    routes = [parse_route("c2c", model.sender_names)]
    plain = QuestionEncoder(model, routes, mode="cloze").encode(questions)
    prefilled = QuestionEncoder(model, routes, mode="cloze", prefill=True).encode(questions)
    item = Variant("item", "original")
    assert torch.equal(prefilled.fusion[item].receiver_input_ids, plain.fusion[item].receiver_input_ids)
    for name in model.sender_names:  # "The correct answer is" is now content every sender reads: 4+ more aligned tokens
        aligned = [(b.fusion[item].senders[name].alignment >= 0).sum(1) for b in (plain, prefilled)]
        assert (aligned[1] >= aligned[0] + 4).all()
    with pytest.raises(ValueError, match="prefill_answer"):
        EvaluationConfig(answer_mode="generate", prefill_answer=True)


def test_the_printed_failure_list_says_how_many_more_there_are():
    from rich.console import Console

    from fedrefine.evaluation.report import SHOWN_FAILURES, EvaluationReport
    from fedrefine.tasks.routes import parse_routes

    report = EvaluationReport(parse_routes(["receiver"], []))
    report.failures = [(f"q{i}", "ValueError: bad") for i in range(SHOWN_FAILURES + 3)]
    console = Console(record=True, width=200)
    report.print_table("t", console)
    text = console.export_text()
    assert f"q{SHOWN_FAILURES - 1}: ValueError" in text and f"q{SHOWN_FAILURES}:" not in text
    assert "and 3 more (all of them in the results JSON)" in text


def test_a_route_failing_on_one_question_fails_that_question_only_and_the_run_finishes(world, monkeypatch):
    from fedrefine.tasks import t2t

    real = t2t.generate_replies

    def refuse_the_zorblax(participant, prompts, *args, **kwargs):  # as a template that changes one hint prompt
        if any("zorblax" in p for p in prompts):
            raise ValueError("The chat template of llama changes the content of message 0 (user)")
        return real(participant, prompts, *args, **kwargs)

    monkeypatch.setattr(t2t, "generate_replies", refuse_the_zorblax)
    receiver, senders = world
    questions = QuestionDataset(ITEMS)
    model = federated(receiver, senders, "concat")
    evaluator = Evaluator(model, parse_routes(["receiver", "t2t"], model.sender_names), EvaluationConfig(t2t=T2TConfig(budget=3)))
    report = evaluator.run(questions, batch_size=2)
    rows = {row["route"]: row for row in report.rows()}
    assert rows["t2t"]["questions"] == 2 and rows["t2t"]["failed"] == 1 and rows["receiver"]["failed"] == 0
    assert report.route_failures == [{"question": "q0", "route": "t2t",
                                      "why": "ValueError: The chat template of llama changes the content of message 0 (user)"}]
    records = {(r["route"], r["question"]): r for r in report.records}
    assert records[("t2t", "q0")]["failure"].startswith("ValueError") and records[("t2t", "q0")]["prediction"] is None
    assert records[("t2t", "q1")]["failure"] is None and records[("t2t", "q1")]["prediction"] in "ABCD"
    assert len(records[("t2t", "q1")]["scores"]["logits"]) == 4 and records[("receiver", "q0")]["senders"] == []
    assert records[("t2t", "q1")]["senders"] == ["llama", "qwen2"]


def test_an_empty_rephrasing_is_unfaithful_and_t2t_still_answers(world, monkeypatch):
    from fedrefine.participants.generation import Reply
    from fedrefine.privacy import rephrase

    monkeypatch.setattr(rephrase, "generate_replies", lambda participant, prompts, **kwargs: [Reply("\n", (1,), 0.1) for _ in prompts])
    receiver, senders = world
    planner = QueryPlanner(Rephraser(receiver, RephraseConfig(max_new_tokens=6, candidates=1, check="off")))
    rows = run(federated(receiver, senders, "concat"), ["t2t@shared", "t2t@private"], planner)
    for row in rows.values():
        assert row["rephrasings_unfaithful"] == 1.0 and row["questions"] == 2 and row["failed"] == 0


def test_the_printed_table_fits_an_80_column_terminal(monkeypatch):
    from rich.console import Console

    from fedrefine.evaluation.report import EvaluationReport, compact_bytes
    from fedrefine.tasks.routes import parse_routes

    report = EvaluationReport(parse_routes(["receiver"], []))
    row = {"accuracy": 1.0, "ci_low": 0.99, "ci_high": 1.0, "acc": 1.0, "acc_norm": 1.0, "latency_ms": 12345.6,
           "bytes_per_token": 86016, "bytes_per_question": 11616256, "leakage_overlap": 1.0, "senders_dropped": {}}
    routes = ["receiver", "c2c_reordered@private", "t2t:llama+qwen2+deep@shared"]
    monkeypatch.setattr(report, "rows", lambda: [{**row, "route": route} for route in routes])
    console = Console(record=True, width=80)
    report.print_table("FedRefine test: a -> b", console)
    lines = console.export_text().splitlines()
    assert max(map(len, lines)) <= 80
    table = "\n".join(lines)
    assert "…" not in table  # nothing cut
    for route in routes:  # a long route wraps within its column; everything else stays on one line
        assert route[:12] in table
    assert [compact_bytes(n) for n in (1152, 86016, 999_999, 3_096_576)] == ["1,152", "86.0 kB", "1.0 MB", "3.1 MB"]
    for header in ("accuracy", "95% CI", "acc_norm", "ms/q", "B/q", "leakage", "11.6 MB"):
        assert header in table
