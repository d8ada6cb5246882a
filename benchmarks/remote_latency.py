"""Latency over the real transport: senders in their own processes (``fedrefine serve participant``), each
pinned to its own core, against the same federation in one process.

    python benchmarks/remote_latency.py [--questions 256] [--repeats 3] [--real-repeats 5]

1. **Toy world** (the Fig. 3c stages): the toy receiver with its two senders and the fusers of the
   README's federation demo (configs/toyworld.yaml, trained here if missing), once in-process and once
   with both senders and the registry served on 127.0.0.1; routes receiver, each sender, both, T2T. The
   receiver runs on core 0 with one thread, the servers on core 1 with one thread each (a 2-core machine).
   Both runs must give the same predictions; the stages are medians over ``--repeats`` interleaved runs.
2. **Real shapes** (random weights): Qwen2.5-0.5B-Instruct -> Qwen3-0.6B, one 128-token prompt, batch 1,
   residual fusion at the prompt positions. The receiver alone, C2C in one process (serial, one core), and
   C2C with the sender served on its own core, where the receiver prefills its prompt while the sender
   works: the critical path. Transfer at 10 and 100 Mbit/s is modelled from the bytes on the wire.

Writes benchmarks/results/remote_latency.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
import yaml

from fedrefine.bench.records import git_commit, markdown_table, script_command, write_results
from fedrefine.data.question_dataset import QuestionDataset
from fedrefine.evaluation import EvaluationConfig, Evaluator
from fedrefine.federation import Federation
from fedrefine.fuser import Fuser, FuserConfig
from fedrefine.fuser.registry import FuserRegistry
from fedrefine.fusion import FusedReceiver
from fedrefine.fusion.encoding import PromptEncoder
from fedrefine.participants.sources import RandomRealParticipant
from fedrefine.recipes.trainer_cli import build_cli
from fedrefine.runtime.participant_client import CallSettings, ParticipantClient, RemoteParticipant
from fedrefine.runtime.registry_client import RemoteFuserRegistry
from fedrefine.runtime.security import ClientSecurity
from fedrefine.tasks.routes import parse_routes
from fedrefine.tasks.t2t import T2TConfig
from fedrefine.toyworld.lightning import ToyParticipant
from fedrefine.toyworld.world import ToyWorld

SENDERS = {"llama": ("llama-sender", 0), "qwen2": ("qwen2-sender", 1)}
ROUTES = ["receiver", "c2c:llama", "c2c:qwen2", "c2c", "t2t"]
STAGES = ("sender", "transfer", "fuse", "receiver")
RECEIVER_CORE, SERVER_CORE = 0, 1
TOKEN = "remote-latency-benchmark"
REAL_SENDER, REAL_RECEIVER = "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen3-0.6B"


# --- servers ---------------------------------------------------------------------------------------
@contextmanager
def served(args: list[str], workdir: Path, name: str, core: int | None, threads: int = 1):
    """``fedrefine serve <args>`` on a free port, pinned to ``core`` (None: not pinned) with ``threads`` torch
    threads; yields its port."""
    ready, log = workdir / f"{name}.port", (workdir / f"{name}.log").open("w")
    command = [sys.executable, "-m", "fedrefine.cli", "serve", *args, "--port", "0", "--ready-file", str(ready)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                               preexec_fn=None if core is None else lambda: os.sched_setaffinity(0, {core}))
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{(workdir / f'{name}.log').read_text()}")
            time.sleep(0.1)
        yield int(ready.read_text())
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def participant_config(workdir: Path, name: str, source: dict) -> str:
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"participant": source, "threads": 1}))
    return str(path)


# --- toy world -------------------------------------------------------------------------------------
def train_fusers(registry_root: Path, steps: int) -> None:
    """The README demo's fusers (configs/toyworld.yaml: answer prefill, last-token fusion), one per sender."""
    for name, (sender, group) in SENDERS.items():
        export = registry_root / name
        if (export / "fuser.json").is_file():
            continue
        build_cli([
            "fit", "--config", "configs/toyworld.yaml", "--model.sender.init_args.name", sender,
            "--data.group", str(group), "--model.export_dir", str(export),
            "--trainer.default_root_dir", str(registry_root.parent / f"fit-{name}"), "--trainer.logger", "false",
            "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
        ])


