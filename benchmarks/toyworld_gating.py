"""A gating network on the toy world: can the receiver hear all four senders without losing to the best one?

    python benchmarks/toyworld_gating.py [--steps 300] [--variants gate gate+fusers]
    python benchmarks/toyworld_gating.py --recipe last --variants ungated gate gate:senders --split all_val

Reuses (or trains) the pairwise residual fusers of the recipe (``reference``: the C2C reference's
positions, benchmarks/toyworld_federation.py's fusers and configs/toyworld_federation.yaml; ``last``:
configs/toyworld.yaml's answer prefix and last-token fusion, configs/toyworld_federation_gated.yaml),
then for each variant ``fedrefine fit`` trains the receiver's gating network, with the fusers frozen
(``gate``: reading the receiver's prompt; ``gate:senders``: reading what each sender sent; ``gate:benefit``:
the same, taught per sample whether each sender alone helped) or jointly
(``gate+fusers``; ``fusers``: joint training without a gate, the ablation), on questions about the
fuser-train entities of all four private groups with a random non-empty sender subset per batch, and
``fedrefine test`` scores receiver alone, each single sender and all senders on the held-out
entities of all groups (``--split all_val``: their development entities, to choose a variant on). The
ungated federation is tested on the same questions as reference.
Writes benchmarks/results/toyworld_gating.{json,md} (the reference recipe) or toyworld_gating_last.*.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml
from toyworld_federation import SENDERS, train_fuser

from fedrefine.bench.records import git_commit, markdown_table, script_command, write_results
from fedrefine.fuser import Fuser
from fedrefine.fuser.registry import FuserRegistry
from fedrefine.recipes.trainer_cli import build_cli
from fedrefine.toyworld.lightning import ToyParticipant

VARIANTS = {  # name -> (gating network reading what (None: no gate), its objective, train the fusers jointly; None: no fit)
    "ungated": (None, "answer", None),
    "gate": ("prompt", "answer", False),
    "gate:senders": ("senders", "answer", False),
    "gate:benefit": ("senders", "benefit", False),
    "gate+fusers": ("prompt", "answer", True),
    "fusers": (None, "answer", True),  # ablation: the joint training without a gate
}
#: recipe -> (the pairwise fusers' config, the federation's config)
RECIPES = {
    "reference": ("configs/toyworld_reference.yaml", "configs/toyworld_federation.yaml"),
    "last": ("configs/toyworld.yaml", "configs/toyworld_federation_gated.yaml"),
}


def build_registry(recipe: str, steps: int, fuser_root: Path, root: Path) -> Path:
    """A fresh registry of the recipe's pairwise residual fusers (joint training writes into its own copy)."""
    loaded = {name: ToyParticipant(sender).load() for name, sender in [("receiver", "receiver"), *((n, s) for n, (s, _) in SENDERS.items())]}
    registry = FuserRegistry(root)
    for name, (sender, group) in SENDERS.items():
        trained = train_fuser(sender, group, "residual", steps, fuser_root / recipe if recipe != "reference" else fuser_root,
                              RECIPES[recipe][0])
        registry.save(Fuser.load(trained, loaded[name].identity, loaded["receiver"].identity))
    return registry.root


