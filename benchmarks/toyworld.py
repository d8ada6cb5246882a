"""The toy world's bars: does knowledge really transfer through the fuser? (issue "Toy world")

    python benchmarks/toyworld.py [--seeds 0 1 2] [--senders llama-sender qwen2-sender ...] [--steps 300] [--workers 2]
    python benchmarks/toyworld.py --config configs/toyworld_reference.yaml --out benchmarks/results/toyworld_reference
    python benchmarks/toyworld.py --config configs/toyworld_reference.yaml --set model.fuser.fuse_keys=false \
        --out benchmarks/results/toyworld_reference_values_only
    python benchmarks/toyworld.py --config configs/toyworld_fidelity.yaml --steps 600 --senders llama-sender --workers 2 \
        --merge --out benchmarks/results/toyworld_fidelity   # one sender per call, rows merged

For each sender and seed: ``fedrefine fit`` trains the receiver's fuser on the sender's
fuser-train entities (``--config``, default configs/toyworld.yaml), then ``fedrefine test``
scores the held-out entities of the sender's private group: receiver alone, sender alone, C2C,
the two controls (mismatched message, random K/V) and the reordered-options probe. Writes
``<out>.json`` and ``<out>.md`` (default benchmarks/results/toyworld). ``--set key=value`` overrides a
config field in both. Each row also carries the fit's last validation accuracy of C2C on the
development split (fuser-train entities held out of training): compare variants there, not on
the held-out entities the bars are measured on. ``--workers N`` runs N fits at once, each in its own
process with an equal share of torch's threads (tiny models use one core each better than two cores one).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from fedrefine.bench.records import git_commit, script_command, write_results
from fedrefine.recipes.trainer_cli import build_cli
from fedrefine.toyworld import DEFAULT_PARTICIPANTS, load_toy_participants

ROUTES = {
    "receiver_alone": "receiver",
    "sender_alone": "sender",
    "c2c": "c2c",
    "control_mismatched": "c2c_mismatched",
    "control_random_kv": "c2c_random_kv",
    "probe_reordered_options": "c2c_reordered",
}


def run(
    sender: str, seed: int, steps: int, root: Path, config: str = "configs/toyworld.yaml", overrides: list[str] = ()
) -> dict:
    """Fit and test one fuser; returns the benchmark row."""
    group = next(p.private_groups[0] for p in DEFAULT_PARTICIPANTS if p.name == sender)
    directory = root / f"{sender}-seed{seed}"
    common = [
        "--config", config, "--seed_everything", str(seed),
        "--model.sender.init_args.name", sender, "--data.group", str(group),
        "--trainer.default_root_dir", str(directory), "--trainer.logger", "false",
        "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
        "--model.export_dir", str(directory / "fuser"),
    ]
    for override in overrides:
        key, _, value = override.partition("=")
        common += [f"--{key}", value]
    started = time.perf_counter()
    fit = build_cli(["fit", *common, "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps)])
    seconds = time.perf_counter() - started
    dev_c2c = float(fit.trainer.callback_metrics["val/c2c/accuracy"])
    build_cli(["test", *common, "--model.fuser_path", str(directory / "fuser")])
    rows = {row["route"]: row for row in json.loads((directory / "test_results.json").read_text())["rows"]}
    return {
        "seed": seed,
        "sender": sender,
        "same_tokenizer_as_receiver": same_tokenizer("receiver", sender),
        "fuser_steps": steps,
        "seconds": round(seconds, 1),
        "questions": rows["c2c"]["questions"],
        "dev_c2c": dev_c2c,
        **{name: rows[route]["accuracy"] for name, route in ROUTES.items()},
    }


def run_in_worker(threads: int, *args) -> dict:
    """:func:`run` in a pool worker with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    return run(*args)


def same_tokenizer(first: str, second: str) -> bool:
    """Whether two toy participants share a vocabulary (each trains its own, so none does)."""
    participants = load_toy_participants(progress=False)
    return participants[first].tokenizer.get_vocab() == participants[second].tokenizer.get_vocab()