def toy_questions(count: int) -> QuestionDataset:
    """``count`` questions about the held-out entities of both private groups, alternating groups."""
    world = ToyWorld()
    groups = [world.questions(world.held_out(g)) for g in (0, 1)]
    mixed = [q for pair in zip(*groups) for q in pair]
    return QuestionDataset(mixed[:count])


def toy_evaluation() -> EvaluationConfig:
    return EvaluationConfig(answer_mode="cloze", prefill_answer=True, t2t=T2TConfig(budget=32))


def evaluate(model: FusedReceiver, questions, batch_size: int) -> tuple[dict, dict]:
    report = Evaluator(model, parse_routes(ROUTES, model.sender_names), toy_evaluation()).run(questions, batch_size)
    return {row["route"]: row for row in report.rows()}, {r: [ok for _, ok in report.per_question[r]] for r in ROUTES}


def toy_part(args, workdir: Path) -> dict:
    registry_root = Path(args.root) / "registry"
    train_fusers(registry_root, args.steps)
    questions = toy_questions(args.questions)
    (workdir / "token").write_text(TOKEN)
    security = ClientSecurity(token_file=str(workdir / "token"))
    token = ["--token-file", str(workdir / "token")]
    toy = {"receiver": ToyParticipant("receiver"), **{n: ToyParticipant(s) for n, (s, _) in SENDERS.items()}}
    local = Federation(toy, FuserRegistry(registry_root)).receiver("receiver", list(SENDERS)).eval()
    with ExitStack() as stack:
        ports = {
            name: stack.enter_context(served(
                ["participant", "--config", participant_config(workdir, name, toy[name].describe()), *token],
                workdir, name, SERVER_CORE,
            ))
            for name in SENDERS
        }
        registry_port = stack.enter_context(served(["registry", "--root", str(registry_root), *token], workdir,
                                                   "registry", SERVER_CORE))
        registry = RemoteFuserRegistry(f"grpc://127.0.0.1:{registry_port}", workdir / "fusers", security)
        sources = {"receiver": toy["receiver"], **{
            n: RemoteParticipant(f"grpc://127.0.0.1:{ports[n]}", toy[n], security, CallSettings(deadline_s=60.0)) for n in SENDERS
        }}
        remote = Federation(sources, registry).receiver("receiver", list(SENDERS)).eval()
        runs: dict[str, list[dict]] = {"in_process": [], "remote": []}
        predictions = {}
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            for kind, model in (("in_process", local), ("remote", remote)):
                rows, correct = evaluate(model, questions, args.batch_size)
                runs[kind].append(rows)
                predictions.setdefault(kind, correct)
    same = predictions["in_process"] == predictions["remote"]
    table = {}
    for kind, repeats in runs.items():
        table[kind] = {}
        for route in ROUTES:
            rows = [r[route] for r in repeats]
            table[kind][route] = {
                "accuracy": rows[0]["accuracy"],
                **{f"{s}_ms": statistics.median(r.get(f"{s}_ms", 0.0) for r in rows) for s in STAGES},
                "latency_ms": statistics.median(r["latency_ms"] for r in rows),
                "bytes_per_question": rows[0]["bytes_per_question"],
                "transport_bytes_per_question": rows[0]["transport_bytes_per_question"],
                "senders_dropped": rows[0]["senders_dropped"],
            }
    return {"questions": len(questions), "batch_size": args.batch_size, "repeats": args.repeats,
            "same_predictions": same, "routes": table}


# --- real shapes -----------------------------------------------------------------------------------
def prompt_messages(receiver, tokens: int) -> list[dict]:
    """A user message of about ``tokens`` receiver tokens (OpenBookQA-length, its options included)."""
    words = ("which of these would let the most heat travel through a metal spoon a wooden stick a glass rod "
             "or a plastic cup when the other end sits in a pot of boiling water on the stove").split()
    text, n = [], 0
    while n < tokens - 12:  # the chat template adds about a dozen tokens
        text.append(words[len(text) % len(words)])
        n = len(receiver.tokenizer(" ".join(text), add_special_tokens=False)["input_ids"])
    return [{"role": "user", "content": " ".join(text)}]


