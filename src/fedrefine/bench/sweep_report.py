"""A finished sweep's outputs: CSV, markdown table, the Fig. 3 plots, and the same in a logger (W&B).

- Fig. 3a: accuracy vs number of senders, one line per route x query mode (0 = receiver alone);
- Fig. 3b: point-to-point, C2C vs T2T for each single sender (original queries);
- Fig. 3c: latency per question of each route and query mode, stacked by stage, beside the bytes each sender
  sent per prompt token (all senders).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from rich.console import Console  # noqa: E402

from fedrefine.bench.cells import ROUTES  # noqa: E402
from fedrefine.evaluation.metrics import STAGES  # noqa: E402
from fedrefine.evaluation.report import log_table  # noqa: E402

CSV_COLUMNS = (
    "route", "query_mode", "senders", "n_senders", "status", "accuracy", "ci_low", "ci_high", "receiver_accuracy",
    "latency_s", *(f"{stage}_s" for stage in STAGES), "bytes_per_token", "bytes_per_token_by_sender",
    "bytes_per_question", "leakage_overlap", "leakage_private_tokens", "rephrasings_unfaithful", "n_questions",
    "failed", "gated",
)
ROUTE_LABELS = {"receiver": "receiver alone", "c2c.residual": "KV (C2C residual)", "c2c.concat": "KV (C2C concat)",
                "t2t": "Token (T2T)"}
MODE_STYLES = {"original": "-", "shared": "--", "private": ":"}
ROUTE_COLOURS = {"c2c.residual": "tab:blue", "c2c.concat": "tab:orange", "t2t": "tab:green"}


def with_baselines(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with ``receiver_accuracy``: the receiver alone on the same questions and query mode."""
    alone = {r["query_mode"]: r.get("accuracy") for r in rows if r["route"] == "receiver" and r["status"] == "ok"}
    return [{**row, "receiver_accuracy": alone.get(row["query_mode"])} for row in rows]


