"""FedRefine's routes through lm-evaluation-harness (``--model fedrefine``), checked against lm-eval's own ``hf`` model
and against ``fedrefine test``'s evaluation loop, question by question.

    pip install -e ".[lm-eval]"
    python benchmarks/lm_eval_adapter.py [--questions N] [--threads 2]

The gated toy federation of configs/toyworld_federation_gated.yaml (receiver, four senders) is trained short into
``runs/lm_eval_adapter`` first (four pairwise fusers of configs/toyworld.yaml, then the gate; reused when there),
and the toy world is exported as lm-eval tasks (``fedrefine.harness.toy_tasks``: ``fedrefine_toy_mc``,
``fedrefine_toy_gen``) over the held-out entities of every private group. Rows:

- ``receiver_vs_hf``: route ``receiver`` through the adapter against ``lm_eval.simple_evaluate(model="hf")`` on the
  receiver exported with ``save_pretrained``, with and without ``--apply_chat_template``: the option each picks per
  question under ``acc`` (summed log-likelihood) and ``acc_norm`` (per character), disagreements counted;
- ``c2c_vs_fedrefine_test``: route ``c2c`` (four senders, gated) through the adapter with ``--apply_chat_template``
  (the task's ``gen_prefix`` is the answer prefix the fusers were trained with) against the evaluation loop
  ``fedrefine test`` runs (``Evaluator`` on the same module, the config's ``answer_mode: cloze``, ``prefill_answer``),
  on the same questions: the option picked per question under ``sum`` / ``chars`` (lm-eval's ``acc`` / ``acc_norm``);
  and the throughput of both on the same route: questions per second of the answering (the adapter's
  ``loglikelihood`` call over every request against the same loop over the same batches), the best of ``--repeats``
  runs each, alternating; ``throughput_ratio`` = adapter / fedrefine test. lm-eval's whole ``simple_evaluate`` is
  timed too, and ``fedrefine test`` itself runs once on the config's test split (every held-out entity: the same
  questions when ``--questions`` is left out) for its accuracies and wall time (``end_to_end_ratio``: lm-eval's
  whole ``simple_evaluate`` against it, which also builds the model);
- ``generate_until``: ``fedrefine_toy_gen`` (the answer generated after the prefix, exact match) through
  ``receiver``, ``c2c`` and ``t2t``.

Writes benchmarks/results/lm_eval_adapter.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from toyworld_federation import SENDERS, train_fuser  # noqa: E402

from fedrefine.bench.records import git_commit, markdown_table, script_command, write_results  # noqa: E402
from fedrefine.data.question_dataset import QuestionDataset  # noqa: E402
from fedrefine.evaluation import Evaluator  # noqa: E402
from fedrefine.fuser import Fuser  # noqa: E402
from fedrefine.fuser.registry import FuserRegistry  # noqa: E402
from fedrefine.fusion.gate_files import gate_saved_in  # noqa: E402
from fedrefine.harness import register  # noqa: E402
from fedrefine.harness.toy_tasks import GEN_TASK, MC_TASK, toy_rows, write_toy_tasks  # noqa: E402
from fedrefine.recipes.trainer_cli import build_cli  # noqa: E402
from fedrefine.tasks.multiple_choice import MultipleChoiceItem  # noqa: E402
from fedrefine.tasks.routes import parse_routes  # noqa: E402
from fedrefine.toyworld.lightning import ToyParticipant  # noqa: E402

FEDERATION = "configs/toyworld_federation_gated.yaml"
#: FedRefine's normalisation -> lm-eval's metric.
METRICS = {"sum": "acc", "chars": "acc_norm"}


def train_federation(root: Path, fuser_steps: int, gate_steps: int) -> dict[str, str]:
    """The gated toy federation of :data:`FEDERATION`, trained short into ``root`` (once): four pairwise fusers of
    configs/toyworld.yaml in a registry, then the gate with the fusers frozen. Returns the config overrides that
    point at them."""
    registry, gate = root / "registry", root / "gate"
    if not gate_saved_in(gate):
        receiver = ToyParticipant("receiver").load()
        store = FuserRegistry(registry)
        for sender, group in SENDERS.values():
            trained = train_fuser(sender, group, "residual", fuser_steps, root / "fusers", "configs/toyworld.yaml")
            store.save(Fuser.load(trained, ToyParticipant(sender).load().identity, receiver.identity))
        build_cli(["fit", "--config", FEDERATION, "--model.registry", str(registry), "--model.export_dir", str(gate),
                   "--trainer.default_root_dir", str(root), "--trainer.logger", "false", "--trainer.callbacks", "[]",
                   "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false",
                   "--trainer.max_steps", str(gate_steps), "--trainer.val_check_interval", str(gate_steps)])
    return {"registry": str(registry), "gate_path": str(gate)}


def evaluate(model: Any, tasks: list[str], tasks_dir: Path, chat: bool, batch_size: int, **model_args) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model, model_args=model_args or None, tasks=tasks, num_fewshot=0, batch_size=batch_size, device="cpu",
        log_samples=True, apply_chat_template=chat, task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
    )


def picks(samples: list[dict]) -> dict[str, list[int]]:
    """The option each sample picks under ``sum`` and ``chars``, from its per-option log-likelihoods."""
    out = {"sum": [], "chars": []}
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        lls = torch.tensor([float(r[0]) for r in sample["filtered_resps"]], dtype=torch.float64)  # (K,)
        chars = torch.tensor([float(len(t)) for t in sample["doc"]["options"]], dtype=torch.float64)
        out["sum"].append(int(lls.argmax()))
        out["chars"].append(int((lls / chars).argmax()))
    return out


def disagreements(a: dict[str, list[int]], b: dict[str, list[int]]) -> dict[str, int]:
    return {METRICS[n]: sum(x != y for x, y in zip(a[n], b[n])) for n in METRICS}


def accuracy(chosen: list[int], items: list[MultipleChoiceItem]) -> float:
    return sum(c == item.answer_index for c, item in zip(chosen, items)) / len(items)


def receiver_vs_hf(lm, tasks_dir: Path, root: Path, batch_size: int, items: list[MultipleChoiceItem]) -> list[dict]:
    """Route ``receiver`` through the adapter against lm-eval's ``hf`` model on the exported receiver."""
    receiver = lm.fused.receiver
    exported = root / "receiver"
    receiver.model.save_pretrained(exported)
    receiver.tokenizer.save_pretrained(exported)
    rows = []
    for chat in (False, True):
        ours = picks(evaluate(lm, [MC_TASK], tasks_dir, chat, batch_size)["samples"][MC_TASK])
        theirs = picks(evaluate("hf", [MC_TASK], tasks_dir, chat, batch_size, pretrained=str(exported), dtype="float32")["samples"][MC_TASK])
        rows.append({"apply_chat_template": chat, "questions": len(items), "disagreements": disagreements(ours, theirs),
                     **{f"adapter_{m}": accuracy(ours[n], items) for n, m in METRICS.items()},
                     **{f"hf_{m}": accuracy(theirs[n], items) for n, m in METRICS.items()}})
        print(json.dumps(rows[-1]))
    return rows


