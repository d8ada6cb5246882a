"""The toy main command in bf16 beside fp32: is every route's accuracy within 1 point? (issue 37, part 2)

    python benchmarks/bf16_toy.py [--senders llama-sender ...] [--precisions 32-true bf16-true bf16-mixed]

For each sender (default: the main command's, ``llama-sender``), the fuser is trained once in fp32 as
``fedrefine-toy`` trains it (``fedrefine fit --config configs/toyworld.yaml``, 300 steps; reused when the run root
already holds it), then ``fedrefine test`` scores the main command's test routes on its own test split (the
held-out entities of the sender's private group) once per precision: ``--trainer.precision 32-true``, ``bf16-true``
(participants and the fp32-trained fuser cast to bf16 weights) and ``bf16-mixed`` (participants in bf16, the fuser
in fp32, under autocast). Same fuser, same questions, same command; only ``trainer.precision`` differs. Writes
``<out>.json`` and ``<out>.md`` (default benchmarks/results/bf16_toy) with per-route accuracy, the difference from
fp32 in points, the bar (within 1 point on every route) and each test's seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from fedrefine.bench.records import git_commit, markdown_table, script_command, write_results
from fedrefine.recipes.trainer_cli import build_cli
from fedrefine.toyworld import DEFAULT_PARTICIPANTS

#: The main command's test routes (configs/toyworld.yaml), by the names the results use.
ROUTES = ("receiver", "sender", "c2c", "c2c_mismatched", "c2c_random_kv", "c2c_reordered")
#: The bar: every route within this many points of fp32.
BAR_POINTS = 1.0
QUIET = ["--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false"]


def fit_once(config: str, sender: str, root: Path, steps: int) -> tuple[Path, float | None]:
    """The sender's fuser, trained in fp32 as the main command trains it (None seconds: reused)."""
    fuser = root / "fuser"
    if (fuser / "fuser.json").is_file():
        return fuser, None
    started = time.perf_counter()
    build_cli(["fit", "--config", config, *common(sender, root), "--trainer.precision", "32-true",
               "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps), "--overwrite", "true"])
    return fuser, round(time.perf_counter() - started, 1)


def common(sender: str, root: Path) -> list[str]:
    group = next(p.private_groups[0] for p in DEFAULT_PARTICIPANTS if p.name == sender)
    return ["--model.sender.init_args.name", sender, "--data.group", str(group), "--data.data_dir", str(root / "data"),
            "--trainer.default_root_dir", str(root), "--model.export_dir", str(root / "fuser"), *QUIET]


def test_at(config: str, sender: str, root: Path, fuser: Path, precision: str) -> dict:
    """``fedrefine test`` of the fitted fuser at ``precision``: accuracy per route, questions, seconds."""
    directory = root / f"test-{precision}"
    started = time.perf_counter()
    build_cli(["test", "--config", config, *common(sender, root), "--trainer.default_root_dir", str(directory),
               "--trainer.precision", precision, "--model.fuser_path", str(fuser), "--overwrite", "true"])
    seconds = time.perf_counter() - started
    rows = {row["route"]: row for row in json.loads((directory / "test_results.json").read_text())["rows"]}
    return {"seconds": round(seconds, 1), "questions": rows["c2c"]["questions"],
            "accuracy": {route: rows[route]["accuracy"] for route in ROUTES},
            "failed": {route: rows[route]["failed"] for route in ROUTES}}


def compare(runs: dict[str, dict], baseline: str) -> dict[str, dict[str, float]]:
    """Points each precision differs from ``baseline`` on each route."""
    base = runs[baseline]["accuracy"]
    return {p: {r: round(100 * (run["accuracy"][r] - base[r]), 2) for r in ROUTES} for p, run in runs.items() if p != baseline}


def markdown(payload: dict) -> str:
    lines = [
        "# The toy main command in bf16 beside fp32", "",
        f"Command: `{payload['command']}` at commit `{payload['commit']}`; machine: {payload['machine']}.",
        "The main command (`fedrefine-toy`, configs/toyworld.yaml): one fuser per sender trained in fp32 (300 steps), "
        "then `fedrefine test` on the main command's own test split (held-out entities of the sender's private group; "
        "cloze, four options) with only `--trainer.precision` changed: `bf16-true` casts the participants and the "
        "fp32-trained fuser to bf16, `bf16-mixed` keeps the fuser in fp32 under bf16 autocast with bf16 participants.",
        "",
    ]
    for sender, result in payload["senders"].items():
        runs, baseline = result["runs"], payload["baseline"]
        header = ["route", *(f"{p}" for p in runs), *(f"{p} - {baseline} (points)" for p in result["difference"])]
        rows = [[route, *(f"{100 * run['accuracy'][route]:.2f}%" for run in runs.values()),
                 *(f"{d[route]:+.2f}" for d in result["difference"].values())] for route in ROUTES]
        rows.append(["test seconds", *(run["seconds"] for run in runs.values()), *([""] * len(result["difference"]))])
        questions = runs[baseline]["questions"]
        lines += [f"## {sender} -> receiver ({questions} questions)", "", *markdown_table(header, rows), ""]
    lines += ["Bar:", ""] + [f"- [{'x' if ok else ' '}] {name}" for name, ok in payload["bars"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", nargs="+", default=["llama-sender"], help="default: the main command's sender")
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-true", "bf16-mixed"],
                        help="the first is the baseline the others are compared with")
    parser.add_argument("--steps", type=int, default=300, help="fuser training steps (the main command's: 300)")
    parser.add_argument("--config", default="configs/toyworld.yaml")
    parser.add_argument("--root", default="runs/benchmarks/bf16_toy", help="run directory (a fitted fuser is reused)")
    parser.add_argument("--out", default="benchmarks/results/bf16_toy")
    args = parser.parse_args()
    baseline, senders = args.precisions[0], {}
    for sender in args.senders:
        root = Path(args.root) / sender
        fuser, fit_seconds = fit_once(args.config, sender, root, args.steps)
        runs = {p: test_at(args.config, sender, root, fuser, p) for p in args.precisions}
        senders[sender] = {"fit_seconds": fit_seconds, "runs": runs, "difference": compare(runs, baseline)}
    name = f"every route within {BAR_POINTS:g} point of {baseline} ({', '.join(args.precisions[1:])}; every sender)"
    within = all(abs(d) <= BAR_POINTS for s in senders.values() for diff in s["difference"].values() for d in diff.values())
    answered = not any(n for s in senders.values() for run in s["runs"].values() for n in run["failed"].values())
    machine = (f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads")
    payload = {"command": script_command(), "commit": git_commit(), "machine": machine, "config": args.config,
               "split": "the main command's test split (held-out entities of each sender's private group)",
               "baseline": baseline, "bar_points": BAR_POINTS, "senders": senders,
               "bars": {name: within, "every question answered at every precision (no failures)": answered}}
    write_results(args.out, payload, markdown(payload))


if __name__ == "__main__":
    main()
