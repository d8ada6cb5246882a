"""The toy world as lm-eval tasks over local files, found with ``--include_path DIR``:

- ``fedrefine_toy_mc`` (``multiple_choice``): FedRefine's question prompt (question, lettered options, instruction)
  as ``doc_to_text``, the answer prefix as ``gen_prefix``, each option scored as ``" " + text``; ``acc`` and
  ``acc_norm``, as ``fedrefine test`` scores cloze questions;
- ``fedrefine_toy_gen`` (``generate_until``): the same prompt, the answer generated after the prefix up to ``"."``,
  exact match with the option text.

With ``--apply_chat_template`` the prompt is the chat conversation the toy fusers were trained on (the user message,
then the answer prefix as an assistant prefill). The questions are about the held-out entities of every private group
(``fedrefine test``'s ``all_held_out`` split) or the public ones.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedrefine.tasks.multiple_choice import ANSWER_PREFIX, MultipleChoiceItem, question_text
from fedrefine.toyworld import ToyWorld

MC_TASK, GEN_TASK = "fedrefine_toy_mc", "fedrefine_toy_gen"
SPLITS = ("held_out", "public")


def toy_rows(split: str = "held_out", limit: int | None = None) -> list[dict]:
    """OpenBookQA rows of the toy world's ``split``, each with FedRefine's prompt (``prompt``), the option texts
    (``options``), the correct one's index (``gold``) and text (``answer``): fields the task YAMLs name directly, so
    that lm-eval renders no template per document."""
    if split not in SPLITS:
        raise ValueError(f"Unknown toy split {split!r}; choose one of {list(SPLITS)}.")
    world = ToyWorld()
    rows = world.eval_rows() if split == "held_out" else world.question_rows(world.public)
    out = []
    for row in rows[:limit]:
        item = MultipleChoiceItem.from_row(row)
        out.append({**row, "prompt": question_text(item, "text"), "options": list(item.choices),
                    "gold": item.answer_index, "answer": item.choices[item.answer_index]})
    return out


def _task_yaml(task: str, data_file: Path, body: list[str]) -> str:
    return "\n".join([
        f"task: {task}",
        "dataset_path: json",
        f"dataset_kwargs:\n  data_files:\n    test: {data_file}\n  cache_dir: {data_file.parent / 'datasets'}",
        "test_split: test",
        "doc_to_text: prompt",
        f"gen_prefix: {ANSWER_PREFIX}",
        *body,
        "",
    ])


def write_toy_tasks(directory: str | Path, split: str = "held_out", limit: int | None = None) -> dict[str, Path]:
    """Write the toy tasks' data (``toy_<split>.jsonl``) and YAMLs into ``directory``; returns task -> YAML."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    data_file = directory / f"toy_{split}.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in toy_rows(split, limit)))
    bodies = {
        MC_TASK: [
            "output_type: multiple_choice",
            "doc_to_choice: options",
            "doc_to_target: gold",
            "metric_list:",
            *(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true" for m in ("acc", "acc_norm")),
        ],
        GEN_TASK: [
            "output_type: generate_until",
            "doc_to_target: answer",
            "generation_kwargs:\n  until: [\".\", \"\\n\"]\n  max_gen_toks: 8\n  do_sample: false",
            "filter_list:\n  - name: strip\n    filter:\n      - function: remove_whitespace\n      - function: take_first",
            "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
            "    ignore_case: true\n    ignore_punctuation: true",
        ],
    }
    paths = {}
    for task, body in bodies.items():
        paths[task] = directory / f"{task}.yaml"
        paths[task].write_text(_task_yaml(task, data_file, body))
    return paths
