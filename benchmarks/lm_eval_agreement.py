"""FedRefine's cloze scoring against lm-evaluation-harness, question by question.

    pip install -e ".[lm-eval]"
    python benchmarks/lm_eval_agreement.py [--questions 100] [--threads 2]

Each model is exported with ``save_pretrained`` (model and tokenizer) into a temporary directory;
FedRefine loads it from there (``load_participant``) and lm-eval reads the same directory
(``lm_eval.simple_evaluate(model="hf", pretrained=<dir>)``, CPU, float32). The questions are the toy
world's, in the OpenBookQA schema, with options of one to five words, so that the normalisations
pick different options. For each prompt style a task file mirrors FedRefine's prompt:

- ``lm_eval``: lm-eval's stock OpenBookQA task (``doc_to_text: question_stem``, ``doc_to_choice:
  "{{choices.text}}"``, default target delimiter " "), on the local file;
- ``chat``: ``doc_to_text`` is the prompt FedRefine renders for that model (chat template, lettered
  options, instruction, "The correct answer is"), precomputed into the data file; the choices are
  the option texts, scored as " " + text like FedRefine's.

FedRefine answers through its evaluation loop (``Evaluator``, route ``receiver``, ``answer_mode:
cloze``, ``prompt_style`` as above), which yields the option chosen under every normalisation; lm-eval's
choice is the argmax of its per-option log-likelihoods (``sum``: its ``acc``) and of those divided by
the option text's length in characters (``chars``: its ``acc_norm``); its per-question ``acc`` /
``acc_norm`` are checked against the choice too. lm-eval has no per-token normalisation, so
``token_mean`` has no row. Writes ``benchmarks/results/lm_eval_agreement.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fedrefine.bench.records import git_commit, script_command
from fedrefine.data.question_dataset import QuestionDataset
from fedrefine.evaluation import EvaluationConfig, Evaluator
from fedrefine.fusion import FusedReceiver
from fedrefine.participants import Participant, TinySpec, build_tiny_participant, load_participant
from fedrefine.tasks.multiple_choice import MultipleChoiceItem, encode_question
from fedrefine.tasks.routes import Route
from fedrefine.tasks.scoring import score_encoded
from fedrefine.toyworld import ToyWorld, load_toy_participants

PROMPT_STYLES = ("chat", "lm_eval")
#: FedRefine's normalisation -> lm-eval's metric name.
METRICS = {"sum": "acc", "chars": "acc_norm"}
#: Option shapes: the value alone or in a few more words the toy tokenizers know.
OPTION_SHAPES = ("{v}", "the {v}", "the city of {v}", "{v} is the favourite", "the favourite {v} of {name}")


def models() -> dict[str, Participant]:
    """Two pretrained toy-world participants (word tokenizers, ChatML / Llama-3 templates) and a tiny
    random Qwen3 with a byte-level BPE tokenizer (sub-word boundaries)."""
    toy = load_toy_participants(progress=False)
    tiny = build_tiny_participant(TinySpec("bpe-qwen3", "qwen3", num_layers=2, tokenizer_kind="byte_bpe", seed=7))
    return {"toy-receiver": toy["receiver"], "toy-llama-sender": toy["llama-sender"], "tiny-bpe-qwen3": tiny}


def questions(count: int, seed: int = 0) -> list[MultipleChoiceItem]:
    """Toy-world questions (public and private entities) whose options take one of :data:`OPTION_SHAPES`."""
    world, rng = ToyWorld(), random.Random(seed)
    out = []
    for index, item in enumerate(rng.sample(world.questions(world.names), count)):
        name = item.question_stem.split()[-1].rstrip("?")
        choices = tuple(rng.choice(OPTION_SHAPES).format(v=text, name=name) for text in item.choices)
        out.append(dataclasses.replace(item, id=f"{index}-{item.id}", choices=choices))
    return out


def with_trailing_spaces(items: list[MultipleChoiceItem], participant: Participant) -> tuple[list[MultipleChoiceItem], int]:
    """Every seventh stem ends in two spaces (lm-eval moves them into each continuation), where the
    participant's tokenizer still tells the options apart after them: a word-level tokenizer reads
    "   rabbit" as a run of spaces and an unknown word, and FedRefine refuses options that tokenize alike."""
    out, spaced = [], 0
    for index, item in enumerate(items):
        if index % 7 == 3:
            candidate = dataclasses.replace(item, question_stem=item.question_stem + "  ")
            try:
                for style in PROMPT_STYLES:
                    encode_question(participant, candidate, "text", prompt_style=style)
                item, spaced = candidate, spaced + 1
            except ValueError:
                pass
        out.append(item)
    return out, spaced


def export(participant: Participant, directory: Path) -> Path:
    participant.model.save_pretrained(directory)
    participant.tokenizer.save_pretrained(directory)
    return directory


def task_file(task: str, data_file: Path, prompt_style: str) -> str:
    """An lm-eval task (YAML) on the local file: lm-eval's stock OpenBookQA task, or the same with the
    chat prompt that FedRefine renders as its context."""
    return "\n".join([
        f"task: {task}",
        "dataset_path: json",
        f"dataset_kwargs:\n  data_files:\n    test: {data_file}\n  cache_dir: {data_file.parent / 'datasets'}",
        "output_type: multiple_choice",
        "test_split: test",
        f"doc_to_text: {'question_stem' if prompt_style == 'lm_eval' else 'chat_prompt'}",
        'doc_to_target: "{{choices.label.index(answerKey.lstrip())}}"',
        'doc_to_choice: "{{choices.text}}"',
        "metric_list:",
        *(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true" for m in METRICS.values()),
        "",
    ])


def fedrefine_choices(participant: Participant, items: list[MultipleChoiceItem], prompt_style: str) -> dict[str, Any]:
    """The option FedRefine's evaluation loop chooses per question under each normalisation, and each
    option's summed log-probability."""
    model = FusedReceiver(participant, [], [])
    route = Route("receiver")
    evaluator = Evaluator(model, [route], EvaluationConfig(answer_mode="cloze", prompt_style=prompt_style))
    dataset, chosen = QuestionDataset(items), {}
    for start in range(0, len(items), 16):
        batch = evaluator.encode([dataset[i] for i in range(start, min(start + 16, len(items)))])
        if batch.failures:
            raise RuntimeError(f"FedRefine could not encode {batch.failures}")
        for normalization, picks in evaluator.answer_route(batch, route).cloze_predictions.items():
            chosen.setdefault(normalization, []).extend(picks.tolist())
    encoded = [encode_question(participant, item, "text", prompt_style=prompt_style) for item in items]
    scores = score_encoded(participant, encoded, "text")
    # what chars would choose if it counted the delimiter too (lm-eval does not)
    with_delimiter = (scores.total / (scores.chars + 1)).argmax(-1).tolist()  # (N,)
    return {"chosen": chosen, "totals": scores.total, "with_delimiter": with_delimiter,
            "contexts": [e.chat.text for e in encoded]}


