"""Provenance and result files shared by ``fedrefine bench`` and the scripts under ``benchmarks/``."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def git_commit() -> str | None:
    """The short commit of the working tree, or None outside git.

    ``+dirty`` is added when tracked files other than ``benchmarks/results/`` changed: results that earlier
    benchmarks of the same chain wrote do not change the code that measures.
    """
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"],
                               capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def script_command() -> str:
    """How the running benchmark script was invoked (``python benchmarks/x.py --flag ...``), quoted for a shell
    (an argument with spaces or brackets stays one argument when the line is pasted back)."""
    return shlex.join(["python", *sys.argv])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Lines of a markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(value) for value in row) + " |" for row in rows
    ]


def write_results(out: str | Path, payload: dict[str, Any], markdown: str) -> None:
    """``<out>.json`` (the payload) and ``<out>.md``, creating the directory; the markdown is printed too."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown)


@contextmanager
def commit_checkout(repo: Path, commit: str, prefix: str = "fedrefine-") -> Iterator[tuple[Path, Path]]:
    """``(checkout, scratch)``: a detached git worktree of ``commit`` (to run an earlier commit's code beside the
    working tree's), and a scratch directory beside it; both are removed afterwards."""
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    checkout = scratch / "base-tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(checkout), commit], cwd=repo, check=True, capture_output=True)
    try:
        yield checkout, scratch
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(checkout)], cwd=repo, capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)
