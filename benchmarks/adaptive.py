"""Adaptive C2C/T2T route vs every fixed route over link rates and latency budgets (issue "KV message codecs...").

    python benchmarks/adaptive.py [--profile benchmarks/results/adaptive_profile.json] [--rates 1 10 100 1000]
                                  [--rtt 0.02] [--budgets 0.1 0.5 2] [--out benchmarks/results/adaptive]
    python benchmarks/adaptive.py --synthetic    # smoke run on a made-up profile, written under runs/

Reads a profile (:mod:`fedrefine.federation.adaptive`: held-out questions, and per route option its development
accuracy, per-question correctness and bytes, compute seconds and round trips), then at each link rate
(with one round-trip time) and each budget scores the adaptive policy and every fixed option:

- ``accuracy``: correct answers / questions, a late answer counted with its correctness;
- ``accuracy_within_budget``: answers that are correct AND within the budget / questions (late = wrong);
- ``share_within_budget``: questions whose predicted latency is <= the budget / questions;
- mean bytes and mean predicted latency per question.

Budgets (unless ``--budgets`` gives one list for every rate): at each rate, every option's median and
largest predicted latency over the questions, rounded up to 3 significant digits: from "only the
fastest option (the receiver) fits" to "every option fits every question".

The bar, per link rate, at every budget: the adaptive policy's share within the budget is >= that of
the best fixed route by that share, and its accuracy_within_budget is >= the accuracy of the best fixed
route that *meets the budget* (every question within it) minus 1 point; when no fixed route meets the
budget the accuracy half holds vacuously. Writes ``<out>.json``, ``<out>.md`` and ``<out>.png``.

``--dev-margin M`` makes the policy treat development accuracies within M of the best fitting option
as a tie (fewer bytes wins); the default 0 is the plain rule (highest development accuracy).

``--synthetic`` builds a clearly labelled synthetic profile (no measurement) for a smoke run; its
results go under runs/ and are refused under benchmarks/results.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from fedrefine.federation.adaptive import (  # noqa: E402
    ACCURACY_TOLERANCE,
    LINK_RATES_MBIT_PER_S,
    AdaptiveProfile,
    LinkProfile,
    ProfileError,
    ProfileQuestion,
    RouteOption,
    SweepResult,
    load_profile,
    predicted_latency_s,
    profile_to_dict,
    sweep,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
DEFINITIONS = {
    "latency_s": "compute_s + round_trips * rtt_s + bytes * 8 / (mbit_per_s * 1e6), per question",
    "accuracy": "correct answers / questions; an answer that arrives after the budget counts with its correctness",
    "accuracy_within_budget": "answers both correct and within the budget / questions; late answers count as wrong",
    "share_within_budget": "questions whose latency is <= the budget / questions",
    "meets_the_budget": "a fixed route meets the budget when every question is within it (share_within_budget = 1)",
    "budgets": "unless given: per rate, each option's median and largest latency over the questions, rounded up "
    "to 3 significant digits (from 'only the fastest option fits' to 'everything fits')",
    "bar": "per link rate, at every budget: adaptive share_within_budget >= the best fixed route's, and adaptive "
    "accuracy_within_budget >= accuracy of the most accurate fixed route meeting the budget - 1 point "
    "(vacuous when none meets it)",
}


# ----------------------------------------------------------------------------- provenance


def git_head() -> tuple[str | None, bool]:
    """``git rev-parse HEAD`` and whether tracked files differ from it (None outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=REPO)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, cwd=REPO)
    except (OSError, subprocess.CalledProcessError):
        return None, False
    return head.stdout.strip(), bool(status.stdout.strip())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- synthetic profile