def run(recipe: str, variant: str, steps: int, fit_steps: int | None, split: str, extra: list[str], fuser_root: Path,
        root: Path) -> list[dict]:
    """Fit (unless ungated) and test one variant; ``fit_steps`` None: the federation config's ``max_steps``."""
    fit_steps = fit_steps or yaml.safe_load(Path(RECIPES[recipe][1]).read_text())["trainer"]["max_steps"]
    directory = root / recipe / variant
    shutil.rmtree(directory, ignore_errors=True)
    registry = build_registry(recipe, steps, fuser_root, directory / "registry")
    common = ["--config", RECIPES[recipe][1], "--model.registry", str(registry),
              "--model.export_dir", str(directory / "gate"), "--trainer.default_root_dir", str(directory),
              "--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
              "--data.test_split", split, *extra]
    reads, objective, train_fusers = VARIANTS[variant]
    gating = reads is not None
    common += ["--model.gating", str(gating).lower()]
    common += ["--model.gate_reads", reads, "--model.gate_objective", objective] if gating else []
    seconds = None
    if train_fusers is not None:
        started = time.perf_counter()
        build_cli(["fit", *common, "--model.train_fusers", str(train_fusers).lower(), "--trainer.enable_checkpointing",
                   "false", "--trainer.max_steps", str(fit_steps), "--trainer.val_check_interval", str(fit_steps)])
        seconds = round(time.perf_counter() - started, 1)
        if gating:
            common += ["--model.gate_path", str(directory / "gate")]
    build_cli(["test", *common])
    results = json.loads((directory / "test_results.json").read_text())["rows"]
    return [{"variant": variant, "route": r["route"], "senders": r["senders"] or "-", "accuracy": r["accuracy"],
             "ci_low": r["ci_low"], "ci_high": r["ci_high"], "questions": r["questions"],
             "private_tokens_leaked": r.get("leakage_private_tokens"),
             "fit_steps": fit_steps if seconds is not None else 0, "fit_seconds": seconds} for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="steps of each pairwise fuser")
    parser.add_argument("--fit-steps", type=int, default=None, help="gate training steps (default: the config's max_steps)")
    parser.add_argument("--variants", nargs="+", default=["ungated", "gate", "gate+fusers", "fusers"], choices=list(VARIANTS))
    parser.add_argument("--recipe", default="reference", choices=list(RECIPES))
    parser.add_argument("--split", default="all_held_out", choices=["all_held_out", "all_val"],
                        help="the questions scored: every group's held-out entities, or their development ones")
    parser.add_argument("--override", action="append", default=[],
                        help="an extra fedrefine override (repeat the flag for more), e.g. --override=--model.learning_rate=3e-3")
    parser.add_argument("--fuser-root", default="runs/benchmarks/toyworld_federation")
    parser.add_argument("--root", default="runs/benchmarks/toyworld_gating")
    parser.add_argument("--out", default=None, help="default benchmarks/results/toyworld_gating[_<recipe>][_<split>]")
    args = parser.parse_args()
    out = args.out or "benchmarks/results/toyworld_gating" + "".join(
        f"_{part}" for part, default in ((args.recipe, "reference"), (args.split, "all_held_out")) if part != default)
    command, commit = script_command(), git_commit()  # before the runs: the tree may change while they go
    rows = [row for variant in args.variants
            for row in run(args.recipe, variant, args.steps, args.fit_steps, args.split, args.override,
                           Path(args.fuser_root), Path(args.root))]
    table = [[r["variant"], r["route"], r["senders"], f"{100 * r['accuracy']:.1f}%",
              f"{100 * r['ci_low']:.0f}-{100 * r['ci_high']:.0f}%", r["fit_steps"],
              "" if r.get("private_tokens_leaked") is None else f"{100 * r['private_tokens_leaked']:.1f}%"] for r in rows]
    entities = {"all_held_out": "held-out", "all_val": "development"}[args.split]
    lines = [f"# Toy world gating network: {entities} entities of all four private groups", "",
             f"Command: `{command}` at commit `{commit}`. Residual fusion, pairwise fusers of {RECIPES[args.recipe][0]} "
             f"(seed 0, {args.steps} steps each), federation {RECIPES[args.recipe][1]}. `gate`: the receiver's gating network, reading its "
             "prompt, trained with the fusers frozen; `gate:senders`: a gating network reading what each sender sent "
             "(its values at the column the receiver's last prompt token reads), fusers frozen; `gate:benefit`: the same "
             "gate taught, per sample, whether each sender fused alone lowered the receiver's loss; `gate+fusers`: gate "
             "and fusers trained jointly; `fusers`: the fusers trained the same way without a gate (ablation); all on "
             "questions about fuser-train entities of all four groups, a random non-empty sender subset per batch. "
             "With a gate every route (single senders too) goes through it.", "",
             "A route `@private` keeps the user's question from the senders: each reads the receiver's rephrasing; "
             "`private tokens leaked` is the share of the private preambles' tokens (`--data.preamble_fraction`) that "
             "reached a sender.", "",
             *markdown_table(["variant", "route", "senders", "accuracy", "95% CI", "fit steps", "private tokens leaked"], table)]
    write_results(out, {"command": command, "commit": commit, "recipe": args.recipe, "split": args.split,
                        "fuser_steps": args.steps, "rows": rows},
                  "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