def fedrefine_loop(lm, items: list[MultipleChoiceItem], batch_size: int) -> tuple[dict[str, list[int]], float]:
    """What ``fedrefine test`` runs for route ``c2c`` on ``items``: the option picked per normalisation, and seconds."""
    module = lm.module
    route = parse_routes(["c2c"], module.fused.sender_names)[0]
    evaluator = Evaluator(module.fused, [route], module.evaluation, module.planner, module.selection)
    questions = QuestionDataset(items)
    chosen = {n: [] for n in METRICS}
    started = time.perf_counter()
    for start in range(0, len(items), batch_size):
        batch = evaluator.encode([questions[i] for i in range(start, min(start + batch_size, len(items)))])
        if batch.failures:
            raise RuntimeError(f"fedrefine test could not encode {batch.failures}")
        result = evaluator.answer_route(batch, route)
        for n in METRICS:
            chosen[n].extend(result.cloze_predictions[n].tolist())
    return chosen, time.perf_counter() - started


def fedrefine_test_cli(overrides: dict[str, str], root: Path) -> dict:
    """``fedrefine test`` itself on the config's test split (every held-out entity: the exported task's questions when
    ``--questions`` covers them), route ``c2c``: its accuracies and wall time (the module built and loaded included)."""
    directory = root / "fedrefine_test"
    started = time.perf_counter()
    build_cli(["test", "--config", FEDERATION, "--model.registry", overrides["registry"], "--model.gate_path",
               overrides["gate_path"], "--model.evaluation.test_routes", "[c2c]", "--trainer.logger", "false",
               "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
               "--trainer.default_root_dir", str(directory)])
    seconds = time.perf_counter() - started
    row = json.loads((directory / "test_results.json").read_text())["rows"][0]
    return {"questions": row["questions"], "acc": row["acc"], "acc_norm": row["acc_norm"], "wall_seconds": round(seconds, 1)}