def synthetic_profile(questions: int = 200, seed: int = 0) -> AdaptiveProfile:
    """A made-up profile with plausible sizes (a 28-layer sender, 8 KV heads of 128) and made-up accuracies.

    Correctness follows one latent difficulty per question (an option answers when the question is easy
    enough for its accuracy), so that the options' held-out accuracies track their development ones.
    """
    rng = np.random.default_rng(seed)
    layers, kv_heads, head_dim = 28, 8, 128
    sender_tokens = rng.integers(40, 200, size=questions)
    receiver_tokens = sender_tokens + rng.integers(5, 20, size=questions)
    hint_tokens = rng.integers(16, 64, size=questions)
    difficulty = rng.random(questions)

    def kv_bytes(bits: int, layer_budget: float | None) -> list[int]:
        sent_layers = round(layers * (layer_budget or 1.0))
        per_token = sent_layers * 2 * kv_heads * head_dim * bits // 8
        scales = sent_layers * 2 * kv_heads * 4 if bits < 32 else 0  # one fp32 scale per head, K and V
        return [int(t) * (per_token + scales) + 64 for t in sender_tokens]  # + a header

    # name, route, codec, layer budget, dev accuracy, bytes, compute seconds
    spec = [
        ("receiver", "receiver", None, None, 0.30, [0] * questions, 0.05),
        ("t2t", "t2t", None, None, 0.58, [int(t) * 4 + 64 for t in hint_tokens], 1.20),
        ("c2c/fp32/all", "c2c", "fp32", None, 0.87, kv_bytes(32, None), 0.12),
        ("c2c/int8/all", "c2c", "int8", None, 0.865, kv_bytes(8, None), 0.13),
        ("c2c/int4/all", "c2c", "int4", None, 0.84, kv_bytes(4, None), 0.13),
        ("c2c/int4/0.5", "c2c", "int4", 0.5, 0.72, kv_bytes(4, 0.5), 0.11),
    ]
    options = []
    for name, route, codec, layer_budget, dev_accuracy, nbytes, compute_s in spec:
        held_out = np.clip(dev_accuracy + rng.normal(0, 0.01), 0, 1)
        noisy = np.clip(difficulty + rng.normal(0, 0.02, size=questions), 0, 1)
        options.append(RouteOption(
            name=name, route=route, codec=codec, layer_budget=layer_budget, dev_accuracy=dev_accuracy,
            correct=tuple(bool(d < held_out) for d in noisy), bytes=tuple(nbytes), compute_s=compute_s,
            round_trips=0 if route == "receiver" else 1,
        ))
    qs = tuple(ProfileQuestion(f"synthetic-{i}", int(r), {"sender": int(s)})
               for i, (r, s) in enumerate(zip(receiver_tokens, sender_tokens)))
    notes = f"SYNTHETIC: made up by benchmarks/adaptive.py --synthetic (seed {seed}); not a measurement."
    return AdaptiveProfile(qs, tuple(options), synthetic=True, notes=notes, source="<synthetic>")


# ----------------------------------------------------------------------------- report


def option_summary(profile: AdaptiveProfile, rate: float, rtt_s: float) -> list[dict]:
    link = LinkProfile(mbit_per_s=rate, rtt_s=rtt_s)
    summary = []
    for o in profile.options:
        latencies = sorted(predicted_latency_s(o, i, link) for i in range(len(profile.questions)))
        summary.append({
            "option": o.name, "dev_accuracy": o.dev_accuracy, "held_out_accuracy": sum(o.correct) / len(o.correct),
            "mean_bytes": sum(o.bytes) / len(o.bytes), "median_latency_s": latencies[(len(latencies) - 1) // 2],
            "max_latency_s": latencies[-1],
        })
    return summary


def percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(v) for v in row) + " |" for row in rows
    ]


