"""Does a change leave results exactly as they were? The same toy-world runs at two commits, side by side.

    python benchmarks/reproduce.py --base a3e8022 [--seeds 0]

For each commit (``--base`` and the working tree), in that order and one at a time:
``benchmarks/toyworld.py --seeds ...`` (fit + test per sender) and the README's main command
(``fedrefine-toy``), each in its own process with the commit's own ``src`` first on the path.
Compares every accuracy row and the SHA-256 of every exported fuser; writes
``benchmarks/results/reproduce.{json,md}`` (default ``--out``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from fedrefine.bench.records import commit_checkout, git_commit, markdown_table, script_command, write_results

REPO = Path(__file__).resolve().parents[1]
TOY_TABLE_ROUTES = ("receiver", "sender", "c2c", "c2c_mismatched", "c2c_random_kv", "c2c_reordered")


def run_at(checkout: Path, seeds: list[str], work: Path) -> dict:
    """Both runs in ``checkout`` (its own sources), with their outputs under ``work``."""
    env = {**os.environ, "PYTHONPATH": str(checkout / "src"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    toy_out = work / "toyworld"
    subprocess.run(
        [sys.executable, "benchmarks/toyworld.py", "--seeds", *seeds, "--root", str(work / "runs"), "--out", str(toy_out)],
        cwd=checkout, env=env, check=True, capture_output=True,
    )
    main_dir = work / "main"
    subprocess.run(
        ["fedrefine-toy", "--trainer.default_root_dir", str(main_dir), "--trainer.logger", "false",
         "--model.export_dir", str(main_dir / "fuser")],
        cwd=checkout, env=env, check=True, capture_output=True,
    )
    main_rows = json.loads((main_dir / "test_results.json").read_text())["rows"]
    fusers = {
        str(path.parent.relative_to(work)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(work.rglob("fuser.safetensors"))
    }
    toy_rows = [{k: v for k, v in row.items() if k != "seconds"} for row in json.loads(toy_out.with_suffix(".json").read_text())["runs"]]
    return {
        "toyworld_rows": toy_rows,
        "main_command": {row["route"]: row["accuracy"] for row in main_rows},
        "fuser_sha256": fusers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit to compare the working tree against")
    parser.add_argument("--seeds", nargs="+", default=["0"])
    parser.add_argument("--out", default="benchmarks/results/reproduce")
    args = parser.parse_args()
    with commit_checkout(REPO, args.base, "fedrefine-reproduce-") as (base_tree, scratch):
        base = run_at(base_tree, args.seeds, scratch / "base")
        head = run_at(REPO, args.seeds, scratch / "head")
    same = {
        "toyworld rows": base["toyworld_rows"] == head["toyworld_rows"],
        "main command accuracies": base["main_command"] == head["main_command"],
        "fuser bytes": base["fuser_sha256"] == head["fuser_sha256"],
    }
    command, commit = script_command(), git_commit()
    payload = {"command": command, "commit": commit, "base": args.base, "base_run": base, "head_run": head, "identical": same}
    rows = [[f"`{name}`", f"{100 * base['main_command'][name]:.2f}%", f"{100 * head['main_command'][name]:.2f}%"]
            for name in TOY_TABLE_ROUTES]
    toy = [[r["sender"], r["seed"], *(f"{100 * r[k]:.1f}%" for k in ("c2c", "control_mismatched", "control_random_kv"))]
           for r in head["toyworld_rows"]]
    lines = [
        f"# Reproduction: `{args.base}` vs `{commit}`", "",
        f"Command: `{command}` at commit `{commit}` (CPU). Both commits run one after the other on the same machine.", "",
        "## README main command (`fedrefine-toy`), held-out accuracy", "",
        *markdown_table(["route", f"at {args.base}", f"at {commit}"], rows), "",
        "## `benchmarks/toyworld.py` at the working tree (rows compared field by field with the base)", "",
        *markdown_table(["sender", "seed", "c2c", "control_mismatched", "control_random_kv"], toy), "",
        "## Identical", "",
        *(f"- [{'x' if ok else ' '}] {name}" for name, ok in same.items()),
        f"- fusers compared: {len(head['fuser_sha256'])}", "",
    ]
    write_results(args.out, payload, "\n".join(lines))


if __name__ == "__main__":
    main()
