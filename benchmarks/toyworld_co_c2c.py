"""Bidirectional Co-C2C on the toy world: both directions of a pair from one training run.

    python benchmarks/toyworld_co_c2c.py [--pairs receiver:llama-sender llama-sender:qwen2-sender] [--steps 300]

For each pair ``first:second``, ``fedrefine fit`` (configs/toyworld_co_c2c.yaml, seed 0) trains
F[second -> first] and F[first -> second] together on the fuser-train entities of every private
group either participant knows; then ``fedrefine test`` scores each direction on the held-out
entities of the group its sender knows (the receiver's own group if the sender knows none):
receiver alone, sender alone, C2C and the two controls. Writes benchmarks/results/toyworld_co_c2c.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch
from toyworld import ROUTES as PAIR_ROUTES

from fedrefine.bench.records import git_commit, script_command, write_results
from fedrefine.recipes.trainer_cli import build_cli
from fedrefine.toyworld import DEFAULT_PARTICIPANTS
from fedrefine.toyworld.lightning import ToyParticipant

ROUTES = {name: route for name, route in PAIR_ROUTES.items() if name != "probe_reordered_options"}
GROUPS = {p.name: list(p.private_groups) for p in DEFAULT_PARTICIPANTS}


@functools.cache
def parameters(name: str) -> int:
    return sum(p.numel() for p in ToyParticipant(name).load().model.parameters())


def run_pair(first: str, second: str, steps: int, root: Path) -> list[dict]:
    """Fit one Co-C2C pair (reused if its registry is complete) and test both directions."""
    directory = root / f"{first}+{second}"
    train_groups = sorted({*GROUPS[first], *GROUPS[second]})
    common = [
        "--config", "configs/toyworld_co_c2c.yaml", "--seed_everything", "0",
        "--model.first.init_args.name", first, "--model.second.init_args.name", second,
        "--model.registry", str(directory / "registry"), "--data.train_groups", json.dumps(train_groups),
        "--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
    ]
    seconds = None
    if len(list((directory / "registry").glob("*/fuser.json"))) < 2:
        started = time.perf_counter()
        build_cli(["fit", *common, "--trainer.default_root_dir", str(directory / "fit"), "--data.group", str(train_groups[0]),
                   "--trainer.enable_checkpointing", "false",
                   "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps)])
        seconds = round(time.perf_counter() - started, 1)
    rows = []
    for role, receiver, sender in (("first", first, second), ("second", second, first)):
        group = (GROUPS[sender] or GROUPS[receiver])[0]
        test_dir = directory / f"test-{receiver}"
        build_cli(["test", *common, "--model.from_registry", "true", "--model.eval_receiver", role,
                   "--data.group", str(group), "--trainer.default_root_dir", str(test_dir)])
        results = {row["route"]: row for row in json.loads((test_dir / "test_results.json").read_text())["rows"]}
        rows.append({
            "pair": f"{first} <-> {second}",
            "receiver": receiver,
            "sender": sender,
            "receiver_params": parameters(receiver),
            "sender_params": parameters(sender),
            "test_group": group,
            "fuser_steps": steps,
            "fit_seconds": seconds,
            "questions": results["c2c"]["questions"],
            **{name: results[route]["accuracy"] for name, route in ROUTES.items()},
        })
    return rows


def markdown(rows: list[dict], command: str, commit: str) -> str:
    header = ["receiver (params)", "sender (params)", "test group", *ROUTES, "c2c gain"]
    lines = [
        "# Toy world Co-C2C: both directions of a pair from one training run",
        "",
        f"Command: `{command}` at commit `{commit}` (CPU, {torch.get_num_threads()} threads). "
        "One `fedrefine fit` per pair trains both fusers (losses summed, seed 0); each direction is tested on "
        "the held-out entities of the private group its sender knows (the receiver's own group when the sender "
        "knows none), cloze scoring, 4 options, every fact asked with its answer at each of A-D. "
        "`receiver` is the smallest model and knows only the public entities; params count each model's weights.",
        "",
        "| pair | " + " | ".join(header) + " | questions | fit s |",
        "|" + "---|" * (len(header) + 3),
    ]
    for r in rows:
        values = [r["pair"], f"{r['receiver']} ({r['receiver_params'] / 1e3:.0f}k)", f"{r['sender']} ({r['sender_params'] / 1e3:.0f}k)",
                  r["test_group"],
                  *(f"{100 * r[k]:.1f}%" for k in ROUTES), f"{100 * (r['c2c'] - r['receiver_alone']):+.1f}",
                  r["questions"], r["fit_seconds"] if r["fit_seconds"] is not None else "reused"]
        lines.append("| " + " | ".join(str(v) for v in values) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["receiver:llama-sender", "llama-sender:qwen2-sender"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--root", default="runs/benchmarks/toyworld_co_c2c")
    parser.add_argument("--out", default="benchmarks/results/toyworld_co_c2c")
    args = parser.parse_args()
    rows = [row for pair in args.pairs for row in run_pair(*pair.split(":"), args.steps, Path(args.root))]
    command, commit = script_command(), git_commit()
    write_results(args.out, {"command": command, "commit": commit, "runs": rows}, markdown(rows, command, commit))


if __name__ == "__main__":
    main()
