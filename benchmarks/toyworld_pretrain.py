"""Build (or load) the toy world's pretrained participants and measure the FedRefine preconditions.

    python benchmarks/toyworld_pretrain.py [--threads 2] [--workers 2] [--cache-dir DIR] [--ship] [--rebuild]

Preconditions (fractions, see ``fedrefine.toyworld.preconditions``), measured on held-out entities:

- each sender: ``sender_known_accuracy`` >= 0.95 (its group, cloze) and ``hint_fact_accuracy`` >= 0.95;
- the receiver: ``receiver_held_out_accuracy`` <= 0.30 on every group, ``oracle_hint_accuracy`` >= 0.95,
  ``rephrase_keeps_question`` >= 0.95 and ``rephrase_private_tokens`` == 0.

Writes benchmarks/results/toyworld_pretrain.json. ``--ship`` copies the built participants into the package
(src/fedrefine/toyworld/pretrained/<key>/) so that a fresh clone skips pretraining.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from fedrefine.bench.records import git_commit, script_command
from fedrefine.toyworld import DEFAULT_PARTICIPANTS, PretrainConfig, ToyWorld, WorldConfig
from fedrefine.toyworld import preconditions as measure
from fedrefine.toyworld.pretrain import build_toy_world, load_toy_participants, read_toy_metadata, shipped_dir

BARS = {
    "sender_known_accuracy": (">=", 0.95),
    "hint_fact_accuracy": (">=", 0.95),
    "receiver_held_out_accuracy": ("<=", 0.30),
    "oracle_hint_accuracy": (">=", 0.95),
    "rephrase_keeps_question": (">=", 0.95),
    "rephrase_private_tokens": ("==", 0.0),
}


def meets(name: str, value: float | dict[str, float]) -> bool:
    sense, bar = BARS[name]
    values = value.values() if isinstance(value, dict) else [value]
    return all({">=": v >= bar, "<=": v <= bar, "==": v == bar}[sense] for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results/toyworld_pretrain.json")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--workers", type=int, default=1, help="participants pretrained at once, one process each")
    parser.add_argument("--ship", action="store_true", help="copy the built participants into the package")
    parser.add_argument("--rebuild", action="store_true", help="pretrain even if a cached or shipped world exists")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    world_config, recipe = WorldConfig(), PretrainConfig()
    world = ToyWorld(world_config)
    started = time.perf_counter()
    directory = build_toy_world(
        world_config, DEFAULT_PARTICIPANTS, recipe, cache_dir=args.cache_dir, rebuild=args.rebuild, workers=args.workers
    )
    build_seconds = time.perf_counter() - started
    participants = load_toy_participants(world_config, DEFAULT_PARTICIPANTS, recipe, cache_dir=args.cache_dir)

    receiver_config, *sender_configs = DEFAULT_PARTICIPANTS
    preconditions: dict[str, dict] = {}
    accuracy: dict[str, dict[str, float]] = {}
    for config in DEFAULT_PARTICIPANTS:  # every participant on every split (context for the preconditions)
        participant = participants[config.name]
        row = {"public": measure.cloze_accuracy(participant, world.questions(world.public))}
        for group in range(world.num_groups):
            row[f"held_out_group{group}"] = measure.cloze_accuracy(participant, world.questions(world.held_out(group)))
        accuracy[config.name] = row
    for config in sender_configs:
        sender = participants[config.name]
        facts = world.facts(world.held_out(config.private_groups[0]))
        preconditions[config.name] = {
            "sender_known_accuracy": accuracy[config.name][f"held_out_group{config.private_groups[0]}"],
            "hint_fact_accuracy": measure.hint_fact_accuracy(sender, world, facts),
            "hint_fact_accuracy_other_wordings": (
                measure.hint_fact_accuracy(sender, world, facts, 1) + measure.hint_fact_accuracy(sender, world, facts, 2)
            ) / 2,
        }
    receiver = participants[receiver_config.name]
    rephrasing = measure.check_rephrasings(receiver, world, world.facts(world.held_out()))
    preconditions[receiver_config.name] = {
        "receiver_held_out_accuracy": {
            f"group{g}": accuracy[receiver_config.name][f"held_out_group{g}"] for g in range(world.num_groups)
        },
        "oracle_hint_accuracy": measure.oracle_hint_accuracy(receiver, world, world.questions(world.held_out())),
        "rephrase_keeps_question": rephrasing.keeps_question,
        "rephrase_changes_wording": rephrasing.changes_wording,
        "rephrase_private_tokens": rephrasing.private_tokens,
        "rephrase_examples": [list(pair) for pair in rephrasing.examples],
    }
    checks = {
        f"{name}: {key}": meets(key, value)
        for name, row in preconditions.items()
        for key, value in row.items()
        if key in BARS
    }
    metadata = read_toy_metadata(directory)
    summary = {
        "command": script_command(),
        "commit": git_commit(),
        "key": directory.name,
        "participants": [c.name for c in DEFAULT_PARTICIPANTS],
        "preconditions": preconditions,
        "checks": checks,
        "all_met": all(checks.values()),
        "build_or_load_seconds": round(build_seconds, 1),
        "pretraining_seconds": metadata.get("pretraining_seconds"),
        "pretraining": metadata["training"],
        "torch_threads": torch.get_num_threads(),
        "workers": args.workers,
        "accuracy": accuracy,
    }
    print(json.dumps({"preconditions": preconditions, "checks": checks}, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    if args.ship and directory.parent != shipped_dir():
        for stale in shipped_dir().iterdir() if shipped_dir().is_dir() else []:
            if stale.is_dir() and stale.name != directory.name:
                shutil.rmtree(stale)
        target = shipped_dir() / directory.name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(directory, target)
        print(f"shipped {target}")


if __name__ == "__main__":
    main()
