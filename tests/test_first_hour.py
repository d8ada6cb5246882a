"""The first hour with your own models, end to end on tiny saved models of the real classes (a Qwen3-class receiver,
a Llama-class sender with its own tokenizer and chat template): the shipped configs with only their paths edited,
fit -> test through every route (T2T with shared and private queries too) -> the Python API -> serve the sender and
test remotely -> bench -> another model at the same path."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import yaml

from conftest import LLAMA_SPEC, RECEIVER_SPEC
from fedrefine.participants import TinySpec, build_tiny_participant
from runtime_support import server_process

REPO = Path(__file__).resolve().parents[1]
ROUTES = ["receiver", "sender", "c2c", "t2t", "c2c@shared", "t2t@shared", "t2t@private"]
QUICK = [  # a few steps and questions, small fusers, short generations
    "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.num_sanity_val_steps", "0",
    "--data.train_samples", "16", "--data.num_questions", "4", "--data.eval_batch_size", "4",
    "--model.fuser.hidden_size", "16", "--model.max_length", "256",
]
EVALUATION = ["--model.evaluation.t2t.budget", "3", "--model.evaluation.rephrase.max_new_tokens", "4",
              "--model.evaluation.rephrase.candidates", "1"]


def save_model(spec: TinySpec, directory: Path) -> Path:
    participant = build_tiny_participant(spec)
    participant.model.save_pretrained(directory)
    participant.tokenizer.save_pretrained(directory)
    return directory


def edited(config: str, target: Path, paths: dict[str, str]) -> Path:
    """A shipped config with its placeholder paths replaced: the only edits a user makes."""
    text = (REPO / config).read_text()
    assert any(placeholder in text for placeholder in paths)
    for placeholder, path in paths.items():
        text = text.replace(placeholder, path)
    target.write_text(text)
    return target


def run(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    """``fedrefine ARGV`` in-process: exit status and stderr."""
    from fedrefine.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["fedrefine", *argv])
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = stop.code or 0
    return code, capsys.readouterr().err


def records(root: Path) -> dict[tuple[str, str], dict]:
    lines = (root / "test_samples.jsonl").read_text().splitlines()
    return {(r["route"], r["question"]): r for r in map(json.loads, lines)}


@pytest.mark.slow
def test_the_first_hour_with_your_own_models(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    save_model(RECEIVER_SPEC, tmp_path / "models" / "receiver")
    save_model(LLAMA_SPEC, tmp_path / "models" / "sender")
    paths = {"/path/to/receiver": "models/receiver", "/path/to/sender": "models/sender",
             "/path/to/conversations.jsonl": str(REPO / "data/tiny/chat.jsonl"),
             "/path/to/questions_{split}.jsonl": str(REPO / "data/tiny/openbookqa_{split}.jsonl")}
    pair_config = edited("configs/local_pair.yaml", tmp_path / "local_pair.yaml", paths)
    root = tmp_path / "runs" / "mine"

    # fit: everything under the run's root; the receiver known by its files (no `name:`), the sender by its name
    unnamed = edited("configs/local_pair.yaml", tmp_path / "unnamed.yaml", {**paths, "name: my-receiver": "name: null"})
    fit = ["fit", "--config", str(unnamed), "--run_name", "mine", *QUICK]
    code, err = run(monkeypatch, capsys, *fit)
    assert code == 0, err
    assert {p.name for p in root.iterdir()} >= {"config.yaml", "checkpoints", "fuser", "csv"}
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["last.ckpt"]
    trained = json.loads((root / "fuser" / "fuser.json").read_text())
    assert trained["trained_with"] == {"sender_dtype": "float32", "receiver_dtype": "float32", "precision": "32-true"}
    assert trained["receiver"]["name_or_path"] == "receiver" and trained["sender"]["name_or_path"] == "my-sender"
    fuser_bytes = (root / "fuser" / "fuser.safetensors").read_bytes()
    fit_config = (root / "config.yaml").read_text()

    # a second fit into the same root overwrites nothing
    code, err = run(monkeypatch, capsys, *fit)
    assert code == 2 and "An earlier run left a fuser" in err and "--overwrite true" in err and "Traceback" not in err
    assert (root / "fuser" / "fuser.safetensors").read_bytes() == fuser_bytes

    # test with fit's resolved config, through every route; each question recorded per route
    routes = "[" + ", ".join(ROUTES) + "]"
    code, err = run(monkeypatch, capsys, "test", "--config", str(root / "config.yaml"),
                          "--model.evaluation.test_routes", routes, *EVALUATION)
    assert code == 0, err
    assert (root / "config.yaml").read_text() == fit_config and (root / "test_config.yaml").is_file()
    results = json.loads((root / "test_results.json").read_text())
    assert [r["route"] for r in results["rows"]] == ROUTES and all(r["questions"] == 4 for r in results["rows"])
    tested = records(root)
    assert len(tested) == 4 * len(ROUTES)
    assert all(set(r) >= {"question", "gold", "prediction", "scores", "senders", "failure"} for r in tested.values())
    assert all(r["senders"] == ["my-sender"] for (route, _), r in tested.items() if route.startswith(("c2c", "t2t")))

    # the same model by an absolute path (trailing slash) is the same participant: its fuser is accepted
    absolute = ["--model.receiver.init_args.name_or_path", f"{tmp_path / 'models' / 'receiver'}/"]
    code, err = run(monkeypatch, capsys, "test", "--config", str(root / "config.yaml"), *absolute,
                          "--trainer.default_root_dir", str(tmp_path / "runs" / "absolute"))
    assert code == 0, err

    # the Python API scores exactly as `fedrefine test` did
    import fedrefine

    pair = fedrefine.load(root / "config.yaml", overrides=EVALUATION)
    questions = pair.questions("test")
    for route in ["receiver", "sender", "c2c", "t2t", "t2t@shared"]:
        for answer in pair.answer_many(questions, route):
            expected = tested[(route, answer.question)]
            assert answer.prediction == expected["prediction"] and answer.failure == expected["failure"]
            for name, scores in expected["scores"].items():
                assert answer.option_scores[name] == pytest.approx(scores, abs=1e-4)
    one = pair.answer(questions[0].question_stem, list(questions[0].choices), route="c2c", answer=questions[0].answer_key)
    assert one.option_scores["logits"] == pytest.approx(tested[("c2c", questions[0].id)]["scores"]["logits"], abs=1e-4)
    assert one.senders == ["my-sender"] and one.bytes_sent > 0 and one.timings_ms["receiver"] > 0

    # serve the sender with the shipped serve config; test remotely (a sender-alone route is refused before the run)
    serve_config = edited("configs/serve/local_model.yaml", tmp_path / "serve.yaml", {"/path/to/sender": "models/sender"})
    with server_process(["participant", "--config", str(serve_config)], tmp_path, "sender") as (_, port):
        sender = yaml.safe_load(fit_config)["model"]["init_args"]["sender"]
        remote = json.dumps({"class_path": "fedrefine.runtime.participant_client.RemoteParticipant",
                             "init_args": {"endpoint": f"grpc://127.0.0.1:{port}", "reader": sender}})
        remote_test = ["test", "--config", str(root / "config.yaml"), "--model.sender", remote, *EVALUATION]
        code, err = run(monkeypatch, capsys, *remote_test, "--model.evaluation.test_routes", "[receiver, sender]",
                              "--trainer.default_root_dir", str(tmp_path / "runs" / "refused"))
        assert code == 2 and "served elsewhere" in err and not (tmp_path / "runs" / "refused" / "test_results.json").exists()
        code, err = run(monkeypatch, capsys, *remote_test, "--model.evaluation.test_routes", "[c2c, t2t]",
                              "--trainer.default_root_dir", str(tmp_path / "runs" / "remote"))
        assert code == 0, err
    remotely = records(tmp_path / "runs" / "remote")
    for key, record in remotely.items():
        assert record["prediction"] == tested[key]["prediction"] and record["senders"] == ["my-sender"]

    # bench a sweep of the pair: the missing fuser is trained for the sweep's participants, logger-free
    sweep = edited("configs/bench/local_sweep.yaml", tmp_path / "local_sweep.yaml", paths)
    train_args = json.dumps(["--trainer.logger", "false", *QUICK])
    code, err = run(monkeypatch, capsys, "bench", "--config", str(sweep), "--train_missing.config", str(pair_config),
                          "--train_missing.args", train_args, "--num_questions", "4", "--batch_size", "4",
                          "--evaluation.t2t.budget", "3", "--evaluation.rephrase.max_new_tokens", "4",
                          "--evaluation.rephrase.candidates", "1", "--device", "cpu")
    assert code == 0, err
    rows = json.loads((tmp_path / "runs" / "local_sweep" / "results" / "local_sweep.json").read_text())["rows"]
    assert rows and all(r["status"] == "ok" for r in rows)
    registry = [p.name for p in (tmp_path / "runs" / "local_sweep" / "registry").iterdir()]
    assert len(registry) == 1 and registry[0].startswith("my-sender-local-") and "__to__my-receiver-local-" in registry[0]
    assert (tmp_path / "runs" / "local_sweep" / "fusers" / "residual-sender" / "checkpoints" / "last.ckpt").is_file()

    # another model at the same path is refused, and the error says what to do
    save_model(dataclasses.replace(RECEIVER_SPEC, seed=7), tmp_path / "models" / "receiver")
    code, err = run(monkeypatch, capsys, "test", "--config", str(root / "config.yaml"),
                          "--trainer.default_root_dir", str(tmp_path / "runs" / "other"))
    assert code == 2 and "Same model at another path? set `name:`" in err and "another model" in err
