"""The benchmark runner: sweep expansion, resume, reports, byte accounting, and the sweep configs."""

import csv
import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
import torch

from fedrefine.bench.cells import ROUTES, expand_cells, sender_subsets, unsupported_reason
from fedrefine.bench.kv_bytes import PAPER_RECEIVER, PAPER_SENDERS, bytes_table, format_table
from fedrefine.bench.results_file import StaleResultsError
from fedrefine.bench.runner import BenchSweep
from fedrefine.bench.sweep_report import CSV_COLUMNS
from fedrefine.cli import load_sweep
from fedrefine.evaluation import EvaluationConfig
from fedrefine.fuser import Fuser, FuserConfig
from fedrefine.fuser.registry import FuserRegistry, MissingFuserError
from fedrefine.privacy.rephrase import RephraseConfig
from fedrefine.tasks.routes import Route
from fedrefine.tasks.t2t import T2TConfig
from fedrefine.toyworld.lightning import ToyParticipant, ToyWorldDataModule

REPO = Path(__file__).resolve().parents[1]


# --- sweep expansion ----------------------------------------------------------------------------
def test_prefix_subsets_add_every_single_sender_for_point_to_point():
    assert sender_subsets(["a", "b", "c"], "prefixes") == [("a",), ("b",), ("c",), ("a", "b"), ("a", "b", "c")]
    assert sender_subsets(["a", "b", "c"], "prefixes", singles=False) == [("a",), ("a", "b"), ("a", "b", "c")]


def test_all_subsets_and_explicit_subsets_keep_the_sweep_order():
    assert sender_subsets(["a", "b", "c"], "all") == [
        ("a",), ("b",), ("c",), ("a", "b"), ("a", "c"), ("b", "c"), ("a", "b", "c"),
    ]
    assert sender_subsets(["a", "b", "c"], [["c", "a"]], singles=False) == [("a", "c")]


@pytest.mark.parametrize("subsets", [[["a", "z"]], [[]], [["a", "a"]], "some"])
def test_invalid_subsets_are_rejected_with_the_senders_named(subsets):
    with pytest.raises(ValueError, match="subset"):
        sender_subsets(["a", "b"], subsets)


def test_cells_cover_routes_x_modes_x_subsets_plus_one_baseline_per_mode():
    cells = expand_cells(["a", "b"], ["c2c.residual", "c2c.concat", "t2t"], ["original", "shared", "private"])
    assert len(cells) == 3 + 3 * 3 * 3  # baselines + routes x modes x {a, b, a+b}
    assert [str(c) for c in cells[:3]] == ["receiver", "receiver@shared", "receiver@private"]
    assert len({str(c) for c in cells}) == len(cells)
    assert "c2c.concat:a+b@private" in {str(c) for c in cells} and "t2t:b" in {str(c) for c in cells}
    residual = Route.parse("c2c.residual:a@shared")
    assert residual in cells and residual.fusion == "residual" and residual.family == "c2c.residual"


def test_residual_fusion_in_private_mode_is_kept_as_unsupported_with_its_reason():
    assert "private" in unsupported_reason(Route.parse("c2c.residual:a@private"))
    assert unsupported_reason(Route.parse("c2c.concat:a@private")) is None
    assert unsupported_reason(Route.parse("c2c.residual:a@private"), aligned="last") is None  # last-token fusers
    assert unsupported_reason(Route.parse("t2t:a@private")) is None
    assert unsupported_reason(Route.parse("c2c.residual:a@shared"), options="withhold") is not None


def test_unknown_routes_or_modes_are_errors():
    with pytest.raises(ValueError, match="routes"):
        expand_cells(["a"], ["c2c"])
    with pytest.raises(ValueError, match="query modes"):
        expand_cells(["a"], query_modes=["secret"])


