"""Federation on the toy world: receiver alone, each single sender, and all four senders, in both fusion modes.

    python benchmarks/toyworld_federation.py [--steps 300]

Trains (or reuses) one fuser per sender and mode with configs/toyworld_reference.yaml (seed 0; the C2C reference positions), stores
them in a registry, and tests a FederationModule on the held-out entities of all four private groups
(each sender knows one group). Writes benchmarks/results/toyworld_federation.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L

from fedrefine.bench.records import git_commit, markdown_table, script_command, write_results
from fedrefine.evaluation import EvaluationConfig
from fedrefine.fuser import Fuser
from fedrefine.fuser.registry import FuserRegistry
from fedrefine.recipes import FederationModule
from fedrefine.recipes.trainer_cli import build_cli
from fedrefine.toyworld import DEFAULT_PARTICIPANTS
from fedrefine.toyworld.lightning import ToyParticipant, ToyWorldDataModule

#: Short name -> (toy participant, the private group it knows), e.g. "llama" -> ("llama-sender", 0).
SENDERS = {c.name.removesuffix("-sender"): (c.name, c.private_groups[0]) for c in DEFAULT_PARTICIPANTS if c.private_groups}


def train_fuser(sender: str, group: int, mode: str, steps: int, root: Path,
                config: str = "configs/toyworld_reference.yaml") -> Path:
    """The pairwise fuser sender -> receiver of ``config`` (seed 0), trained once into ``root`` (one directory per
    step count: a fuser trained for other steps is never reused)."""
    directory = root / f"{mode}-{sender}" if steps == 300 else root / f"{mode}-{sender}-{steps}steps"
    if not (directory / "fuser" / "fuser.json").is_file():
        build_cli([
            "fit", "--config", config, "--seed_everything", "0",
            "--model.sender.init_args.name", sender, "--data.group", str(group), "--model.fuser.mode", mode,
            "--trainer.default_root_dir", str(directory), "--trainer.logger", "false", "--trainer.callbacks", "[]",
            "--trainer.enable_progress_bar", "false", "--model.export_dir", str(directory / "fuser"),
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
        ])
    return directory / "fuser"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--root", default="runs/benchmarks/toyworld_federation")
    parser.add_argument("--out", default="benchmarks/results/toyworld_federation")
    args = parser.parse_args()
    root = Path(args.root)
    sources = {"receiver": ToyParticipant("receiver"), **{n: ToyParticipant(s) for n, (s, _) in SENDERS.items()}}
    loaded = {name: source.load() for name, source in sources.items()}
    rows = []
    for mode in ("residual", "concat"):
        registry = FuserRegistry(root / f"registry-{mode}")
        for name, (sender, group) in SENDERS.items():
            path = train_fuser(sender, group, mode, args.steps, root)
            registry.save(Fuser.load(path, loaded[name].identity, loaded["receiver"].identity))
        module = FederationModule(
            sources, "receiver", list(SENDERS), str(registry.root),
            evaluation=EvaluationConfig(answer_mode="cloze", test_routes=["receiver", *(f"c2c:{name}" for name in SENDERS), "c2c"]),
        )
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                            default_root_dir=root / f"test-{mode}")
        trainer.test(module, ToyWorldDataModule(test_split="all_held_out"))
        for row in module.results():
            rows.append({"mode": mode, "route": row["route"], "senders": row["senders"] or "-",
                         "n_senders": len(row["senders"].split("+")) if row["senders"] else 0,
                         "accuracy": row["accuracy"], "ci_low": row["ci_low"], "ci_high": row["ci_high"],
                         "questions": row["questions"], "bytes_per_token": row["bytes_per_token"]})
    command, commit = script_command(), git_commit()
    table = [[r["mode"], r["route"], r["senders"], f"{100 * r['accuracy']:.1f}%",
              f"{100 * r['ci_low']:.0f}-{100 * r['ci_high']:.0f}%", f"{r['bytes_per_token']:.0f}"] for r in rows]
    lines = ["# Toy world federation: held-out entities of all four private groups", "",
             f"Command: `{command}` at commit `{commit}`. Each sender knows one of the four groups, so one sender "
             "can lift at most a quarter of the questions; fusers were trained pairwise (seed 0) and combined "
             "in parallel (residual) or stacked (concat), without a gating network.", "",
             *markdown_table(["mode", "route", "senders", "accuracy", "95% CI", "bytes/token"], table)]
    write_results(args.out, {"command": command, "commit": commit, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
