"""Does the evaluation loop answer faster, and exactly as before? Two commits side by side on this machine.

    python benchmarks/eval_speed.py --base 26ab54a [--routes receiver sender c2c t2t] [--rounds 2]

The README's main job's setting (``configs/toyworld.yaml``: cloze scoring, four options, the answer
prefix, a last-token fuser) on its held-out questions. One fuser is trained first, by the working
tree's ``fedrefine fit`` with that config (or ``--fuser DIR``), and both commits evaluate with it.

Each commit runs in its own process with its own ``src`` first on the path (``--base`` from a
temporary git worktree), ``--rounds`` times, alternating base and head so that both see the same
machine. In each process, every route is evaluated alone over every question: the batches are
encoded first (tokenising, aligning; the same work in both), then the route answers them. Recorded
per route: wall seconds per question of answering (the best round), the latency the route itself
reports (its stages' sum), and every question's prediction under each cloze normalisation.

Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/eval_speed``): per route the seconds
per question before and after, ``speedup`` (before / after), ``prediction_disagreements`` (questions
whose reported prediction differs) and the disagreements under each normalisation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from fedrefine.bench.records import commit_checkout, git_commit, markdown_table, script_command, write_results

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/toyworld.yaml"

#: Run in each commit's own checkout; written to a file and run with that commit's ``src`` on the path. It uses
#: only what both layouts offer (the trainer CLI, the evaluator's encode / answer, the report's add).
PROBE = r'''
import json, os, sys, time
import torch
try:
    from fedrefine.recipes.trainer_cli import build_cli
    from fedrefine.tasks.routes import parse_routes
except ImportError:  # the layout before fedrefine.recipes / fedrefine.tasks
    from fedrefine.trainer_cli import build_cli
    from fedrefine.routes import parse_routes
from fedrefine.evaluation import Evaluator
from fedrefine.evaluation.report import EvaluationReport

config, fuser, routes, out = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4]
torch.set_num_threads(int(os.environ.get("EVAL_SPEED_THREADS", "2")))
cli = build_cli(["--config", config, "--model.fuser_path", fuser, "--trainer.logger", "false"], run=False)
module, data = cli.model.eval(), cli.datamodule
data.prepare_data()
questions = data.load_split(data.test_split)
batch_size = data.eval_batch_size
recorded = []
add = EvaluationReport.add
def recording_add(self, route, batch, result):
    recorded.append((list(batch.ids), result.predictions.tolist(), {n: p.tolist() for n, p in result.cloze_predictions.items()}))
    return add(self, route, batch, result)
EvaluationReport.add = recording_add
rows = {}
for name in routes:
    route = parse_routes([name], module.fused.sender_names)
    evaluator = Evaluator(module.fused, route, module.evaluation, module.planner)
    batches = [evaluator.encode([questions[i] for i in range(s, min(s + batch_size, len(questions)))])
               for s in range(0, len(questions), batch_size)]
    answer = getattr(evaluator, "answer", None) or evaluator.evaluate  # an encoded batch into the report
    report, recorded[:] = EvaluationReport(route), []
    with torch.no_grad():
        answer(batches[0], EvaluationReport(route))  # warm-up, not counted
        start = time.perf_counter()
        for batch in batches:
            answer(batch, report)
        seconds = time.perf_counter() - start
    row = report.rows()[0]
    predictions, cloze = {}, {}
    for ids, picks, by_normalization in recorded:
        predictions.update(zip(ids, picks))
        for normalization, values in by_normalization.items():
            cloze.setdefault(normalization, {}).update(zip(ids, values))
    rows[name] = {"seconds": seconds, "questions": len(questions), "accuracy": row["accuracy"],
                  "reported_latency_ms": row["latency_ms"], "predictions": predictions, "cloze_predictions": cloze}
json.dump(rows, open(out, "w"))
'''


def train_fuser(work: Path) -> Path:
    """The toy world's fuser, trained by the working tree's ``fedrefine fit`` with the README's main config."""
    directory = work / "fit"
    subprocess.run(
        ["fedrefine", "fit", "--config", CONFIG, "--trainer.default_root_dir", str(directory), "--trainer.logger", "false",
         "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]", "--model.export_dir", str(directory / "fuser")],
        cwd=REPO, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"},
    )
    return directory / "fuser"