class Timed:
    """Times the adapter's ``loglikelihood`` calls."""

    def __init__(self, lm) -> None:
        self.seconds, self.lm, self.inner = 0.0, lm, lm.loglikelihood
        lm.loglikelihood = self

    def __call__(self, requests, disable_tqdm: bool = False):
        started = time.perf_counter()
        try:
            return self.inner(requests, disable_tqdm=disable_tqdm)
        finally:
            self.seconds += time.perf_counter() - started


def c2c_vs_fedrefine_test(lm, tasks_dir: Path, batch_size: int, items: list[MultipleChoiceItem], repeats: int) -> dict:
    timer = Timed(lm)
    adapter_s, fedrefine_s, end_to_end_s = [], [], []
    for _ in range(repeats):
        ours_loop, seconds = fedrefine_loop(lm, items, batch_size)
        fedrefine_s.append(seconds)
        timer.seconds, started = 0.0, time.perf_counter()
        results = evaluate(lm, [MC_TASK], tasks_dir, True, batch_size)
        end_to_end_s.append(time.perf_counter() - started)
        adapter_s.append(timer.seconds)
    adapter = picks(results["samples"][MC_TASK])
    n = len(items)
    row = {
        "route": "c2c", "senders": "+".join(lm.fused.sender_names), "gated": lm.fused.source_gate is not None,
        "questions": n, "disagreements": disagreements(adapter, ours_loop),
        **{f"adapter_{m}": accuracy(adapter[k], items) for k, m in METRICS.items()},
        **{f"fedrefine_test_{m}": accuracy(ours_loop[k], items) for k, m in METRICS.items()},
        "batch_size": batch_size,
        "adapter_questions_per_s": round(n / min(adapter_s), 1),
        "fedrefine_test_questions_per_s": round(n / min(fedrefine_s), 1),
        "throughput_ratio": round(min(fedrefine_s) / min(adapter_s), 3),
        "adapter_simple_evaluate_questions_per_s": round(n / min(end_to_end_s), 1),
        "seconds": {"adapter_loglikelihood": adapter_s, "fedrefine_test": fedrefine_s, "simple_evaluate": end_to_end_s},
    }
    print(json.dumps(row))
    return row