def same_tokenizer(participant: Participant, directory: Path, items: list[MultipleChoiceItem], contexts: list[str]) -> bool:
    """Whether the tokenizer lm-eval loads (``AutoTokenizer``) encodes every context and context + option as
    FedRefine's does (transformers may pick another tokenizer class from the model type)."""
    from transformers import AutoTokenizer

    theirs, ours = AutoTokenizer.from_pretrained(str(directory)), participant.tokenizer
    texts = [c + " " + t for c, item in zip(contexts, items) for t in item.choices] + contexts
    return all(theirs(t)["input_ids"] == ours(t)["input_ids"] for t in texts)


def lm_eval_samples(model_dir: Path, tasks_dir: Path, tasks: list[str], batch_size: int) -> dict[str, list[dict]]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": "float32"},
        tasks=tasks,
        num_fewshot=0,
        batch_size=batch_size,
        device="cpu",
        log_samples=True,
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
    )
    return {task: sorted(results["samples"][task], key=lambda s: s["doc_id"]) for task in tasks}


def lm_eval_choices(samples: list[dict]) -> dict[str, Any]:
    """lm-eval's choice under ``sum`` and ``chars`` from its log-likelihoods (as its metrics compute them),
    and whether they agree with its own per-question acc / acc_norm."""
    totals, chosen, consistent = [], {"sum": [], "chars": []}, True
    for sample in samples:
        lls = torch.tensor([float(resp[0]) for resp in sample["filtered_resps"]], dtype=torch.float64)  # (K,)
        lengths = torch.tensor([float(len(text)) for text in sample["doc"]["choices"]["text"]], dtype=torch.float64)
        picks = {"sum": int(lls.argmax()), "chars": int((lls / lengths).argmax())}
        for normalization, metric in METRICS.items():
            chosen[normalization].append(picks[normalization])
            consistent &= float(sample[metric]) == float(picks[normalization] == sample["target"])
        totals.append(lls)
    return {"chosen": chosen, "totals": totals, "consistent": consistent}


