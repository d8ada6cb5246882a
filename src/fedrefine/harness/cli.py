"""``fedrefine eval-harness [lm-eval arguments]`` (also ``python -m fedrefine.harness``): lm-eval's own command line
(``--tasks``, ``--num_fewshot``, ``--apply_chat_template``, ``--system_instruction``, ``--include_path``, ``--limit``,
``--batch_size``, ``--output_path``, ``--log_samples`` ...) with the ``fedrefine`` model registered and chosen unless
``--model`` says otherwise; ``fedrefine eval-harness toy-tasks DIR`` writes the toy world's tasks for
``--include_path DIR``.

    fedrefine eval-harness --model_args config=configs/toyworld_federation_gated.yaml,route=c2c \\
        --tasks fedrefine_toy_mc --include_path runs/toy_tasks --apply_chat_template
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fedrefine.harness import register
from fedrefine.harness.contexts import FormatError
from fedrefine.harness.toy_tasks import SPLITS, write_toy_tasks
from fedrefine.settings import SettingsError
from fedrefine.tasks.routes import RouteError

PROG = "fedrefine eval-harness"
#: Mistakes shown as one line (the adapter's refusals, a missing config or lm-eval).
USER_ERRORS = (FormatError, RouteError, SettingsError, FileNotFoundError, ImportError)


def toy_tasks(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog=f"{PROG} toy-tasks", description="Write the toy world's lm-eval tasks.")
    parser.add_argument("directory", help="where the task YAMLs and their data go (then --include_path DIRECTORY)")
    parser.add_argument("--split", default="held_out", choices=SPLITS, help="which entities the questions ask about")
    parser.add_argument("--limit", type=int, default=None, help="at most this many questions")
    args = parser.parse_args(argv)
    for task, path in write_toy_tasks(args.directory, args.split, args.limit).items():
        print(f"{task}: {path}")


def lm_eval_argv(argv: Sequence[str]) -> list[str]:
    """lm-eval's ``run`` arguments: the model ``fedrefine`` unless one is named."""
    argv = list(argv)
    if argv[:1] == ["run"]:
        argv = argv[1:]
    if not any(a == "--model" or a.startswith("--model=") for a in argv):
        argv = ["--model", "fedrefine", *argv]
    return ["run", *argv]


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["toy-tasks"]:
            return toy_tasks(argv[1:])
        register()
        from lm_eval.__main__ import cli_evaluate

        sys.argv = ["lm-eval", *lm_eval_argv(argv)]
        cli_evaluate()
    except Exception as err:  # noqa: BLE001 - a user mistake is shown alone, anything else re-raised as it is
        cause, seen = err, 0
        while cause is not None and not isinstance(cause, USER_ERRORS) and seen < 20:
            cause, seen = cause.__cause__ or cause.__context__, seen + 1
        if cause is None or not isinstance(cause, USER_ERRORS):
            raise
        print(f"{PROG}: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None