def timed(run, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def real_part(args, workdir: Path) -> dict:
    """Both fused-position recipes: ``prompt`` (the C2C reference, every prompt position sent) and ``last``."""
    sender_source = RandomRealParticipant(REAL_SENDER, seed=0)
    receiver = RandomRealParticipant(REAL_RECEIVER, seed=0).load()
    sender_view = sender_source.load()
    (workdir / "token").write_text(TOKEN)
    security = ClientSecurity(token_file=str(workdir / "token"))
    config = participant_config(workdir, "qwen25", sender_source.describe())
    with served(["participant", "--config", config, "--token-file", str(workdir / "token")], workdir, "qwen25",
                SERVER_CORE) as port:
        # the served sender is the same seeded model as the local view (identities match)
        client = ParticipantClient(f"grpc://127.0.0.1:{port}", sender_view.identity, security, CallSettings(deadline_s=120.0))
        return {
            "pair": f"{REAL_SENDER} -> {REAL_RECEIVER} (random weights, fp32, shipped configs)",
            **{positions: measure_real(args, receiver, sender_view, client, positions) for positions in ("prompt", "last")},
        }


def measure_real(args, receiver, sender_view, client, positions: str) -> dict:
    """Receiver alone, C2C in one process and C2C with the sender served elsewhere, interleaved."""
    fuser = Fuser(sender_view.identity, receiver.identity, FuserConfig(dropout=0.0, fuse_at=positions)).eval()
    encoder = PromptEncoder(receiver, {"qwen25": sender_view}, aligns=True)
    batch = encoder.collate([encoder.encode(prompt_messages(receiver, args.prompt_tokens))])
    local = FusedReceiver(receiver, [sender_view], [fuser], sender_names=["qwen25"]).eval()
    remote = FusedReceiver(receiver, [sender_view], [fuser], sender_names=["qwen25"], remotes={"qwen25": client}).eval()
    with torch.no_grad():
        assert torch.equal(remote(batch), local(batch)), "remote C2C must give the in-process logits"
        runs = {"receiver_alone": [], "c2c_in_process": [], "c2c_remote": [], "send_remote": [], "send_local": []}
        deliveries = []
        for _ in range(args.real_repeats):  # interleaved
            runs["receiver_alone"] += timed(lambda: local(batch, fuse=False), 1)
            runs["c2c_in_process"] += timed(lambda: local(batch), 1)
            runs["c2c_remote"] += timed(lambda: remote(batch), 1)
            runs["send_local"] += timed(lambda: local.send("qwen25", batch.senders["qwen25"]), 1)
            start = time.perf_counter()
            deliveries.append(remote.deliver("qwen25", batch.senders["qwen25"]))
            runs["send_remote"].append(time.perf_counter() - start)
    median = {name: statistics.median(times) for name, times in runs.items()}
    wire = deliveries[0].message.wire_bytes
    stages = {
        "sender_prefill_s": statistics.median(d.sender_seconds for d in deliveries),
        "transfer_loopback_s": statistics.median(d.transfer_seconds for d in deliveries),
        **{f"transfer_{rate}mbit_s": wire * 8 / (rate * 1e6) for rate in (10, 100)},
    }
    receiver_tokens = int(batch.receiver_attention_mask.sum())
    return {
        "fused_positions": positions,
        "receiver_tokens": receiver_tokens, "sender_tokens": int(batch.senders["qwen25"].attention_mask.sum()),
        "batch_size": 1, "repeats": args.real_repeats, "seconds": median, "stages": stages,
        "wire_bytes": wire, "transport_bytes": deliveries[0].transport_bytes,
        "ratios": {
            "c2c_critical_path_over_receiver_alone": median["c2c_remote"] / median["receiver_alone"],
            "c2c_in_process_over_receiver_alone": median["c2c_in_process"] / median["receiver_alone"],
            "remote_over_in_process": median["c2c_remote"] / median["c2c_in_process"],
        },
        "critical_path_at": {
            f"{rate}mbit_s": max(stages["sender_prefill_s"] + stages[f"transfer_{rate}mbit_s"], median["receiver_alone"])
            + (median["c2c_in_process"] - median["receiver_alone"] - median["send_local"])
            for rate in (10, 100)
        },
    }


# --- report ----------------------------------------------------------------------------------------
def markdown(payload: dict) -> str:
    lines = ["# Latency over the real transport", "", f"`{payload['command']}` at `{payload['commit']}`, "
             f"{payload['machine']}; receiver on core {RECEIVER_CORE}, servers on core {SERVER_CORE}, one thread each.", ""]
    toy = payload.get("toy")
    if toy:
        lines += [f"## Toy world: {toy['questions']} held-out questions, batch {toy['batch_size']}, "
                  f"median of {toy['repeats']} interleaved runs", "",
                  f"Same predictions in-process and remote: **{toy['same_predictions']}**.", ""]
        header = ["route", "run", "accuracy", *[f"{s} ms/q" for s in STAGES], "total ms/q", "message B/q", "transport B/q"]
        rows = []
        for route in ROUTES:
            for kind in ("in_process", "remote"):
                r = toy["routes"][kind][route]
                rows.append([route, kind.replace("_", "-"), f"{100 * r['accuracy']:.1f}%",
                             *[f"{r[f'{s}_ms']:.2f}" for s in STAGES], f"{r['latency_ms']:.2f}",
                             f"{r['bytes_per_question']:.0f}", f"{r['transport_bytes_per_question']:.0f}"])
        lines += markdown_table(header, rows) + [""]
    real = payload.get("real")
    if real:
        lines += [f"## Real shapes: {real['pair']}", ""]
        for positions in ("prompt", "last"):
            r = real[positions]
            s, st = r["seconds"], r["stages"]
            lines += [f"### Fused positions: {positions}", "",
                      f"{r['receiver_tokens']} receiver tokens ({r['sender_tokens']} sender tokens), batch 1, median of "
                      f"{r['repeats']}; message {r['wire_bytes']:,} B on the wire ({r['transport_bytes']:,} B with "
                      f"gRPC framing).", ""]
            lines += markdown_table(["measured", "seconds"], [
                ["receiver alone", f"{s['receiver_alone']:.3f}"],
                ["C2C in one process (serial, one core)", f"{s['c2c_in_process']:.3f}"],
                ["C2C, sender in its own process and core (critical path)", f"{s['c2c_remote']:.3f}"],
                ["sender prefill + encode (in the server)", f"{st['sender_prefill_s']:.3f}"],
                ["transfer over loopback (call less the sender's work)", f"{st['transfer_loopback_s']:.3f}"],
                ["transfer at 100 Mbit/s (modelled from the bytes)", f"{st['transfer_100mbit_s']:.3f}"],
                ["transfer at 10 Mbit/s (modelled from the bytes)", f"{st['transfer_10mbit_s']:.3f}"],
            ]) + [""]
            lines += markdown_table(["ratio", "value"], [[k, f"{v:.2f}"] for k, v in r["ratios"].items()]) + [""]
            lines += ["Critical path computed from these stages at a slower link, max(sender + transfer, receiver) + "
                      "fuse: " + ", ".join(f"{k.replace('mbit_s', ' Mbit/s')}: {v:.2f} s"
                                           for k, v in r["critical_path_at"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--real-repeats", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300, help="fuser training steps (toy, when not trained yet)")
    parser.add_argument("--skip-toy", action="store_true")
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--root", default="runs/benchmarks/remote_latency")
    parser.add_argument("--out", default="benchmarks/results/remote_latency")
    args = parser.parse_args()
    os.sched_setaffinity(0, {RECEIVER_CORE})
    torch.set_num_threads(1)
    payload = {"command": script_command(), "commit": git_commit(), "machine": f"{platform.processor() or platform.machine()}"
               f", {os.cpu_count()} cores, torch {torch.__version__}", "threads_per_participant": 1}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_toy:
            (Path(tmp) / "toy").mkdir()
            payload["toy"] = toy_part(args, Path(tmp) / "toy")
        if not args.skip_real:
            (Path(tmp) / "real").mkdir()
            payload["real"] = real_part(args, Path(tmp) / "real")
    write_results(args.out, payload, markdown(payload))


if __name__ == "__main__":
    main()