def probe(checkout: Path, fuser: Path, routes: list[str], work: Path, tag: str) -> dict:
    """One commit's rows: every route evaluated alone in a fresh process with the commit's own sources."""
    script, out = work / "probe.py", work / f"{tag}.json"
    script.write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": str(checkout / "src"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, str(script), CONFIG, str(fuser), ",".join(routes), str(out)],
                          cwd=checkout, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the probe failed at {checkout}:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def best(runs: list[dict]) -> dict:
    """Per route, the round with the fewest seconds (predictions are the same in every round of a commit)."""
    return {route: min((run[route] for run in runs), key=lambda row: row["seconds"]) for route in runs[0]}


def compare(before: dict, after: dict) -> dict:
    """Per route: seconds per question before and after, the speedup, and where predictions differ."""
    rows = {}
    for route, old in before.items():
        new = after[route]
        differ = sorted(q for q, p in old["predictions"].items() if new["predictions"][q] != p)
        by_normalization = {
            n: sum(new["cloze_predictions"][n][q] != p for q, p in picks.items()) for n, picks in old["cloze_predictions"].items()
        }
        rows[route] = {
            "questions": old["questions"],
            "seconds_per_question_before": old["seconds"] / old["questions"],
            "seconds_per_question_after": new["seconds"] / new["questions"],
            "speedup": old["seconds"] / new["seconds"],
            "reported_latency_ms_before": old["reported_latency_ms"],
            "reported_latency_ms_after": new["reported_latency_ms"],
            "accuracy_before": old["accuracy"],
            "accuracy_after": new["accuracy"],
            "prediction_disagreements": len(differ),
            "disagreeing_questions": differ,
            "cloze_disagreements": by_normalization,
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit to compare the working tree against")
    parser.add_argument("--routes", nargs="+", default=["receiver", "sender", "c2c", "t2t"])
    parser.add_argument("--rounds", type=int, default=2, help="processes per commit, alternating base and head")
    parser.add_argument("--fuser", help="a trained toy-world fuser directory (default: train one with the config)")
    parser.add_argument("--out", default="benchmarks/results/eval_speed")
    args = parser.parse_args()
    with commit_checkout(REPO, args.base, "fedrefine-eval-speed-") as (base_tree, work):
        fuser = Path(args.fuser) if args.fuser else train_fuser(work)
        runs = {"base": [], "head": []}
        for round_ in range(args.rounds):
            runs["base"].append(probe(base_tree, fuser, args.routes, work, f"base{round_}"))
            runs["head"].append(probe(REPO, fuser, args.routes, work, f"head{round_}"))
    rows = compare(best(runs["base"]), best(runs["head"]))
    command, commit = script_command(), git_commit()
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    payload = {"command": command, "commit": commit, "base": args.base, "machine": machine, "config": CONFIG,
               "rounds": args.rounds, "routes": rows}
    table = [
        [f"`{route}`", row["questions"], f"{1000 * row['seconds_per_question_before']:.2f}",
         f"{1000 * row['seconds_per_question_after']:.2f}", f"{row['speedup']:.2f}x",
         f"{row['reported_latency_ms_before']:.2f} / {row['reported_latency_ms_after']:.2f}",
         f"{100 * row['accuracy_before']:.1f}% / {100 * row['accuracy_after']:.1f}%", row["prediction_disagreements"],
         ", ".join(f"{n} {d}" for n, d in row["cloze_disagreements"].items())]
        for route, row in rows.items()
    ]
    lines = [
        f"# Evaluation speed: `{args.base}` vs `{commit}`", "",
        f"Command: `{command}` at commit `{commit}`; machine: {machine}. `{CONFIG}` (cloze, four options, answer prefix, "
        f"last-token fuser), its held-out questions; one fuser for both commits. Each commit in its own process, "
        f"{args.rounds} rounds alternating, the best round per route. Seconds: answering the encoded batches "
        f"(encoding is the same work in both and is not timed).", "",
        *markdown_table(["route", "questions", "ms/question before", "after", "speedup", "reported latency ms before / after",
                         "accuracy before / after", "prediction disagreements", "by normalisation"], table), "",
    ]
    write_results(args.out, payload, "\n".join(lines))


if __name__ == "__main__":
    main()