# --- byte accounting ----------------------------------------------------------------------------
def test_real_config_bytes_per_token_match_hand_computed_shapes():
    # 2 (K and V) x layers x KV heads x head dim x 2 bytes (bf16), from the models' published configs:
    expected = {
        "Qwen/Qwen2.5-0.5B-Instruct": 2 * 24 * 2 * 64 * 2,  # 12,288
        "Qwen/Qwen2.5-Coder-0.5B-Instruct": 2 * 24 * 2 * 64 * 2,  # 12,288
        "Qwen/Qwen2.5-1.5B-Instruct": 2 * 28 * 2 * 128 * 2,  # 28,672
        "meta-llama/Llama-3.2-1B-Instruct": 2 * 16 * 8 * 64 * 2,  # 32,768
    }
    rows = bytes_table(PAPER_RECEIVER, PAPER_SENDERS)
    assert {r.sender: r.kv_bytes for r in rows} == expected
    assert sum(r.kv_bytes for r in rows) == 86_016  # the paper's "88 KB" for four senders
    assert sum(r.token_bytes for r in rows) == 16  # the paper's 16 bytes for T2T
    assert bytes_table(PAPER_RECEIVER, PAPER_SENDERS[:1], torch.float32)[0].kv_bytes == 2 * expected[PAPER_SENDERS[0]]
    assert "86,016" in format_table(rows, PAPER_RECEIVER, torch.bfloat16)


def test_a_receiver_shallower_than_the_sender_reads_fewer_sender_layers():
    # Llama-3.2-1B (16 layers) receiving from Qwen2.5-1.5B (28): bottom_up maps only 16 of 28 layers.
    (row,) = bytes_table("meta-llama/Llama-3.2-1B-Instruct", ["Qwen/Qwen2.5-1.5B-Instruct"])
    assert row.layers_sent == 16 and row.kv_bytes == 2 * 16 * 2 * 128 * 2


def test_kv_bytes_command_prints_the_table(capsys):
    from fedrefine.bench.kv_bytes import main

    main(["--senders", "Qwen/Qwen2.5-0.5B-Instruct"])
    assert "12,288" in capsys.readouterr().out


# --- the sweep configs --------------------------------------------------------------------------
def test_openbookqa_sweep_names_the_papers_five_models_and_parses_without_loading_them():
    sweep, run_args = load_sweep(["--config", str(REPO / "benchmarks/fig3_openbookqa.yaml")])
    names = {name: source.name_or_path for name, source in sweep.federation.sources.items()}
    assert names[sweep.receiver_name] == "Qwen/Qwen3-0.6B"
    assert [names[s] for s in sweep.sender_names] == list(PAPER_SENDERS)
    assert run_args == {"fresh": False, "rerun": []} and not sweep.federation._loaded  # nothing loaded
    assert sweep.data.eval_path == "allenai/openbookqa"
    assert len(sweep.cells) == 3 + 3 * 3 * 7  # prefixes 1..4 plus the three other singles


def test_toy_sweep_config_parses_with_overrides():
    argv = ["--config", str(REPO / "benchmarks/fig3_toy.yaml"), "--num_questions", "8", "--fresh", "--rerun", '["*@private"]']
    sweep, run_args = load_sweep(argv)
    assert run_args == {"fresh": True, "rerun": ["*@private"]} and sweep.num_questions == 8 and sweep.sender_names == ["llama", "qwen2", "qwen3", "deep-llama"]
    assert set(sweep.registries) == {"residual", "concat"}
    assert len(sweep.cells) == 3 + 3 * 3 * 7  # the four toy senders: prefixes 1..4 plus the three other singles
    assert sweep.data.preamble_fraction == 0.5  # private preambles on half of the questions


# --- running, resuming, reporting ---------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_registries(tmp_path_factory):
    """Untrained fusers for both toy senders in both modes (the runner does not care how they were made)."""
    root = tmp_path_factory.mktemp("registries")
    receiver = ToyParticipant("receiver").load()
    for mode in ("residual", "concat"):
        registry = FuserRegistry(root / mode)
        for name in ("llama-sender", "qwen2-sender"):
            sender = ToyParticipant(name).load()
            registry.save(Fuser(sender.identity, receiver.identity, FuserConfig(mode=mode, hidden_size=16, num_blocks=2)))
    return {mode: str(root / mode) for mode in ("residual", "concat")}