def table_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row's :data:`CSV_COLUMNS`, scalars only (None where a cell has no value)."""
    by_sender = row.get("sender_bytes_per_token") or {}
    flat = {**row, "bytes_per_token_by_sender": ";".join(f"{s}:{b:g}" for s, b in by_sender.items())}
    return {column: flat.get(column) for column in CSV_COLUMNS}


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in table_row(row).items()} for row in rows)


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def markdown(rows: Sequence[dict[str, Any]], title: str, command: str, commit: str | None, notes: str = "") -> str:
    """The sweep as a markdown table (unsupported cells listed with their reason)."""
    n_questions = max((r.get("n_questions", 0) for r in rows), default=0)
    lines = [
        f"# {title}", "",
        f"Command: `{command}` at {_commit_text(commit)} (cells computed at {_commits(rows)}). {n_questions} questions "
        "per cell; accuracy in %, 95% Wilson interval; latency in seconds per question (transfer modelled from the "
        "bytes sent); bytes per prompt token summed over senders (C2C: exact K/V bytes of the carried layers; T2T: "
        "token-id bytes).", "",
    ]
    if notes:
        lines += [notes, ""]
    stage_header = " | ".join(STAGES)
    lines += [
        f"| route | query | senders | accuracy | 95% CI | receiver alone | latency | {stage_header} | bytes/token |",
        "|---|---|---|---|---|---|---|" + "---|" * len(STAGES) + "---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            continue
        stages = " | ".join(f"{r[f'{stage}_s']:.4f}" for stage in STAGES)
        lines.append(
            f"| {r['route']}{' (pairwise)' if r.get('gated') is False else ''} | {r['query_mode']} | {r['senders'] or '-'} | {_pct(r['accuracy'])} | "
            f"{_pct(r['ci_low'])}-{_pct(r['ci_high'])} | {_pct(r['receiver_accuracy'])} | {r['latency_s']:.4f} | "
            f"{stages} | {r['bytes_per_token']:g} |"
        )
    if any(r.get("gated") is False for r in rows):
        lines += ["", "(pairwise): a lone sender fused through its fuser alone, not the mode's gate (`gate_singles: false`)."]
    skipped = [r for r in rows if r["status"] != "ok"]
    if skipped:
        lines += ["", f"{len(skipped)} cell(s) cannot run and were not evaluated:", ""]
        reasons = defaultdict(list)
        for r in skipped:
            reasons[r["reason"]].append(f"{r['route']}@{r['query_mode']}:{r['senders']}")
        lines += [f"- {', '.join(cells)}: {reason}" for reason, cells in reasons.items()]
    failed = sum(r.get("failed", 0) for r in rows if r["status"] == "ok")
    if failed:
        lines += ["", f"{failed} question evaluation(s) could not be encoded and count as wrong (ids in the JSON)."]
    return "\n".join(lines) + "\n"


def _commit_text(commit: str | None) -> str:
    return f"commit `{commit}`" if commit else "no commit (not a git checkout)"


def _commits(rows: Sequence[dict[str, Any]]) -> str:
    commits = sorted({f"`{r['commit']}`" if r.get("commit") else "no commit" for r in rows if r["status"] == "ok"})
    return ", ".join(commits) or "none"


def _ok(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == "ok"]


def plot_accuracy_vs_senders(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Fig. 3a: mean accuracy over the evaluated subsets of each size; 0 senders is the receiver alone."""
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    ok = _ok(rows)
    for route in ROUTES:
        for mode, style in MODE_STYLES.items():
            cells = [r for r in ok if r["route"] == route and r["query_mode"] == mode]
            if not cells:
                continue
            by_size = defaultdict(list)
            for r in cells:
                by_size[r["n_senders"]].append(r["accuracy"])
            baseline = [r["accuracy"] for r in ok if r["route"] == "receiver" and r["query_mode"] == mode]
            if baseline:
                by_size[0] = baseline
            sizes = sorted(by_size)
            axes.plot(sizes, [100 * sum(by_size[n]) / len(by_size[n]) for n in sizes], style, marker="o",
                      color=ROUTE_COLOURS[route], label=f"{ROUTE_LABELS[route]}, {mode}")
    axes.set_xlabel("number of senders (0 = receiver alone)")
    axes.set_ylabel("accuracy (%), mean over the subsets of that size")
    axes.set_title("Accuracy vs number of senders")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, handlelength=4)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_point_to_point(rows: Sequence[dict[str, Any]], senders: Sequence[str], path: Path) -> None:
    """Fig. 3b: per single sender, C2C (each fusion mode) vs T2T on original queries, with 95% intervals."""
    ok = [r for r in _ok(rows) if r["query_mode"] == "original"]
    routes = [route for route in ROUTES if any(r["route"] == route for r in ok)]
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    width = 0.8 / max(1, len(routes))
    for i, route in enumerate(routes):
        cells = {r["senders"]: r for r in ok if r["route"] == route and r["n_senders"] == 1}
        xs = [k + (i - (len(routes) - 1) / 2) * width for k, s in enumerate(senders) if s in cells]
        values = [cells[s] for s in senders if s in cells]
        heights = [100 * r["accuracy"] for r in values]
        errors = [[h - 100 * r["ci_low"] for h, r in zip(heights, values)],
                  [100 * r["ci_high"] - h for h, r in zip(heights, values)]]
        label = ROUTE_LABELS[route] + (", pairwise" if any(r.get("gated") is False for r in values) else "")
        axes.bar(xs, heights, width, yerr=errors, capsize=3, color=ROUTE_COLOURS[route], label=label)
    alone = [r["accuracy"] for r in ok if r["route"] == "receiver"]
    if alone:
        axes.axhline(100 * alone[0], color="black", linestyle="--", linewidth=1, label="receiver alone")
    axes.set_xticks(range(len(senders)), senders)
    axes.set_ylabel("accuracy (%)")
    axes.set_title("Point-to-point: C2C vs T2T per sender (original queries)")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_latency(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Fig. 3c: seconds per question of each route x query mode with the most senders, stacked by stage, and
    beside it the bytes each sender sent per prompt token."""
    ok = _ok(rows)
    most = max((r["n_senders"] for r in ok), default=0)
    cells = [r for r in ok if r["route"] == "receiver" or r["n_senders"] == most]
    figure, (latency, sent) = plt.subplots(1, 2, figsize=(11.5, 4.4), gridspec_kw={"width_ratios": [3, 2]})
    labels = [f"{ROUTE_LABELS[r['route']]}\n{r['query_mode']}" for r in cells]
    bottom = [0.0] * len(cells)
    for stage in STAGES:
        heights = [1000 * r[f"{stage}_s"] for r in cells]
        latency.bar(range(len(cells)), heights, bottom=bottom, label=stage)
        bottom = [b + h for b, h in zip(bottom, heights)]
    latency.set_xticks(range(len(cells)), labels, fontsize=6, rotation=45, ha="right")
    latency.set_ylabel("latency per question (ms)")
    latency.set_title(f"Latency per route and query mode ({most} sender(s))", fontsize=9)
    latency.legend(fontsize=7)
    sending = [r for r in cells if r.get("sender_bytes_per_token")]
    senders = list(dict.fromkeys(s for r in sending for s in r["sender_bytes_per_token"]))
    width = 0.8 / max(1, len(senders))
    for i, sender in enumerate(senders):  # side by side, not stacked: the axis is logarithmic
        xs = [k + (i - (len(senders) - 1) / 2) * width for k in range(len(sending))]
        sent.bar(xs, [r["sender_bytes_per_token"].get(sender, 0.0) for r in sending], width, label=sender)
    sent.set_xticks(range(len(sending)), [f"{ROUTE_LABELS[r['route']]}\n{r['query_mode']}" for r in sending],
                    fontsize=6, rotation=45, ha="right")
    sent.set_yscale("log")  # K/V bytes and token-id bytes differ by orders of magnitude
    sent.set_ylabel("bytes sent per prompt token")
    sent.set_title("Bytes per prompt token, each sender", fontsize=9)
    if senders:
        sent.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_reports(
    rows: Sequence[dict[str, Any]],
    output_dir: Path,
    name: str,
    plot_prefix: str,
    receiver: str,
    senders: Sequence[str],
    command: str,
    commit: str | None,
    logger: Any = None,
    console: Console | None = None,
) -> dict[str, Path]:
    """Write ``<name>.csv``, ``<name>.md`` and the three plots (``<plot_prefix>a/b/c.png``); log them to ``logger``."""
    rows = with_baselines(rows)
    console = console or Console()
    paths = {
        "csv": output_dir / f"{name}.csv",
        "markdown": output_dir / f"{name}.md",
        "fig3a": output_dir / f"{plot_prefix}a.png",
        "fig3b": output_dir / f"{plot_prefix}b.png",
        "fig3c": output_dir / f"{plot_prefix}c.png",
    }
    write_csv(rows, paths["csv"])
    title = f"Sweep {name}: {' + '.join(senders)} -> {receiver}"
    paths["markdown"].write_text(markdown(rows, title, command, commit))
    plot_accuracy_vs_senders(rows, paths["fig3a"])
    plot_point_to_point(rows, senders, paths["fig3b"])
    plot_latency(rows, paths["fig3c"])
    if logger is not None:
        log_to(logger, name, rows, paths)
    console.print(paths["markdown"].read_text())
    console.print("Wrote " + ", ".join(str(p) for p in paths.values()))
    return paths


def log_to(logger: Any, name: str, rows: Sequence[dict[str, Any]], paths: dict[str, Path]) -> None:
    """The table and plots into a logger with ``log_table`` / ``log_image`` (W&B); others get metrics per cell."""
    if hasattr(logger, "log_table"):
        log_table([logger], f"bench/{name}", [table_row(r) for r in rows], CSV_COLUMNS)
        for key in ("fig3a", "fig3b", "fig3c"):
            logger.log_image(key=f"bench/{key}", images=[str(paths[key])])
    else:
        for row in _ok(rows):
            cell = f"{row['route']}@{row['query_mode']}:{row['senders'] or '-'}"
            logger.log_metrics({f"bench/{cell}/accuracy": row["accuracy"], f"bench/{cell}/latency_s": row["latency_s"],
                                f"bench/{cell}/bytes_per_token": row["bytes_per_token"]})
    logger.finalize("success")
    experiment = getattr(logger, "experiment", None)
    if hasattr(experiment, "finish"):  # a W&B run: flush it now, not at interpreter exit
        experiment.finish()