def markdown(payload: dict, result: SweepResult) -> str:
    profile = payload["profile"]
    lines = ["# Adaptive route: receiver / T2T / C2C per query within a latency budget", ""]
    if profile["synthetic"]:
        lines += ["> **SYNTHETIC PROFILE: made-up numbers for a smoke run, not a measurement. Do not cite.**", ""]
    lines += [
        f"Command: `{payload['command']}` at commit `{payload['commit']}`{' (dirty)' if payload['dirty'] else ''}.",
        f"Profile: `{profile['path']}` (sha256 `{profile['sha256'][:16]}…`, {profile['questions']} held-out "
        f"questions, {len(profile['options'])} options); rtt {payload['rtt_s']} s; policy's development-accuracy "
        f"tie margin {payload['dev_accuracy_margin']:g}.",
        "",
        "Definitions:",
        "",
        *[f"- **{k}**: {v}" for k, v in DEFINITIONS.items()],
        "",
    ]
    rows_by_cell = {(r.mbit_per_s, r.budget_s, r.policy): r for r in result.rows}
    for verdict in result.verdicts:
        rate = verdict.mbit_per_s
        lines += [f"## {rate:g} Mbit/s", ""]
        summary = payload["options_by_rate"][f"{rate:g}"]
        lines += table(
            ["option", "dev acc", "held-out acc", "mean bytes", "median latency", "max latency"],
            [[s["option"], percent(s["dev_accuracy"]), percent(s["held_out_accuracy"]), human_bytes(s["mean_bytes"]),
              f"{s['median_latency_s']:.3g} s", f"{s['max_latency_s']:.3g} s"] for s in summary],
        )
        lines.append("")
        body = []
        for b in verdict.budgets:
            a = rows_by_cell[(rate, b.budget_s, "adaptive")]
            choices = ", ".join(f"{name} {count}" for name, count in sorted(a.choices.items(), key=lambda x: -x[1]))
            meeting = (f"{b.best_fixed_meeting_budget} {percent(b.best_fixed_accuracy)}"
                       if b.best_fixed_meeting_budget else "none")
            body.append([
                f"{b.budget_s:.3g} s", percent(a.accuracy), percent(a.accuracy_within_budget),
                percent(a.share_within_budget), human_bytes(a.mean_bytes), choices,
                f"{b.best_fixed_by_share} {percent(b.best_fixed_share)}", meeting, "yes" if b.holds else "**no**",
            ])
        lines += table(
            ["budget", "adaptive acc", "acc in budget", "share in budget", "bytes", "choices",
             "best fixed by share", "best fixed meeting budget (acc)", "bar"],
            body,
        )
        lines.append("")
    lines += ["## Bar", ""] + [
        f"- [{'x' if v.holds else ' '}] {v.mbit_per_s:g} Mbit/s: at every budget, adaptive share within budget >= "
        f"the best fixed route's, and its accuracy within {100 * result.accuracy_tolerance:g} point of the best "
        "fixed route meeting the budget"
        for v in result.verdicts
    ]
    return "\n".join(lines) + "\n"


