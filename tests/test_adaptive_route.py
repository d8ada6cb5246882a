"""The ``adaptive`` route in an evaluation: it answers exactly as the option its policy picks."""

import json

import pytest

from fedrefine.data.question_dataset import QuestionDataset, load_questions
from fedrefine.evaluation import EvaluationConfig, Evaluator
from fedrefine.evaluation.config import AdaptiveRouteConfig
from fedrefine.tasks.routes import Route, RouteError, parse_routes
from fedrefine.wire import LinkConfig
from test_training import make_module, write_data


def profile(tmp_path, questions=2):
    def option(name, route, codec, dev, size, compute):
        return {"name": name, "route": route, "codec": codec, "layer_budget": None, "dev_accuracy": dev,
                "correct": [True] * questions, "bytes": [size] * questions, "compute_s": compute,
                "round_trips": 0 if route == "receiver" else 1}

    path = tmp_path / "profile.json"
    path.write_text(json.dumps({
        "format": "fedrefine.adaptive_profile", "version": 1,
        "questions": [{"id": f"q{i}", "receiver_tokens": 10, "sender_tokens": {"s": 10}} for i in range(questions)],
        "options": [option("receiver", "receiver", None, 0.25, 0, 0.001),
                    option("c2c/int8", "c2c", "int8", 0.80, 50_000, 0.002),
                    option("c2c/fp32", "c2c", "fp32", 0.81, 200_000, 0.002)],
    }))
    return str(path)


def results(module, questions, routes, **config):
    evaluation = EvaluationConfig(**config)
    report = Evaluator(module.fused, parse_routes(routes, module.fused.sender_names), evaluation).run(questions, 4)
    return {row["route"]: row for row in report.rows()}, report


@pytest.mark.parametrize("budget, mbit, expected, codec", [
    (1.0, 1000.0, "c2c", "fp32"),    # everything fits: the best development accuracy
    (0.03, 100.0, "c2c", "int8"),    # fp32: 2 + 20 + 16 ms > 30 ms; int8: 2 + 20 + 4 ms fits
    (0.01, 100.0, "receiver", None),  # only the receiver alone fits
])
def test_adaptive_answers_as_the_option_it_picks(tmp_path, budget, mbit, expected, codec):
    write_data(tmp_path)
    questions = QuestionDataset(load_questions(str(tmp_path / "obqa_{split}.jsonl"), "test", None))
    module = make_module().eval()
    adaptive = AdaptiveRouteConfig(profile=profile(tmp_path), mbit_per_s=mbit, rtt_s=0.02, budget_s=budget)
    rows, report = results(module, questions, ["adaptive"], adaptive=adaptive)
    assert not hasattr(module.fused, "link")  # the option's link is an argument of its route: nothing to restore
    same, _ = results(module, questions, [expected], link=LinkConfig(codec=codec))
    chosen = rows["adaptive"]
    assert report.correct(report.routes[0]) == [ok for _, ok in _.per_question[expected]]
    assert chosen["accuracy"] == same[expected]["accuracy"]
    assert chosen["bytes_per_question"] == pytest.approx(same[expected]["bytes_per_question"])


def test_adaptive_needs_a_profile_and_takes_no_controls(tmp_path):
    module = make_module().eval()
    with pytest.raises(ValueError, match="evaluation.adaptive.profile"):
        Evaluator(module.fused, parse_routes(["adaptive"], module.fused.sender_names), EvaluationConfig())
    with pytest.raises(RouteError, match="adaptive takes no control"):
        Route.parse("adaptive@private")