def toy_sweep(tmp_path, registries, **overrides):
    settings = dict(
        participants={"receiver": ToyParticipant("receiver"), "llama": ToyParticipant("llama-sender"),
                      "qwen2": ToyParticipant("qwen2-sender")},
        receiver="receiver",
        senders=["llama", "qwen2"],
        data=ToyWorldDataModule(test_split="all_held_out", data_dir=str(tmp_path / "data")),
        registries=registries,
        routes=["c2c.residual", "c2c.concat", "t2t"],
        query_modes=["original", "private"],
        num_questions=4,
        batch_size=4,
        evaluation=EvaluationConfig(answer_mode="cloze", t2t=T2TConfig(budget=4)),
        output_dir=str(tmp_path / "out"),
        name="sweep",
    )
    return BenchSweep(**(settings | overrides))


def test_a_sweep_writes_one_row_per_cell_and_resumes_without_rerunning(tmp_path, toy_registries, monkeypatch):
    sweep = toy_sweep(tmp_path, toy_registries)
    rows = sweep.run(command="test")
    assert [r["key"] for r in rows] == [str(c) for c in sweep.cells]
    ok = [r for r in rows if r["status"] == "ok"]
    unsupported = [r for r in rows if r["status"] == "unsupported"]
    assert {r["key"] for r in unsupported} == {str(c) for c in sweep.cells if c.family == "c2c.residual" and c.query_mode == "private"}
    assert all(r["n_questions"] == 4 for r in ok)
    assert all(0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1 for r in ok)  # cloze cells carry lm-eval's accuracies
    both = next(r for r in ok if r["key"] == "c2c.concat:llama+qwen2")
    assert both["route"] == "c2c.concat" and both["senders"] == "llama+qwen2"
    assert set(both["sender_bytes_per_token"]) == {"llama", "qwen2"}
    assert both["bytes_per_token"] == pytest.approx(sum(both["sender_bytes_per_token"].values()))
    assert both["transfer_s"] == pytest.approx(both["bytes_per_question"] * 8 / 100e6)
    assert both["latency_s"] == pytest.approx(sum(both[f"{s}_s"] for s in ("rephrase", "sender", "transfer", "fuse", "receiver")))
    assert both["fuse_s"] > 0 and both["sender_s"] > 0
    t2t = next(r for r in ok if r["key"] == "t2t:llama+qwen2")
    assert t2t["bytes_per_token"] == 8  # 4 bytes per token id, two senders
    assert t2t["sender_bytes_per_token"] == {"llama": 4.0, "qwen2": 4.0}  # Fig. 3c's per-sender bars

    out = tmp_path / "out"
    with (out / "sweep.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == list(CSV_COLUMNS) and len(table) == len(sweep.cells)
    assert all(row["receiver_accuracy"] != "" for row in table if row["status"] == "ok")
    assert "cannot run" in (out / "sweep.md").read_text()
    for plot in ("fig3a.png", "fig3b.png", "fig3c.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"

    # Resume: a second run evaluates nothing and reproduces the same rows.
    calls = []
    monkeypatch.setattr(BenchSweep, "evaluate", lambda self, cell, questions: calls.append(cell))
    again = toy_sweep(tmp_path, toy_registries).run(command="test")
    assert calls == [] and again == rows

    # A half-finished results file resumes from where it stopped.
    saved = json.loads((out / "sweep.json").read_text())
    saved["rows"] = saved["rows"][:5]
    (out / "sweep.json").write_text(json.dumps(saved))
    monkeypatch.setattr(BenchSweep, "evaluate", lambda self, cell, questions: calls.append(str(cell)) or dict(rows[[r["key"] for r in rows].index(str(cell))]))
    toy_sweep(tmp_path, toy_registries).run(command="test")
    expected = [str(c) for c in sweep.cells[5:] if unsupported_reason(c) is None]
    assert calls == expected


def test_results_of_another_setting_are_refused_and_moved_aside_with_fresh(tmp_path, toy_registries, monkeypatch):
    toy_sweep(tmp_path, toy_registries, routes=["t2t"], query_modes=["original"]).run(command="test")
    out = tmp_path / "out"
    finished = (out / "sweep.json").read_text()
    calls = []
    original = BenchSweep.evaluate
    monkeypatch.setattr(BenchSweep, "evaluate", lambda self, cell, q: calls.append(str(cell)) or original(self, cell, q))
    changed = dict(routes=["t2t"], query_modes=["original"], num_questions=3)
    with pytest.raises(StaleResultsError, match=r"sweep.json holds the results of another sweep.*--fresh"):
        toy_sweep(tmp_path, toy_registries, **changed).run(command="test")
    assert calls == [] and (out / "sweep.json").read_text() == finished  # nothing evaluated, nothing overwritten
    toy_sweep(tmp_path, toy_registries, **changed).run(fresh=True, command="test")
    assert len(calls) == 4  # receiver + three subsets, all re-run
    monkeypatch.setattr(BenchSweep, "prepare_fusers", lambda self: pytest.fail("trained fusers before refusing"))
    with pytest.raises(StaleResultsError, match=r"differs in link_mbit_per_s: 100.0 -> 10.0"):
        toy_sweep(tmp_path, toy_registries, **changed, link_mbit_per_s=10.0).run(command="test")
    (aside,) = out.glob("sweep.stale-*.json")
    assert aside.read_text() == finished and {p.suffix for p in out.glob("sweep.stale-*")} == {".json", ".csv", ".md"}


def test_a_changed_fuser_reruns_only_the_cells_of_its_fusion_mode(tmp_path, toy_registries, monkeypatch):
    import shutil

    registries = {mode: str(shutil.copytree(path, tmp_path / f"registry-{mode}")) for mode, path in toy_registries.items()}
    settings = dict(routes=["c2c.residual", "c2c.concat", "t2t"], query_modes=["original"], subsets=[["llama"]], singles=False)
    first = toy_sweep(tmp_path, registries, **settings).run(command="test")
    receiver, llama = ToyParticipant("receiver").load(), ToyParticipant("llama-sender").load()
    registry = FuserRegistry(registries["residual"])
    fuser = registry.get(llama.identity, receiver.identity)
    with torch.no_grad():
        fuser.layers[0].value.projection.bias.add_(1.0)  # retrained: other weights
    registry.save(fuser)
    calls = []
    original = BenchSweep.evaluate
    monkeypatch.setattr(BenchSweep, "evaluate", lambda self, cell, q: calls.append(str(cell)) or original(self, cell, q))
    again = toy_sweep(tmp_path, registries, **settings).run(command="test")
    assert calls == ["c2c.residual:llama"]  # the receiver, concat and T2T rows are kept
    assert [r for r in again if r["route"] != "c2c.residual"] == [r for r in first if r["route"] != "c2c.residual"]
    saved = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert set(saved["fusion_fingerprints"]) == {"residual", "concat"}


def test_changed_rephrasing_settings_rerun_only_the_rephrased_cells(tmp_path, toy_registries, monkeypatch):
    settings = dict(routes=["t2t"], query_modes=["original", "private"], subsets=[["llama"]], singles=False)
    evaluation = EvaluationConfig(answer_mode="cloze", t2t=T2TConfig(budget=4), rephrase=RephraseConfig(max_new_tokens=4))
    first = toy_sweep(tmp_path, toy_registries, evaluation=evaluation, **settings).run(command="test")
    calls = []
    original = BenchSweep.evaluate
    monkeypatch.setattr(BenchSweep, "evaluate", lambda self, cell, q: calls.append(str(cell)) or original(self, cell, q))
    moved_cache = dataclasses.replace(evaluation, rephrase_cache_dir=str(tmp_path / "cache"))  # where, not what
    toy_sweep(tmp_path, toy_registries, evaluation=moved_cache, **settings).run(command="test")
    assert calls == []
    retried = dataclasses.replace(evaluation, rephrase=RephraseConfig(max_new_tokens=4, candidates=2))
    again = toy_sweep(tmp_path, toy_registries, evaluation=retried, **settings).run(command="test")
    assert calls == ["receiver@private", "t2t:llama@private"]  # the original-query rows are kept
    assert [r for r in again if r["query_mode"] == "original"] == [r for r in first if r["query_mode"] == "original"]
    other = dataclasses.replace(retried, t2t=T2TConfig(budget=5))  # any other evaluation setting still starts over
    with pytest.raises(StaleResultsError, match=r"same header, but other evaluation\.t2t\)"):  # named exactly
        toy_sweep(tmp_path, toy_registries, evaluation=other, **settings).run(command="test")


def test_rerun_evaluates_the_named_finished_cells_again_and_an_unknown_name_is_an_error(tmp_path, toy_registries, monkeypatch):
    settings = dict(routes=["t2t"], query_modes=["original", "private"], subsets=[["llama"], ["llama", "qwen2"]], singles=False)
    toy_sweep(tmp_path, toy_registries, **settings).run(command="test")
    calls = []
    original = BenchSweep.evaluate
    monkeypatch.setattr(BenchSweep, "evaluate", lambda self, cell, q: calls.append(str(cell)) or original(self, cell, q))
    toy_sweep(tmp_path, toy_registries, **settings).run(command="test", rerun=["t2t:*+*@private", "receiver"])
    assert calls == ["receiver", "t2t:llama+qwen2@private"]
    with pytest.raises(ValueError, match=r"--rerun \['c2c\*'\] names no cell of this sweep"):
        toy_sweep(tmp_path, toy_registries, **settings).run(command="test", rerun=["c2c*"])


def test_every_row_records_the_commit_the_sweep_started_at(tmp_path, toy_registries, monkeypatch):
    from fedrefine.bench import runner

    monkeypatch.setattr(runner, "git_commit", lambda: "abc1234")
    sweep = toy_sweep(tmp_path, toy_registries, routes=["t2t"], query_modes=["original"], subsets=[["llama"]], singles=False)
    monkeypatch.setattr(runner, "git_commit", lambda: "later99+dirty")  # the tree changes while the sweep runs
    rows = sweep.run(command="test")
    assert len(rows) == 2 and {r["commit"] for r in rows} == {"abc1234"}
    assert json.loads((tmp_path / "out" / "sweep.json").read_text())["commit"] == "abc1234"
    assert "at commit `abc1234` (cells computed at `abc1234`)" in (tmp_path / "out" / "sweep.md").read_text()


def test_a_missing_fuser_without_training_is_an_error_naming_the_fix(tmp_path, toy_registries):
    sweep = toy_sweep(tmp_path, {"residual": str(tmp_path / "empty")}, routes=["c2c.residual"], query_modes=["original"])
    with pytest.raises(MissingFuserError, match="fedrefine fit"):
        sweep.run(command="test")
    with pytest.raises(ValueError, match="registries.concat"):
        toy_sweep(tmp_path, {}, routes=["c2c.concat"], query_modes=["original"]).run(command="test")


def test_a_sweep_weighs_its_senders_through_the_named_gate_and_trains_a_missing_one(tmp_path, toy_registries, monkeypatch):
    from fedrefine.bench.fuser_training import GateTraining
    from fedrefine.fusion import SenderStateGate

    fit_calls = []

    def fit(self, mode, registry, export_dir):  # what `fedrefine fit` with the federation config would export
        fit_calls.append((mode, Path(registry), Path(export_dir)))
        fusers = list(sweep.federation.receiver("receiver", ["llama", "qwen2"], registry=FuserRegistry(registry)).fusers)
        gate = SenderStateGate(fusers, hidden_size=4)
        for reader in gate.readers:
            torch.nn.init.constant_(reader[-1].bias, -60.0)  # every sender weighed 0: C2C is the receiver alone
        return gate.save(export_dir, fusers)

    monkeypatch.setattr(GateTraining, "fit", fit)
    gate_dir = tmp_path / "gate"
    settings = dict(routes=["c2c.residual"], query_modes=["original"], subsets=[["llama", "qwen2"]], singles=False)
    with pytest.raises(FileNotFoundError, match=r"holds no gating network.*train_missing_gate"):
        toy_sweep(tmp_path, toy_registries, gates={"residual": str(gate_dir)}, **settings).run(command="test")
    sweep = toy_sweep(tmp_path, toy_registries, gates={"residual": str(gate_dir)},
                      train_missing_gate=GateTraining(config="unused.yaml"), **settings)
    rows = sweep.run(command="test")
    assert fit_calls == [("residual", Path(toy_registries["residual"]), gate_dir)]
    assert isinstance(sweep.model("residual").source_gate, SenderStateGate)
    alone, both = rows
    assert both["key"] == "c2c.residual:llama+qwen2" and both["accuracy"] == alone["accuracy"]  # closed gate: no change
    with pytest.raises(ValueError, match=r"gates names fusion modes \['concat'\] without a registry"):
        toy_sweep(tmp_path, {"residual": toy_registries["residual"]}, gates={"concat": str(gate_dir)})


def test_lone_senders_fuse_pairwise_past_the_gate_when_gate_singles_is_off(tmp_path, toy_registries):
    from fedrefine.fusion import SenderStateGate

    fusers = list(toy_sweep(tmp_path, toy_registries).federation.receiver(
        "receiver", ["llama", "qwen2"], registry=FuserRegistry(toy_registries["residual"])).fusers)
    gate = SenderStateGate(fusers, hidden_size=4)
    for reader in gate.readers:
        torch.nn.init.constant_(reader[-1].bias, -60.0)  # every sender weighed 0: a gated cell is the receiver alone
    gate.save(tmp_path / "gate", fusers)
    settings = dict(routes=["c2c.residual"], query_modes=["original"], subsets=[["llama", "qwen2"]], num_questions=8)
    runs = {
        name: toy_sweep(tmp_path, toy_registries, output_dir=str(tmp_path / name), **settings, **extra)
        for name, extra in [("ungated", {}), ("gated", {"gates": {"residual": str(tmp_path / "gate")}}),
                            ("pairwise", {"gates": {"residual": str(tmp_path / "gate")}, "gate_singles": False})]
    }
    rows = {name: {r["key"]: r for r in sweep.run(command="test")} for name, sweep in runs.items()}
    alone = rows["ungated"]["receiver"]["accuracy"]
    for single in ("c2c.residual:llama", "c2c.residual:qwen2"):
        assert rows["gated"][single]["gated"] is True and rows["gated"][single]["accuracy"] == alone
        assert rows["pairwise"][single]["gated"] is False
        assert rows["pairwise"][single]["accuracy"] == rows["ungated"][single]["accuracy"]  # the fuser alone
        assert "gated" not in rows["ungated"][single]
    both = "c2c.residual:llama+qwen2"
    assert rows["pairwise"][both]["gated"] is True and rows["pairwise"][both]["accuracy"] == alone
    assert runs["pairwise"].model("residual", gated=False).source_gate is None
    prints = {name: sweep.fusion.fingerprints(["residual"])["residual"] for name, sweep in runs.items()}
    assert len(set(prints.values())) == 3  # a results file of one never resumes as another
    table = (tmp_path / "pairwise" / "sweep.md").read_text()
    assert "| c2c.residual (pairwise) | original | llama |" in table and "gate_singles: false" in table


def test_gate_training_runs_fedrefine_fit_over_the_sweeps_registry(tmp_path, monkeypatch):
    from fedrefine.bench import fuser_training

    calls = []
    monkeypatch.setattr(fuser_training, "build_cli", lambda args: calls.append(args))
    training = fuser_training.GateTraining(config="federation.yaml", args=["--trainer.max_steps", "5"], root=str(tmp_path))
    assert training.fit("residual", Path("reg"), Path("gate")) == Path("gate")
    (args,) = calls
    assert args[:5] == ["fit", "--config", "federation.yaml", "--trainer.max_steps", "5"]
    assert args[args.index("--model.registry") + 1] == "reg" and args[args.index("--model.export_dir") + 1] == "gate"
    fusers = fuser_training.FuserTraining(config="pair.yaml", mode_args={"concat": ["--model.fuser.fuse_at", "prompt"]})
    fusers.fit("llama", "concat")
    fusers.fit("llama", "residual")
    assert calls[1][3:5] == ["--model.fuser.fuse_at", "prompt"] and "--model.fuser.fuse_at" not in calls[2]


def test_results_reach_an_offline_wandb_run_as_a_table_and_images(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    from fedrefine.bench.sweep_report import log_to, plot_accuracy_vs_senders

    rows = [
        {"key": "receiver", "route": "receiver", "query_mode": "original", "senders": "", "n_senders": 0,
         "status": "ok", "accuracy": 0.25, "leakage_overlap": None},
        {"key": "t2t:a@shared", "route": "t2t", "query_mode": "shared", "senders": "a", "n_senders": 1,
         "status": "ok", "accuracy": 0.5, "leakage_overlap": 0.1, "sender_bytes_per_token": {"a": 4.0}},
        {"key": "c2c.residual:a@private", "route": "c2c.residual", "query_mode": "private", "senders": "a",
         "n_senders": 1, "status": "unsupported", "reason": "no"},
    ]
    image = tmp_path / "fig3a.png"
    plot_accuracy_vs_senders(rows, image)
    logger = WandbLogger(project="fedrefine-test", offline=True, save_dir=str(tmp_path))
    log_to(logger, "sweep", rows, {"fig3a": image, "fig3b": image, "fig3c": image})
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))


def test_a_sweep_may_add_one_adaptive_cell_over_every_sender_on_original_queries():
    cells = expand_cells(["a", "b"], routes=["c2c.residual", "adaptive"], query_modes=["original", "private"])
    adaptive = [c for c in cells if c.kind == "adaptive"]
    assert [str(c) for c in adaptive] == ["adaptive:a+b"]
    assert "adaptive" not in ROUTES  # the default sweep needs no profile


def test_kv_bytes_with_a_codec_measures_serialised_messages(capsys):
    from fedrefine.bench.kv_bytes import main

    main(["--codec", "int4"])
    int4 = capsys.readouterr().out
    main([])
    bf16 = capsys.readouterr().out
    assert "int4 wire format, header included" in int4
    total = {name: int(next(line for line in out.splitlines() if line.startswith("all 4")).split()[3].replace(",", ""))
             for name, out in (("int4", int4), ("bf16", bf16))}
    assert total["bf16"] == 86_016 and total["int4"] <= 22_528 < total["bf16"] // 3


def test_git_commit_is_dirty_for_changed_code_but_not_for_written_results(tmp_path, monkeypatch):
    from fedrefine.bench.records import git_commit

    monkeypatch.chdir(tmp_path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "a.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "start"], check=True)
    clean = git_commit()
    assert clean and not clean.endswith("+dirty")
    (tmp_path / "benchmarks" / "results" / "a.json").write_text('{"b": 1}')  # an earlier benchmark's results
    assert git_commit() == clean
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_commit() == clean + "+dirty"


def test_the_recorded_command_quotes_arguments_with_spaces(monkeypatch):
    import shlex

    from fedrefine.bench.records import script_command

    argv = ["benchmarks/x.py", "--override=--model.evaluation.test_routes=[receiver, c2c]", "--steps", "3"]
    monkeypatch.setattr("sys.argv", argv)
    assert shlex.split(script_command()) == ["python", *argv]