def generate_until(lms: dict[str, Any], tasks_dir: Path, batch_size: int) -> list[dict]:
    rows = []
    for route, lm in lms.items():
        started = time.perf_counter()
        results = evaluate(lm, [GEN_TASK], tasks_dir, True, batch_size)
        samples = sorted(results["samples"][GEN_TASK], key=lambda s: s["doc_id"])
        rows.append({"route": route, "questions": len(samples),
                     "exact_match": sum(float(s["exact_match"]) for s in samples) / len(samples),
                     "seconds": round(time.perf_counter() - started, 1),
                     "first_answers": [s["filtered_resps"][0] for s in samples[:5]]})
        print(json.dumps(rows[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=None, help="multiple-choice questions (default: all held-out)")
    parser.add_argument("--gen-questions", type=int, default=128, help="generate_until questions")
    parser.add_argument("--batch-size", type=int, default=64, help="contexts per batch (both tools)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each side (the best counts)")
    parser.add_argument("--fuser-steps", type=int, default=200)
    parser.add_argument("--gate-steps", type=int, default=300)
    parser.add_argument("--root", default="runs/lm_eval_adapter")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/results/lm_eval_adapter", help="writes OUT.json and OUT.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import lm_eval

    command, commit = script_command(), git_commit()
    started = time.perf_counter()
    overrides = train_federation(Path(args.root), args.fuser_steps, args.gate_steps)
    FedRefineLM = register()
    lms = {route: FedRefineLM(config=FEDERATION, route=route, batch_size=args.batch_size, **overrides)
           for route in ("receiver", "c2c", "t2t")}
    with tempfile.TemporaryDirectory(prefix="lm_eval_adapter_") as tmp:
        tmp = Path(tmp)
        write_toy_tasks(tmp / "mc", limit=args.questions)
        write_toy_tasks(tmp / "gen", limit=args.gen_questions)
        items = [MultipleChoiceItem.from_row(row) for row in toy_rows(limit=args.questions)]
        receiver_rows = receiver_vs_hf(lms["receiver"], tmp / "mc", tmp, args.batch_size, items)
        c2c_row = c2c_vs_fedrefine_test(lms["c2c"], tmp / "mc", args.batch_size, items, args.repeats)
        command_row = c2c_row["fedrefine_test_command"] = fedrefine_test_cli(overrides, Path(args.root))
        if command_row["questions"] == len(items):  # lm-eval's whole run against `fedrefine test`'s (model built there)
            c2c_row["end_to_end_ratio"] = round(c2c_row["adapter_simple_evaluate_questions_per_s"]
                                                / (command_row["questions"] / command_row["wall_seconds"]), 3)
        print(json.dumps(command_row))
        generation = generate_until(lms, tmp / "gen", args.batch_size)
    exact = {row["route"]: row["exact_match"] for row in generation}
    payload = {
        "command": command, "commit": commit, "lm_eval_version": lm_eval.__version__,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__},
        "torch_threads": torch.get_num_threads(), "federation": FEDERATION, "overrides": overrides,
        "fuser_steps": args.fuser_steps, "gate_steps": args.gate_steps,
        "receiver_vs_hf": receiver_rows, "c2c_vs_fedrefine_test": c2c_row, "generate_until": generation,
        "bars": {
            "receiver_vs_hf_disagreements_0": all(v == 0 for r in receiver_rows for v in r["disagreements"].values()),
            "c2c_vs_fedrefine_test_disagreements_0": all(v == 0 for v in c2c_row["disagreements"].values()),
            "generate_until_c2c_and_t2t_above_receiver": exact["c2c"] > exact["receiver"] and exact["t2t"] > exact["receiver"],
            "throughput_ratio_at_least_0.8": c2c_row["throughput_ratio"] >= 0.8,
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_results(args.out, payload, summary(payload))


def summary(payload: dict) -> str:
    """The results as Markdown tables."""
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    c2c = payload["c2c_vs_fedrefine_test"]
    receiver = [[r["apply_chat_template"], r["questions"], r["disagreements"]["acc"], r["disagreements"]["acc_norm"],
                 pct(r["adapter_acc"]), pct(r["hf_acc"]), pct(r["adapter_acc_norm"]), pct(r["hf_acc_norm"])]
                for r in payload["receiver_vs_hf"]]
    fused = [[c2c["senders"], c2c["gated"], c2c["questions"], c2c["disagreements"]["acc"], c2c["disagreements"]["acc_norm"],
              pct(c2c["adapter_acc"]), pct(c2c["fedrefine_test_acc"]), pct(c2c["fedrefine_test_command"]["acc"]),
              c2c["adapter_questions_per_s"], c2c["fedrefine_test_questions_per_s"], c2c["throughput_ratio"]]]
    generation = [[r["route"], r["questions"], pct(r["exact_match"])] for r in payload["generate_until"]]
    return "\n".join([
        "# FedRefine's routes through lm-evaluation-harness", "",
        f"Command: `{payload['command']}` at commit `{payload['commit']}`, lm-eval {payload['lm_eval_version']}, "
        f"{payload['torch_threads']} torch threads on {payload['machine']['processor']} ({payload['machine']['cpus']} CPUs). "
        f"Toy federation {payload['federation']} trained short ({payload['fuser_steps']} steps per pairwise fuser, "
        f"{payload['gate_steps']} gate steps). Bars: {payload['bars']}.", "",
        "## Route `receiver` through the adapter against lm-eval's `hf` model (`fedrefine_toy_mc`)", "",
        *markdown_table(["chat template", "questions", "acc disagreements", "acc_norm disagreements", "adapter acc",
                         "hf acc", "adapter acc_norm", "hf acc_norm"], receiver), "",
        "## C2C through the adapter against `fedrefine test` (same questions, chat prompt with the answer prefix)", "",
        *markdown_table(["senders", "gated", "questions", "acc disagreements", "acc_norm disagreements", "adapter acc",
                         "loop acc", "`fedrefine test` acc", "adapter q/s", "loop q/s", "throughput ratio"], fused), "",
        "## `fedrefine_toy_gen` (generate_until, exact match)", "",
        *markdown_table(["route", "questions", "exact match"], generation), "",
    ])


if __name__ == "__main__":
    main()