def write_task(tasks_dir: Path, model_name: str, style: str, items: list[MultipleChoiceItem], contexts: list[str]) -> str:
    """The local data file (OpenBookQA schema; chat style: plus FedRefine's rendered prompt) and its task file."""
    data_file = tasks_dir / f"{style}.jsonl"
    with data_file.open("w") as f:
        for item, context in zip(items, contexts):
            row = {"id": item.id, "question_stem": item.question_stem, "answerKey": item.answer_key,
                   "choices": {"text": list(item.choices), "label": list(item.labels)}}
            f.write(json.dumps(row | ({"chat_prompt": context} if style == "chat" else {})) + "\n")
    task = f"agreement_{model_name.replace('-', '_')}_{style}"
    (tasks_dir / f"{task}.yaml").write_text(task_file(task, data_file, style))
    return task


def compare(model_name: str, built: Participant, base: list[MultipleChoiceItem], root: Path, batch_size: int):
    """One model in both prompt styles: its rows and what backs them."""
    directory = export(built, root / model_name)
    participant = load_participant(str(directory))  # FedRefine and lm-eval read the same files
    items, spaced = with_trailing_spaces(base, participant)
    tasks_dir = root / f"{model_name}-tasks"
    tasks_dir.mkdir()
    ours = {style: fedrefine_choices(participant, items, style) for style in PROMPT_STYLES}
    tasks = {style: write_task(tasks_dir, model_name, style, items, ours[style]["contexts"]) for style in PROMPT_STYLES}
    samples = lm_eval_samples(directory, tasks_dir, list(tasks.values()), batch_size)
    rows, details = [], {"stems_ending_in_spaces": spaced}
    for style, task in tasks.items():
        theirs = lm_eval_choices(samples[task])
        for normalization, metric in METRICS.items():
            mine, other = ours[style]["chosen"][normalization], theirs["chosen"][normalization]
            rows.append({
                "model": model_name,
                "normalization": normalization,
                "prompt_style": style,
                "questions": len(items),
                "disagreements": sum(a != b for a, b in zip(mine, other)),
                "fedrefine_accuracy": sum(a == item.answer_index for a, item in zip(mine, items)) / len(items),
                f"lm_eval_{metric}": sum(float(sample[metric]) for sample in samples[task]) / len(items),
            })
            print(json.dumps(rows[-1]))
        details[style] = {
            "disagreeing_questions": {
                n: [item.id for item, a, b in zip(items, ours[style]["chosen"][n], theirs["chosen"][n]) if a != b]
                for n in METRICS
            },
            "max_abs_loglikelihood_difference": max(
                float((t - o[: len(t)].double()).abs().max()) for t, o in zip(theirs["totals"], ours[style]["totals"])
            ),
            "lm_eval_tokenizer_matches": same_tokenizer(participant, directory, items, ours[style]["contexts"]),
            "lm_eval_metrics_match_its_choices": theirs["consistent"],
            # not vacuous: the normalisations choose differently on these questions
            "questions_where_sum_and_chars_choose_differently": sum(
                a != b for a, b in zip(theirs["chosen"]["sum"], theirs["chosen"]["chars"])
            ),
            # lm-eval's acc_norm divides by the option text's length, not by the continuation's (" " + text)
            "chars_counting_the_delimiter_disagreements": sum(
                a != b for a, b in zip(ours[style]["with_delimiter"], theirs["chosen"]["chars"])
            ),
        }
    return rows, details


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32, help="lm-eval's batch size")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/results/lm_eval_agreement.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import lm_eval

    started = time.perf_counter()
    base = questions(args.questions)
    rows, details = [], {}
    with tempfile.TemporaryDirectory(prefix="lm_eval_agreement_") as tmp:
        for model_name, built in models().items():
            model_rows, details[model_name] = compare(model_name, built, base, Path(tmp), args.batch_size)
            rows.extend(model_rows)
    payload = {
        "command": script_command(),
        "commit": git_commit(),
        "lm_eval_version": lm_eval.__version__,
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
        "details": details,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out} in {payload['seconds']} s")


if __name__ == "__main__":
    main()
