import json
from pathlib import Path

import pytest
import yaml

from fedrefine.recipes.trainer_cli import build_cli

CONFIGS = sorted(p for p in Path(__file__).parent.parent.glob("configs/**/*.yaml") if p.parent.name not in ("serve", "bench"))
SERVE_CONFIGS = sorted(Path(__file__).parent.parent.glob("configs/serve/*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_against_the_cli(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["class_path"].startswith("fedrefine.recipes.")
    sources = [v for v in resolved["model"]["init_args"].values() if isinstance(v, dict) and "class_path" in v]
    sources += [v for v in (resolved["model"]["init_args"].get("participants") or {}).values()]
    assert sources and all(s["class_path"].startswith("fedrefine.") for s in sources)


@pytest.mark.parametrize("config", SERVE_CONFIGS, ids=lambda p: p.name)
def test_every_served_participant_config_parses(config):
    from fedrefine.runtime.participant_server import config_parser, instantiate

    parser = config_parser()
    init = instantiate(parser, parser.parse_args(["--config", str(config)]))
    assert type(init.participant).__module__.startswith("fedrefine.") and init.limits.max_batch > 0


def test_fedrefine_serve_explains_its_services(capsys):
    from fedrefine.runtime.serve_cli import main as serve_main

    with pytest.raises(SystemExit) as exit_info:
        serve_main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "participant" in out and "registry" in out
    with pytest.raises(SystemExit) as exit_info:
        serve_main(["nonsense"])
    assert exit_info.value.code == 2


def test_configs_exist_for_the_design_pairs():
    names = {p.name for p in CONFIGS}
    assert {"qwen3_llama.yaml", "qwen3_qwen25.yaml", "tiny.yaml"} <= names


def test_tiny_fit_test_and_predict_from_the_command_line(tmp_path, capsys):
    root = tmp_path / "run"
    common = ["--config", "configs/tiny.yaml", "--trainer.default_root_dir", str(root),
              "--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false"]
    build_cli(["fit", *common, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
               "--model.export_dir", str(root / "fuser")])
    assert (root / "fuser" / "fuser.json").is_file()
    build_cli(["test", *common, "--model.fuser_path", str(root / "fuser")])
    results = json.loads((root / "test_results.json").read_text())
    assert [r["route"] for r in results["rows"]] == ["receiver", "sender", "c2c"]
    assert all(r["questions"] == 12 for r in results["rows"])
    capsys.readouterr()
    build_cli(["predict", *common, "--model.fuser_path", str(root / "fuser"), "--model.evaluation.max_new_tokens", "3",
               "--data.predict_prompts", "[What conducts heat?]"])
    assert "What conducts heat?" in capsys.readouterr().out


def test_config_fields_carry_help_that_the_cli_shows():
    import dataclasses

    from jsonargparse import ArgumentParser

    from fedrefine.evaluation import EvaluationConfig
    from fedrefine.fuser import FuserConfig
    from fedrefine.settings import documented

    for config in (FuserConfig, EvaluationConfig):
        assert all(f.metadata["help"] for f in dataclasses.fields(config))
    parser = ArgumentParser()
    parser.add_class_arguments(FuserConfig, "fuser")
    assert "which receiver tokens are fused" in parser.format_help()

    @dataclasses.dataclass
    class Undocumented:
        size: int = 1

    with pytest.raises(TypeError, match=r"\['size'\]"):
        documented(Undocumented)


def run_main(monkeypatch, *argv):
    from fedrefine.cli import main

    monkeypatch.setattr("sys.argv", ["fedrefine", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code


def test_help_lists_every_subcommand(monkeypatch, capsys):
    from lightning.pytorch.cli import LightningCLI

    assert run_main(monkeypatch, "--help") == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert listed == set(LightningCLI.subcommands()) | {"bench", "kv-bytes", "serve", "eval-harness", "import-c2c"}
    assert run_main(monkeypatch) == 2  # no subcommand: the same overview, as an error


def test_fit_without_training_rows_fails_at_once_with_one_line(monkeypatch, capsys, tmp_path):
    code = run_main(monkeypatch, "fit", "--config", "configs/tiny.yaml", "--data.train_samples", "0",
                    "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false")
    err = capsys.readouterr().err
    assert code == 2 and "fedrefine: error: data.train_samples=0 leaves no training rows" in err
    assert "Traceback" not in err


def test_a_failed_load_shows_its_message_not_a_config_dump(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = run_main(monkeypatch, "test", "--config", "configs/qwen3_llama.yaml")
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("fedrefine: error: Cannot load 'Qwen/Qwen3-0.6B'")
    assert "Namespace(" not in err and "Traceback" not in err


def test_runs_print_no_product_tips_or_lightning_deprecations(tmp_path, capfd, recwarn):
    build_cli(["fit", "--config", "configs/tiny.yaml", "--trainer.default_root_dir", str(tmp_path),
               "--trainer.logger", "false", "--trainer.max_steps", "1", "--model.export_dir", str(tmp_path / "fuser")])
    out, err = capfd.readouterr()
    assert "Tip:" not in out + err and "litlogger" not in out + err
    assert "/-2" not in out + err  # the progress bar of a step-bounded run
    assert not [w for w in recwarn if "LeafSpec" in str(w.message)]


def test_a_test_that_fails_mid_run_leaves_no_wandb_run_and_refuses_to_overwrite_results(tmp_path, monkeypatch, capsys):
    from fedrefine.recipes import FusionModule

    monkeypatch.setenv("WANDB_MODE", "offline")
    root = tmp_path / "run"
    quick = ["--config", "configs/tiny.yaml", "--trainer.default_root_dir", str(root), "--trainer.callbacks", "[]",
             "--trainer.enable_progress_bar", "false", "--data.num_questions", "4"]
    build_cli(["fit", *quick, "--trainer.max_steps", "1", "--trainer.val_check_interval", "1", "--trainer.logger", "false"])
    wandb = ["--trainer.logger", json.dumps({"class_path": "lightning.pytorch.loggers.WandbLogger",
                                             "init_args": {"offline": True, "project": "fedrefine-test"}})]

    def broken(self, batch, batch_idx):
        raise RuntimeError("a broken step")

    monkeypatch.setattr(FusionModule, "test_step", broken)
    with pytest.raises(RuntimeError, match="a broken step"):
        build_cli(["test", "--config", str(root / "config.yaml"), *wandb])
    assert not list(root.glob("wandb/offline-run-*")) and (root / "test_config.yaml").is_file()
    monkeypatch.undo()
    monkeypatch.setenv("WANDB_MODE", "offline")
    build_cli(["test", "--config", str(root / "config.yaml"), *wandb])
    assert len(list(root.glob("wandb/offline-run-*"))) == 1 and (root / "test_results.json").is_file()
    assert run_main(monkeypatch, "test", "--config", str(root / "config.yaml")) == 2
    assert "holds an earlier test's results; pass --overwrite true" in capsys.readouterr().err
