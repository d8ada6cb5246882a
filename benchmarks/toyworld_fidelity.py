"""Where a pair's transfer loses fidelity, measured on the development split only (issue "Transfer fidelity").

    python benchmarks/toyworld_fidelity.py --name base --senders llama-sender qwen2-sender
    python benchmarks/toyworld_fidelity.py --name steps1000 --steps 1000
    python benchmarks/toyworld_fidelity.py --name wide512 --set model.fuser.hidden_size=512

One variant (a name, a step count and ``--set`` config overrides of configs/toyworld.yaml) per call; each call
adds its rows to ``<out>.json`` (rows of the same name, sender and seed are replaced) and rewrites ``<out>.md``
from every row, so that a study is split into short runs. Per sender and seed: ``fedrefine fit`` with a
validation every ``--eval-every`` steps (the development split: fuser-train entities held out of training;
the curve of C2C accuracy against steps), then ``fedrefine test`` on the development split with the
controls (mismatched message, random K/V, reordered options) and per-attribute C2C accuracy, and on
the entities the fuser trained on (C2C only: the train/development gap). No held-out entity is read.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from fedrefine.bench.records import git_commit, markdown_table, script_command, write_results
from fedrefine.recipes.trainer_cli import build_cli
from fedrefine.toyworld import DEFAULT_PARTICIPANTS

DEV_ROUTES = {"receiver_alone": "receiver", "c2c": "c2c", "control_mismatched": "c2c_mismatched",
              "control_random_kv": "c2c_random_kv", "probe_reordered_options": "c2c_reordered"}


def test(common: list[str], directory: Path, split: str, routes: list[str]) -> tuple[dict, list[dict]]:
    """``fedrefine test`` of the fitted fuser on ``split``: rows per route and the per-question records."""
    results = directory / f"test-{split}"
    build_cli(["test", *common, "--model.fuser_path", str(directory / "fuser"), "--data.test_split", split,
               "--model.evaluation.test_routes", json.dumps(routes), "--trainer.default_root_dir", str(results),
               "--overwrite", "true"])
    rows = {row["route"]: row for row in json.loads((results / "test_results.json").read_text())["rows"]}
    records = [json.loads(line) for line in (results / "test_samples.jsonl").read_text().splitlines()]
    return rows, records


def per_attribute(records: list[dict], route: str = "c2c") -> dict[str, float]:
    """C2C accuracy per attribute (question ids are ``<entity>-<attribute>-<label>``)."""
    tally: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        if record["route"] == route:
            tally[record["question"].split("-")[1]].append(record["correct"])
    return {attribute: sum(v) / len(v) for attribute, v in sorted(tally.items())}


def fact_spread(records: list[dict], route: str = "c2c") -> dict[str, float]:
    """How errors spread over facts (each asked four times, its answer at A-D): the share of facts answered
    right 4/4 times, and 0/4 times (a fact that never arrives, not an option slot)."""
    facts: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        if record["route"] == route:
            facts["-".join(record["question"].split("-")[:2])].append(record["correct"])
    counts = [sum(v) for v in facts.values()]
    return {"facts": len(counts), "all_right": counts.count(4) / len(counts), "none_right": counts.count(0) / len(counts)}


def curve(directory: Path) -> dict[int, float]:
    """Validation C2C accuracy by optimizer step, from the fit's CSV log."""
    points = {}
    for path in directory.glob("csv/version_*/metrics.csv"):
        for row in csv.DictReader(path.open()):
            if row.get("val/c2c/accuracy"):
                points[int(row["step"]) + 1] = float(row["val/c2c/accuracy"])
    return dict(sorted(points.items()))


