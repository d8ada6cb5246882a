"""Build (or load) the toy world's pretrained participants and measure the FedRefine preconditions.

    python benchmarks/toyworld_pretrain.py [--threads 2] [--cache-dir DIR] [--ship]

Preconditions: each sender >= 95% on questions about entities it knows (its held-out private
ones included); the receiver alone <= 30% on held-out private entities (chance 25%) and high
on public ones. Writes benchmarks/results/toyworld_pretrain.json. ``--ship`` copies the built
participants into the package (src/fedrefine/toyworld/pretrained/<key>/) so that a fresh clone
skips pretraining.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from fedrefine.bench.records import git_commit, script_command
from fedrefine.scoring import predict_alone
from fedrefine.toyworld import DEFAULT_PARTICIPANTS, PretrainConfig, ToyWorld, WorldConfig
from fedrefine.toyworld.pretrain import build_toy_world, load_toy_participants, read_toy_metadata, shipped_dir
from fedrefine.toyworld.world import ANSWER_STYLE


def accuracy(participant, items) -> float:
    predictions = predict_alone(participant, items, batch_size=64, style=ANSWER_STYLE)
    return sum(int(p == item.answer_index) for p, item in zip(predictions, items)) / len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results/toyworld_pretrain.json")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--ship", action="store_true", help="copy the built participants into the package")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    world_config, recipe = WorldConfig(), PretrainConfig()
    world = ToyWorld(world_config)
    started = time.perf_counter()
    directory = build_toy_world(world_config, DEFAULT_PARTICIPANTS, recipe, cache_dir=args.cache_dir)
    participants = load_toy_participants(world_config, DEFAULT_PARTICIPANTS, recipe, cache_dir=args.cache_dir)
    build_seconds = time.perf_counter() - started

    results: dict[str, dict[str, float]] = {}
    for config in DEFAULT_PARTICIPANTS:
        participant = participants[config.name]
        row = {"public": accuracy(participant, world.questions(world.public))}
        for group in range(world.num_groups):
            row[f"fuser_train_group{group}"] = accuracy(participant, world.questions(world.fuser_train(group)))
            row[f"held_out_group{group}"] = accuracy(participant, world.questions(world.held_out(group)))
        results[config.name] = row
        print(config.name, json.dumps(row))

    receiver, *senders = DEFAULT_PARTICIPANTS
    checks = {
        f"{s.name} >= 0.95 on known": all(
            results[s.name][k] >= 0.95
            for g in s.private_groups
            for k in ("public", f"fuser_train_group{g}", f"held_out_group{g}")
        )
        for s in senders
    }
    held = [results[receiver.name][f"held_out_group{g}"] for g in range(world.num_groups)]
    checks[f"{receiver.name} <= 0.30 on held-out"] = sum(held) / len(held) <= 0.30
    checks[f"{receiver.name} >= 0.90 on public"] = results[receiver.name]["public"] >= 0.90
    summary = {
        "command": script_command(),
        "commit": git_commit(),
        "key": directory.name,
        "build_or_load_seconds": round(build_seconds, 1),
        "pretraining": read_toy_metadata(directory)["training"],
        "torch_threads": torch.get_num_threads(),
        "accuracy": results,
        "checks": checks,
    }
    print(json.dumps(checks, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    if args.ship and directory.parent != shipped_dir():
        target = shipped_dir() / directory.name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(directory, target)
        print(f"shipped {target}")


if __name__ == "__main__":
    main()