def bars(rows: list[dict]) -> dict[str, bool]:
    """The issue's bars on the measured rows."""
    return {
        "receiver alone <= 0.30": all(r["receiver_alone"] <= 0.30 for r in rows),
        "sender alone >= 0.95": all(r["sender_alone"] >= 0.95 for r in rows),
        "c2c >= receiver alone + 0.40 (every seed, every sender)": all(r["c2c"] >= r["receiver_alone"] + 0.40 for r in rows),
        "controls within 0.07 of receiver alone": all(
            abs(r[c] - r["receiver_alone"]) <= 0.07 for r in rows for c in ("control_mismatched", "control_random_kv")
        ),
        "a sender with another tokenizer clears +0.40": any(
            not r["same_tokenizer_as_receiver"] and r["c2c"] >= r["receiver_alone"] + 0.40 for r in rows
        ),
    }


def markdown(rows: list[dict], checks: dict[str, bool], command: str, commit: str, threads: int) -> str:
    header = ["seed", "sender", "steps", "s", "dev c2c", *ROUTES]
    lines = [
        "# Toy world: knowledge transfer on held-out entities",
        "",
        f"Command: `{command}` at commit `{commit}` (CPU, {threads} threads per fit)."
        + "".join(sorted({f" Rows merged from `{r['command']}` at `{r['commit']}`." for r in rows if r.get("command", command) != command})),
        "Accuracies are on the held-out entities of the sender's private group (cloze scoring, 4 options, "
        "every fact asked with its answer at each of A-D); dev c2c: the fit's last validation, on the development "
        "split of fuser-train entities.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in rows:
        dev = f"{100 * r['dev_c2c']:.1f}%" if "dev_c2c" in r else ""
        values = [r["seed"], r["sender"], r["fuser_steps"], r["seconds"], dev, *(f"{100 * r[k]:.1f}%" for k in ROUTES)]
        lines.append("| " + " | ".join(str(v) for v in values) + " |")
    lines += ["", "Bars:", ""] + [f"- [{'x' if ok else ' '}] {name}" for name, ok in checks.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--senders", nargs="+", default=[p.name for p in DEFAULT_PARTICIPANTS if p.private_groups])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--config", default="configs/toyworld.yaml", help="the fedrefine fit/test config")
    parser.add_argument("--root", default=None, help="run directory (default runs/benchmarks/<config name>)")
    parser.add_argument("--out", default="benchmarks/results/toyworld")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field in fit and test, e.g. model.fuser.fuse_keys=false")
    parser.add_argument("--workers", type=int, default=1, help="fits run at once, one process each")
    parser.add_argument("--merge", action="store_true",
                        help="add to <out>.json's rows (runs of other senders or seeds kept; each row names its command)")
    args = parser.parse_args()
    root = Path(args.root or f"runs/benchmarks/{Path(args.out).name}")
    jobs = [(sender, seed, args.steps, root, args.config, args.overrides) for sender in args.senders for seed in args.seeds]
    threads = max(1, torch.get_num_threads() // args.workers)
    if args.workers == 1:
        rows = [run(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(run_in_worker, [threads] * len(jobs), *zip(*jobs)))
    command, commit = script_command(), git_commit()
    for row in rows:
        row["command"], row["commit"] = command, commit
    out = Path(args.out).with_suffix(".json")
    if args.merge and out.exists():  # keep the rows of earlier calls for the senders and seeds not re-run here
        done = {(r["sender"], r["seed"]) for r in rows}
        rows = [r for r in json.loads(out.read_text())["runs"] if (r["sender"], r["seed"]) not in done] + rows
    checks = bars(rows)
    payload = {"command": command, "commit": commit, "torch_threads_per_fit": threads, "runs": rows, "bars": checks}
    write_results(args.out, payload, markdown(rows, checks, command, commit, threads))


if __name__ == "__main__":
    main()