def run(name: str, sender: str, seed: int, steps: int, eval_every: int, root: Path, overrides: list[str]) -> dict:
    group = next(p.private_groups[0] for p in DEFAULT_PARTICIPANTS if p.name == sender)
    directory = root / name / f"{sender}-seed{seed}"
    shutil.rmtree(directory, ignore_errors=True)  # a fresh run each call
    common = [
        "--config", "configs/toyworld.yaml", "--seed_everything", str(seed),
        "--model.sender.init_args.name", sender, "--data.group", str(group),
        "--trainer.default_root_dir", str(directory), "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
        "--model.export_dir", str(directory / "fuser"),
    ]
    for override in overrides:
        key, _, value = override.partition("=")
        common += [f"--{key}", value]
    logger = json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(directory), "name": "csv"}})
    fit = build_cli(["fit", *common, "--trainer.logger", logger, "--trainer.max_steps", str(steps),
                     "--trainer.val_check_interval", str(min(eval_every, steps))])
    fuser = fit.model.fuser
    dev, dev_records = test(common + ["--trainer.logger", "false"], directory, "val", list(DEV_ROUTES.values()))
    train, _ = test(common + ["--trainer.logger", "false"], directory, "fit", ["c2c"])
    return {
        "name": name, "sender": sender, "seed": seed, "steps": steps, "overrides": overrides,
        "fuser_parameters": sum(p.numel() for p in fuser.parameters()),
        "bytes_per_token": dev["c2c"]["bytes_per_token"],
        "dev_questions": dev["c2c"]["questions"],
        "dev_curve": curve(directory),
        **{key: dev[route]["accuracy"] for key, route in DEV_ROUTES.items()},
        "fit_entities_c2c": train["c2c"]["accuracy"],
        "dev_per_attribute": per_attribute(dev_records),
        "dev_fact_spread": fact_spread(dev_records),
    }


def markdown(rows: list[dict]) -> str:
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    main = markdown_table(
        ["variant", "sender", "seed", "steps", "fuser params", "bytes/token", "receiver", "C2C dev", "C2C fit entities",
         "mismatched", "random K/V", "reordered", "facts 4/4", "facts 0/4"],
        [[r["name"], r["sender"], r["seed"], r["steps"], f"{r['fuser_parameters']:,}", r["bytes_per_token"],
          pct(r["receiver_alone"]), pct(r["c2c"]), pct(r["fit_entities_c2c"]), pct(r["control_mismatched"]),
          pct(r["control_random_kv"]), pct(r["probe_reordered_options"]), pct(r["dev_fact_spread"]["all_right"]),
          pct(r["dev_fact_spread"]["none_right"])] for r in rows],
    )
    attributes = sorted({a for r in rows for a in r["dev_per_attribute"]})
    by_attribute = markdown_table(["variant", "sender", "seed", *attributes],
                                  [[r["name"], r["sender"], r["seed"], *(pct(r["dev_per_attribute"].get(a, 0)) for a in attributes)]
                                   for r in rows])
    curves = markdown_table(["variant", "sender", "seed", "dev C2C by step"],
                            [[r["name"], r["sender"], r["seed"], ", ".join(f"{s}: {pct(a)}" for s, a in r["dev_curve"].items())]
                             for r in rows])
    commands = sorted({f"`{r['command']}` at `{r['commit']}`" for r in rows})
    return "\n".join([
        "# Toy world transfer fidelity: development split only",
        "",
        "Accuracy in % on the development split (16 fuser-train entities per group held out of training, 64 facts, "
        "each asked with its answer at A-D: 256 questions), except `C2C fit entities`: the entities the fuser trained on. "
        "Configs/toyworld.yaml plus each variant's overrides. `facts 4/4` / `0/4`: share of facts C2C answers right at "
        "every / no option position. Held-out entities are not read.",
        "",
        *main, "", "C2C on the development split per attribute:", "", *by_attribute, "",
        "Development C2C accuracy against optimizer steps:", "", *curves, "", "Commands:", "",
        *(f"- {c}" for c in commands), "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="the variant's name in the tables")
    parser.add_argument("--senders", nargs="+", default=["llama-sender"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--root", default="runs/benchmarks/toyworld_fidelity")
    parser.add_argument("--out", default="benchmarks/results/toyworld_fidelity_dev")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command, commit = script_command(), git_commit()
    new = [{**run(args.name, sender, seed, args.steps, args.eval_every, Path(args.root), args.overrides),
            "command": command, "commit": commit, "torch_threads": torch.get_num_threads()}
           for sender in args.senders for seed in args.seeds]
    out = Path(args.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / f"{out.name}.lock", "w") as lock:  # side-by-side calls merge one at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        previous = json.loads(out.read_text())["rows"] if out.exists() else []
        keys = {(r["name"], r["sender"], r["seed"]) for r in new}
        rows = [r for r in previous if (r["name"], r["sender"], r["seed"]) not in keys] + new
        write_results(args.out, {"rows": rows}, markdown(rows))


if __name__ == "__main__":
    main()