def plot(result: SweepResult, out: Path, synthetic: bool) -> None:
    rates = [v.mbit_per_s for v in result.verdicts]
    policies = list(dict.fromkeys(r.policy for r in result.rows))
    metrics = [("accuracy", "accuracy (late answers count)"), ("accuracy_within_budget", "accuracy (late = wrong)"),
               ("share_within_budget", "share within budget")]
    fig, axes = plt.subplots(len(metrics), len(rates), figsize=(4 * len(rates), 3.2 * len(metrics)),
                             squeeze=False, sharey="row")
    colors = plt.get_cmap("tab10")
    for column, rate in enumerate(rates):
        for row, (metric, label) in enumerate(metrics):
            ax = axes[row][column]
            for index, policy in enumerate(policies):
                cells = sorted((r.budget_s, getattr(r, metric)) for r in result.rows
                               if r.mbit_per_s == rate and r.policy == policy)
                adaptive = policy == "adaptive"
                ax.plot([c[0] for c in cells], [100 * c[1] for c in cells], marker="o" if adaptive else ".",
                        color="black" if adaptive else colors(index % 10), linewidth=2.5 if adaptive else 1,
                        label=policy, zorder=3 if adaptive else 2, alpha=1 if adaptive else 0.8)
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"{rate:g} Mbit/s")
            if row == len(metrics) - 1:
                ax.set_xlabel("latency budget (s)")
            if column == 0:
                ax.set_ylabel(f"{label} (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(policies), fontsize=8, frameon=False)
    title = "Adaptive route vs fixed routes"
    fig.suptitle(title + (" — SYNTHETIC PROFILE, NOT A MEASUREMENT" if synthetic else ""),
                 color="red" if synthetic else "black")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="benchmarks/results/adaptive_profile.json",
                        help="a fedrefine.adaptive_profile JSON (written by the latency benchmark)")
    parser.add_argument("--synthetic", action="store_true",
                        help="smoke run on a made-up profile (written next to the results, under runs/)")
    parser.add_argument("--rates", type=float, nargs="+", default=list(LINK_RATES_MBIT_PER_S),
                        help="link rates in Mbit/s")
    parser.add_argument("--rtt", type=float, default=0.02, help="round-trip time to the senders, seconds")
    parser.add_argument("--budgets", type=float, nargs="+", default=None,
                        help="latency budgets in seconds, the same at every rate (default: derived per rate)")
    parser.add_argument("--dev-margin", type=float, default=0.0,
                        help="development accuracies within this of the best fitting option count as a tie, "
                        "fewer bytes wins (default 0: exact ties only)")
    parser.add_argument("--out", default=None,
                        help="output stem (default benchmarks/results/adaptive; runs/benchmarks/adaptive_synthetic/"
                        "adaptive with --synthetic)")
    args = parser.parse_args()

    if args.synthetic:
        out = Path(args.out or "runs/benchmarks/adaptive_synthetic/adaptive")
        if out.resolve().is_relative_to(RESULTS):
            parser.error(f"--synthetic results must not go under {RESULTS} (they are no measurement); "
                         "drop --out or point it under runs/.")
        out.parent.mkdir(parents=True, exist_ok=True)
        profile = synthetic_profile()
        profile_path = out.parent / "adaptive_profile.synthetic.json"
        profile_path.write_text(json.dumps(profile_to_dict(profile)) + "\n")
        profile = load_profile(profile_path)  # what the sweep scores is what the file says
    else:
        out = Path(args.out or "benchmarks/results/adaptive")
        profile_path = Path(args.profile)
        try:
            profile = load_profile(profile_path)
        except ProfileError as error:
            parser.exit(2, f"error: {error}\n(--synthetic runs on a made-up profile for a smoke test.)\n")
        if profile.synthetic and out.resolve().is_relative_to(RESULTS):
            parser.error(f"{profile_path} is a synthetic profile; its results must not go under {RESULTS}.")

    result = sweep(profile, mbit_per_s=args.rates, rtt_s=args.rtt, budgets_s=args.budgets,
                   accuracy_tolerance=ACCURACY_TOLERANCE, dev_accuracy_margin=args.dev_margin)
    commit, dirty = git_head()
    payload = {
        "command": " ".join(["python", *sys.argv]),
        "commit": commit,
        "dirty": dirty,
        "profile": {"path": str(profile_path), "sha256": sha256(profile_path), "synthetic": profile.synthetic,
                    "questions": len(profile.questions), "options": [o.name for o in profile.options]},
        "rates_mbit_per_s": args.rates,
        "rtt_s": args.rtt,
        "budgets_s": args.budgets or "derived per rate (see definitions.budgets)",
        "accuracy_tolerance": ACCURACY_TOLERANCE,
        "dev_accuracy_margin": args.dev_margin,
        "definitions": DEFINITIONS,
        "options_by_rate": {f"{rate:g}": option_summary(profile, rate, args.rtt) for rate in args.rates},
        "rows": [dataclasses.asdict(r) for r in result.rows],
        "bar": {
            f"{v.mbit_per_s:g}": {"holds": v.holds,
                                  "budgets": [dict(dataclasses.asdict(b), holds=b.holds) for b in v.budgets]}
            for v in result.verdicts
        },
        "bar_holds": result.holds,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    text = markdown(payload, result)
    out.with_suffix(".md").write_text(text)
    plot(result, out.with_suffix(".png"), profile.synthetic)
    print(text)
    print(f"Wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
