"""Bad input from a user: every mistake is one ``fedrefine: error:`` line naming the input, exit status 2 (130 for
Ctrl-C), nothing allocated past a stated bound; and ``fedrefine bench`` refuses a results file it cannot trust,
naming the row and field, and names exactly which setting changed."""

from __future__ import annotations

import json
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedrefine.bench.results_file import ResultsFileError, SweepResultsFile, check_results
from test_cli import run_main

SWEEP = ["bench", "--config", "benchmarks/fig3_toy.yaml"]


@pytest.mark.parametrize("argv, says", [
    ([*SWEEP, "--routes", "[c2c.bogus]"], "Sweep routes must be a non-empty subset of"),
    ([*SWEEP, "--query_modes", "[whispered]"], "query modes of ['original', 'shared', 'private'] (got ['whispered'])"),
    ([*SWEEP, "--senders", "[nobody]"], "Sweep names participants ['nobody'] that are not in `participants`"),
    ([*SWEEP, "--num_questions", "0"], "num_questions must be at least 1 (or null for all), got 0"),
    ([*SWEEP, "--num_questions", "-4"], "num_questions must be at least 1 (or null for all), got -4"),
    ([*SWEEP, "--batch_size", "0"], "batch_size must be at least 1, got 0"),
    ([*SWEEP, "--batch_size", "-2"], "batch_size must be at least 1, got -2"),
    ([*SWEEP, "--evaluation.link.codec", "int3"], "Unknown link codec 'int3'"),
    ([*SWEEP, "--evaluation.link.layer_budget", "0"], "link.layer_budget must be in (0, 1], got 0"),
    (["kv-bytes", "--codec", "int8", "--prompt-tokens", "0"], "--prompt-tokens must be in 1..65,536, got 0"),
    (["kv-bytes", "--codec", "int8", "--prompt-tokens", "-5"], "--prompt-tokens must be in 1..65,536, got -5"),
    (["kv-bytes", "--codec", "int8", "--prompt-tokens", "100000000"], "--prompt-tokens must be in 1..65,536"),
    (["kv-bytes", "--codec", "fp32", "--prompt-tokens", "65536"], "measured message"),
    (["serve", "participant", "--participant.class_path", "fedrefine.toyworld.lightning.ToyParticipant",
      "--participant.init_args.name", "nobody"], "Unknown toy participant 'nobody'"),
])
def test_a_bad_input_is_one_line_naming_it_and_exit_2(monkeypatch, capsys, argv, says):
    code = run_main(monkeypatch, *argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert says in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1


def test_a_port_already_in_use_is_one_line(monkeypatch, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = run_main(monkeypatch, "serve", "registry", "--root", ".", "--port", str(port))
    err = capsys.readouterr().err
    assert code == 2 and f"Cannot bind 127.0.0.1:{port}: the port is taken" in err and "Traceback" not in err


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr("fedrefine.bench.kv_bytes.main", interrupted)
    assert run_main(monkeypatch, "kv-bytes") == 130
    err = capsys.readouterr().err
    assert err.strip() == "fedrefine kv-bytes: interrupted"


# --- defect 9: results files are checked on load; the changed setting is named ------------------------
def ok_row(**fields):
    return {"key": "receiver", "route": "receiver", "query_mode": "original", "status": "ok", "accuracy": 0.5,
            "ci_low": 0.4, "ci_high": 0.6, "latency_s": 0.1, "bytes_per_token": 0.0, "bytes_per_question": 0.0,
            "n_questions": 4, "failed": 0, **fields}


@pytest.mark.parametrize("content, says", [
    ([1, 2], "holds a JSON list, not a sweep's results object"),
    ({"rows": {"a": 1}}, "rows is a dict, not a list"),
    ({"rows": [{"key": "receiver", "route": "receiver", "query_mode": "original"}]}, "row 0 (receiver) has no status"),
    ({"rows": [ok_row(accuracy=1.7)]}, "row 0 (receiver) has accuracy 1.7, outside [0, 1]"),
    ({"rows": [ok_row(), ok_row(key="t2t:llama", ci_low="low")]}, "row 1 (t2t:llama) has ci_low 'low', not a finite"),
    ({"rows": [ok_row(latency_s=-1)]}, "has latency_s -1, outside [0, inf)"),
    ({"rows": [ok_row(status="done")]}, "has status 'done'; a sweep writes 'ok' or 'unsupported'"),
])
def test_a_results_file_that_is_not_a_sweeps_is_refused_naming_row_and_field(tmp_path, content, says):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(content))
    results = SweepResultsFile(path)
    with pytest.raises(ResultsFileError, match="restore .* or rerun with --fresh") as err:
        results.load({"fingerprint": "x"})
    assert says in str(err.value)
    with pytest.raises(ResultsFileError):
        results.check_settings({"fingerprint": None, "name": "sweep"})
    assert results.load({"fingerprint": "x"}, fresh=True) == {}  # --fresh moves it aside
    assert not path.exists()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["rows", "key", "route", "query_mode", "status", "accuracy", "ci_low", "ci_high", "latency_s",
                         "fingerprint"]) | st.text(max_size=4), children, max_size=6),
    max_leaves=20,
))
def test_fuzz_any_results_json_is_accepted_valid_or_refused_cleanly(tmp_path, content):
    try:
        check_results(content, tmp_path / "sweep.json")
    except ResultsFileError as err:
        assert "sweep.json" in str(err) and len(str(err)) < 400
        return
    for row in content.get("rows", []):
        if row["status"] == "ok":
            assert 0 <= row["accuracy"] <= 1


def test_the_batch_size_does_not_invalidate_results_and_a_changed_setting_is_named(tmp_path):
    from fedrefine.bench.results_file import settings_fingerprint
    from fedrefine.evaluation import EvaluationConfig
    from fedrefine.participants import ParticipantIdentity

    people = {"receiver": ParticipantIdentity("tiny/r", "main", "LlamaForCausalLM", 2, 2, 8, 16, 32)}
    made = settings_fingerprint(people, [], EvaluationConfig(), 32, 100.0)
    assert settings_fingerprint(people, [], EvaluationConfig(), 4, 100.0) == made
    path = tmp_path / "sweep.json"
    results = SweepResultsFile(path)
    results.save({"fingerprint": made, "name": "sweep"}, [ok_row()])
    assert list(results.load({"fingerprint": settings_fingerprint(people, [], EvaluationConfig(), 7, 100.0),
                              "name": "sweep"})) == ["receiver"]
    other = settings_fingerprint(people, [], EvaluationConfig(answer_mode="cloze"), 32, 100.0)
    from fedrefine.bench.results_file import StaleResultsError

    with pytest.raises(StaleResultsError, match=r"same header, but other evaluation\.answer_mode\)"):
        results.load({"fingerprint": other, "name": "sweep"})
    # a file written before the batch size left the fingerprint is still resumed at the batch size it was made with
    path.write_text(json.dumps({"fingerprint": made.legacy, "name": "sweep", "rows": [ok_row()]}))
    assert list(results.load({"fingerprint": made, "name": "sweep"})) == ["receiver"]
