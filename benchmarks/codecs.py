"""Accuracy against bytes for every KV codec and layer budget on the toy world, and the paper's bytes per token.

    python benchmarks/codecs.py [--seeds 0 1 2] [--steps 300]

For each recipe (``last``: configs/toyworld.yaml, answer prefix + last-token fusion, the best
recipe; ``prompt``: configs/toyworld_reference.yaml, the C2C reference's prompt positions) and
seed, ``fedrefine fit`` trains the Llama-style sender's fuser (reused when it exists under
``--runs``), then the held-out questions of its group are answered by C2C with every link codec
(``fp32`` ... ``int2``, messages serialised in the wire format and decoded as the receiver
does) and layer budget. The paper's four real senders' bytes per prompt token are measured the
same way: random K/V of their exact shapes (128-token prompt, batch 1, bf16 as the models run)
serialised with each codec, header included. Writes ``benchmarks/results/codecs.{json,md,png}``
and the profile the adaptive route and its sweep read, ``benchmarks/results/adaptive_profile.json``:
the best recipe's options of seed 0 (receiver alone, T2T, C2C per codec and layer budget) with
their development-split accuracy, held-out correctness per question, bytes and compute time.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from fedrefine.bench.kv_bytes import PAPER_RECEIVER, PAPER_SENDERS, bytes_table, identity_of, wire_bytes_per_token
from fedrefine.bench.records import git_commit, markdown_table, script_command, write_results
from fedrefine.evaluation import Evaluator
from fedrefine.recipes.trainer_cli import build_cli
from fedrefine.tasks.multiple_choice import encode_question
from fedrefine.tasks.routes import parse_routes
from fedrefine.wire import CODEC_NAMES, LinkConfig

RECIPES = {"last": "configs/toyworld.yaml", "prompt": "configs/toyworld_reference.yaml"}
BUDGETS = (None, 0.5, 0.3)
SENDER = "llama-sender"
PROMPT_TOKENS = 128


def fuser_dir(runs: Path, recipe: str, seed: int, steps: int, trained_with: str | None = None) -> Path:
    """Train (once) the fuser of one recipe and seed (with ``trained_with``: on K/V through that codec, the
    link's ``in_training`` option); returns its directory."""
    directory = runs / f"{recipe}-seed{seed}-steps{steps}{f'-train-{trained_with}' if trained_with else ''}"
    link = ["--model.evaluation.link.codec", trained_with, "--model.evaluation.link.in_training", "true"] * bool(trained_with)
    if not (directory / "fuser" / "fuser.json").is_file():
        build_cli(["fit", *common_args(recipe, seed, directory), "--trainer.max_steps", str(steps),
                   "--trainer.val_check_interval", str(steps), *link])
    return directory / "fuser"


def quantisation_aware(seed: int, steps: int, runs: Path, batch_size: int, codec: str = "int2") -> dict:
    """The best recipe's fuser trained on ``codec``-coded K/V, evaluated through the same codec."""
    directory = fuser_dir(runs, "last", seed, steps, trained_with=codec)
    cli = build_cli([*common_args("last", seed, directory.parent), "--model.fuser_path", str(directory)], run=False)
    module, data = cli.model.eval(), cli.datamodule
    report, seconds = evaluate(module, data.load_split(data.test_split), ["c2c"], LinkConfig(codec=codec), batch_size)
    row = report.rows()[0]
    return {"recipe": "last", "codec": codec, "layer_budget": None, "seed": seed, "trained_with": codec,
            "accuracy": row["accuracy"], "bytes_per_question": row["bytes_per_question"], "questions": row["questions"]}


def common_args(recipe: str, seed: int, directory: Path) -> list[str]:
    return ["--config", RECIPES[recipe], "--seed_everything", str(seed), "--model.sender.init_args.name", SENDER,
            "--trainer.default_root_dir", str(directory), "--trainer.logger", "false", "--trainer.callbacks", "[]",
            "--trainer.enable_progress_bar", "false", "--model.export_dir", str(directory / "fuser")]


def evaluate(module, questions, routes, link: LinkConfig, batch_size: int):
    """One evaluation of ``routes`` with ``link``; returns the report and the wall time per question."""
    config = dataclasses.replace(module.evaluation, link=link)
    evaluator = Evaluator(module.fused, parse_routes(routes, module.fused.sender_names), config, module.planner)
    started = time.perf_counter()
    report = evaluator.run(questions, batch_size)
    return report, (time.perf_counter() - started) / len(questions)


def measure(recipe: str, seed: int, steps: int, runs: Path, batch_size: int) -> tuple[list[dict], dict]:
    """Rows (codec x budget) of one fuser, and its options for the adaptive profile."""
    directory = fuser_dir(runs, recipe, seed, steps)
    cli = build_cli([*common_args(recipe, seed, directory.parent), "--model.fuser_path", str(directory)], run=False)
    module, data = cli.model.eval(), cli.datamodule
    held_out, development = data.load_split(data.test_split), data.load_split(data.val_split)
    rows, options = [], {}
    baseline, _ = evaluate(module, held_out, ["receiver"], LinkConfig(), batch_size)
    receiver_accuracy = baseline.rows()[0]["accuracy"]
    for budget in BUDGETS:
        for codec in CODEC_NAMES:
            link = LinkConfig(codec=codec, layer_budget=budget)
            report, seconds = evaluate(module, held_out, ["c2c"], link, batch_size)
            row = report.rows()[0]
            rows.append({"recipe": recipe, "codec": codec, "layer_budget": budget, "seed": seed,
                         "accuracy": row["accuracy"], "receiver_accuracy": receiver_accuracy,
                         "bytes_per_question": row["bytes_per_question"], "bytes_per_token": row["bytes_per_token"],
                         "questions": row["questions"], "seconds_per_question": seconds})
            if seed == 0 and recipe == "last":  # the profile holds the best recipe's options (as the model runs)
                dev, _ = evaluate(module, development, ["c2c"], link, batch_size)
                name = f"c2c/{recipe}/{codec}/{'all' if budget is None else budget}"
                options[name] = {"name": name, "route": "c2c", "codec": codec, "layer_budget": budget,
                                 "dev_accuracy": dev.rows()[0]["accuracy"], "correct": report.correct(report.routes[0]),
                                 "bytes": [round(row["bytes_per_question"])] * len(held_out),
                                 "compute_s": seconds, "round_trips": 1}
    if seed == 0 and recipe == "last":
        for route in ("receiver", "t2t"):
            report, seconds = evaluate(module, held_out, [route], LinkConfig(), batch_size)
            dev, _ = evaluate(module, development, [route], LinkConfig(), batch_size)
            row = report.rows()[0]
            options[f"{route}/{recipe}"] = {
                "name": f"{route}/{recipe}", "route": route, "codec": None, "layer_budget": None,
                "dev_accuracy": dev.rows()[0]["accuracy"], "correct": report.correct(report.routes[0]),
                "bytes": [round(row["bytes_per_question"])] * len(held_out), "compute_s": seconds,
                "round_trips": 0 if route == "receiver" else 1,
            }
        options["questions"] = question_tokens(module, [held_out[i].item for i in range(len(held_out))])
    return rows, options


def question_tokens(module, items) -> list[dict]:
    """Each question's id and prompt length in the receiver's and each sender's tokens (the profile's questions)."""
    fused = module.fused
    return [{"id": item.id,
             "receiver_tokens": len(encode_question(fused.receiver, item, "text").chat.input_ids),
             "sender_tokens": {name: len(encode_question(sender, item, "text").chat.input_ids)
                               for name, sender in fused.senders.items()}}
            for item in items]


def paper_bytes_per_token() -> dict[str, dict[str, float]]:
    """Per codec: the paper's four senders' serialised bytes per prompt token (a 128-token prompt, batch 1)."""
    table = bytes_table(PAPER_RECEIVER, PAPER_SENDERS, torch.bfloat16)
    result: dict[str, dict[str, float]] = {}
    for codec in CODEC_NAMES:
        per_sender = {e.sender: wire_bytes_per_token(identity_of(e.sender), e.layers_sent, codec, PROMPT_TOKENS)
                      for e in table}
        result[codec] = {"total": sum(per_sender.values()), **per_sender}
    return result


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for recipe, marker in (("last", "o"), ("prompt", "s")):
        for budget, fill in zip(BUDGETS, ("full", "left", "none")):
            points = []
            for codec in CODEC_NAMES:
                chosen = [r for r in rows if (r["recipe"], r["codec"], r["layer_budget"]) == (recipe, codec, budget)]
                points.append((statistics.mean(r["bytes_per_question"] for r in chosen),
                               100 * statistics.mean(r["accuracy"] for r in chosen), codec))
            label = f"{recipe} positions, {'all layers' if budget is None else f'{budget:.0%} of layers'}"
            axis.plot([p[0] for p in points], [p[1] for p in points], marker=marker, fillstyle=fill, label=label)
            if budget is None:
                for x, y, codec in points:
                    axis.annotate(codec, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    receiver = 100 * statistics.mean(r["receiver_accuracy"] for r in rows)
    axis.axhline(receiver, color="grey", linestyle=":", label="receiver alone")
    axis.set_xscale("log")
    axis.set_xlabel("bytes per question (wire format, header included)")
    axis.set_ylabel("held-out accuracy (%), mean of seeds")
    axis.set_title("Toy world: C2C accuracy vs bytes per codec and layer budget")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def summary(rows: list[dict]) -> list[dict]:
    """Mean over seeds per (recipe, budget, codec), with the loss against fp32 in points."""
    out = []
    for recipe in RECIPES:
        for budget in BUDGETS:
            chosen = [r for r in rows if (r["recipe"], r["layer_budget"]) == (recipe, budget)]
            fp32 = statistics.mean(r["accuracy"] for r in chosen if r["codec"] == "fp32")
            for codec in CODEC_NAMES:
                mine = [r for r in chosen if r["codec"] == codec]
                accuracy = statistics.mean(r["accuracy"] for r in mine)
                out.append({"recipe": recipe, "layer_budget": budget, "codec": codec, "accuracy": accuracy,
                            "loss_vs_fp32_points": 100 * (fp32 - accuracy),
                            "bytes_per_question": statistics.mean(r["bytes_per_question"] for r in mine)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--runs", default="runs/codecs", help="where the trained fusers are kept (and reused)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/codecs")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows, profile_options = [], {}
    for recipe in RECIPES:
        for seed in args.seeds:
            measured, options = measure(recipe, seed, args.steps, Path(args.runs), args.batch_size)
            rows += measured
            profile_options.update(options)
    aware = [quantisation_aware(seed, args.steps, Path(args.runs), args.batch_size) for seed in args.seeds]
    paper = paper_bytes_per_token()
    table = summary(rows)
    best = {r["codec"]: r for r in table if r["recipe"] == "last" and r["layer_budget"] is None}
    bars = {
        "int8 loses <= 0.5 points vs fp32 (best recipe, all layers)": best["int8"]["loss_vs_fp32_points"] <= 0.5,
        "int4 loses <= 1 point vs fp32 (best recipe, all layers)": best["int4"]["loss_vs_fp32_points"] <= 1.0,
        "paper's four senders at int4 <= 22,528 bytes per token": paper["int4"]["total"] <= 22_528,
    }
    command, commit = script_command(), git_commit()
    payload = {
        "command": command,
        "commit": commit,
        "recipe": "last (configs/toyworld.yaml): answer prefix + last-token fusion, all layers",
        "rows": [r for r in rows if r["recipe"] == "last" and r["layer_budget"] is None],
        "sweep_rows": rows,
        "summary": table,
        "quantisation_aware_rows": aware,
        "paper_four_senders_bytes_per_token": {codec: value["total"] for codec, value in paper.items()},
        "paper_bytes_per_token_by_sender": paper,
        "bars": bars,
    }
    lines = [f"# KV codecs on the toy world\n\n`{command}` at `{commit}`; sender {SENDER}, held-out questions of its "
             f"group, seeds {args.seeds}, {args.steps} fuser steps.\n",
             "Mean over seeds; loss in points against fp32 with the same recipe and layer budget.\n"]
    lines += markdown_table(
        ["recipe", "layers", "codec", "accuracy %", "loss vs fp32 (pts)", "bytes/question"],
        [[r["recipe"], "all" if r["layer_budget"] is None else f"{r['layer_budget']:.0%}", r["codec"],
          f"{100 * r['accuracy']:.1f}", f"{r['loss_vs_fp32_points']:+.2f}", f"{r['bytes_per_question']:,.0f}"]
         for r in table])
    plain = statistics.mean(r["accuracy"] for r in rows if (r["recipe"], r["codec"], r["layer_budget"]) == ("last", "int2", None))
    lines += ["", "## Quantisation-aware training (`link.in_training`): the best recipe, int2", "",
              f"Trained on fp32 K/V, evaluated through int2: {100 * plain:.1f}%. Trained and evaluated through int2: "
              f"{100 * statistics.mean(r['accuracy'] for r in aware):.1f}% (per seed: "
              f"{', '.join(format(100 * r['accuracy'], '.1f') for r in aware)})."]
    lines += ["", f"## The paper's four senders -> {PAPER_RECEIVER}, bytes per prompt token (128-token prompt, "
              "header included; the paper: 88 KB in bf16)", ""]
    lines += markdown_table(["codec", "bytes/token", *(s.rsplit("/", 1)[-1] for s in PAPER_SENDERS)],
                            [[c, f"{v['total']:,.0f}", *(f"{v[s]:,.0f}" for s in PAPER_SENDERS)] for c, v in paper.items()])
    lines += ["", "## Bars", "", *(f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in bars.items()), ""]
    write_results(args.out, payload, "\n".join(lines))
    plot(rows, Path(args.out).with_suffix(".png"))
    questions = profile_options.pop("questions")
    profile = {"format": "fedrefine.adaptive_profile", "version": 1, "notes": {"command": command, "commit": commit},
               "questions": questions, "options": list(profile_options.values())}
    Path(args.out).with_name("adaptive_profile.json").write_text(__import__("json").dumps(profile, indent=1) + "\n")


if __name__ == "__main__":
    main()
