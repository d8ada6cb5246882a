"""The first hour with your own models, timed on this machine: every command a new user runs, and fit's speed.

    python benchmarks/first_hour.py [--speed-steps 5] [--rounds 2] [--out benchmarks/results/first_hour]

In a scratch directory: two tiny models of the real classes are saved with ``save_pretrained`` (a Qwen3-class
receiver, a Llama-class sender with its own tokenizer and chat template), and the shipped configs are used with
only their paths edited (``configs/local_pair.yaml``, ``configs/bench/local_sweep.yaml``, ``configs/serve/local_model.yaml``).
Steps, each a shell command whose wall seconds and exit status are recorded: fit, test through every route
(T2T with shared and private queries too), bench, serve the sender + test remotely, a five-line Python API script.

Fit speed: the same fit steps with ``configs/local_pair.yaml`` on CPU (precision chosen by the accelerator:
32-true, float32 models) and with today's ``configs/qwen3_llama.yaml`` dtype left at bf16 (bf16-mixed, bfloat16
models), on 2-layer models of the real Qwen3-0.6B and Llama-3.2-1B shapes (random weights, saved and loaded from
disk), alternating, the best of two rounds each; steps/s counts the steps after the first (warm-up). Measured twice:
on this CPU as it is, and as a CPU without bf16 units (``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN then computes bf16 the
way such a CPU does, emulated), since the ratio depends on whether the CPU computes bf16 natively (AMX, AVX-512 BF16).

Writes ``<out>.json`` and ``<out>.md``. Bar: every status 0, and fp32 steps/s >= 4x bf16 steps/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from fedrefine.bench.records import git_commit, markdown_table, script_command, write_results
from fedrefine.participants import TinySpec, build_random_participant, build_tiny_participant

REPO = Path(__file__).resolve().parents[1]
RECEIVER = TinySpec("qwen3-receiver", "qwen3", num_layers=3, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16)
SENDER = TinySpec("llama-sender", "llama", num_layers=2, hidden_size=48, num_heads=6, num_kv_heads=3, head_dim=8,
                  rope_theta=500000.0, tokenizer_kind="metaspace_bpe", chat_style="llama3", seed=1)
QUICK = "--trainer.max_steps 4 --trainer.val_check_interval 4 --data.train_samples 32 --data.num_questions 8 " \
        "--model.fuser.hidden_size 16 --model.max_length 256"
EVALUATION = "--model.evaluation.t2t.budget 8 --model.evaluation.rephrase.max_new_tokens 8 --model.evaluation.rephrase.candidates 1"
ROUTES = "[receiver, sender, c2c, t2t, c2c@shared, t2t@shared, t2t@private]"
API_SCRIPT = '''import fedrefine

pair = fedrefine.load("runs/first/config.yaml")
answer = pair.answer("Which of these conducts heat?", ["a wool scarf", "a metal spoon", "a wooden stick"], route="c2c")
print(answer.prediction, answer.option_scores, answer.senders, answer.timings_ms)
'''


def save(participant, directory: Path) -> None:
    participant.model.save_pretrained(directory)
    participant.tokenizer.save_pretrained(directory)


def edited(config: str, target: Path, paths: dict[str, str]) -> Path:
    text = (REPO / config).read_text()
    for placeholder, path in paths.items():
        text = text.replace(placeholder, path)
    target.write_text(text)
    return target


def timed(command: str, cwd: Path, env: dict[str, str], shown: str | None = None) -> dict:
    """Run ``command`` in ``cwd``; the record shows ``shown`` (a command free of this machine's paths) if given."""
    start = time.perf_counter()
    done = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True)
    step = {"command": shown or command, "seconds": round(time.perf_counter() - start, 2), "status": done.returncode}
    if done.returncode:
        step["stderr_tail"] = done.stderr[-2000:]
    return step


def workflow(scratch: Path, env: dict[str, str]) -> list[dict]:
    """The first hour's commands, in order, each timed."""
    save(build_tiny_participant(RECEIVER), scratch / "models" / "receiver")
    save(build_tiny_participant(SENDER), scratch / "models" / "sender")
    paths = {"/path/to/receiver": "models/receiver", "/path/to/sender": "models/sender",
             "/path/to/conversations.jsonl": str(REPO / "data/tiny/chat.jsonl"),
             "/path/to/questions_{split}.jsonl": str(REPO / "data/tiny/openbookqa_{split}.jsonl")}
    edited("configs/local_pair.yaml", scratch / "local_pair.yaml", paths)
    edited("configs/bench/local_sweep.yaml", scratch / "local_sweep.yaml", paths)
    edited("configs/serve/local_model.yaml", scratch / "serve.yaml", {"/path/to/sender": "models/sender"})
    (scratch / "api.py").write_text(API_SCRIPT)
    train_args = shlex.quote(json.dumps(["--trainer.logger", "false", *QUICK.split()]))
    steps = [
        timed(f"fedrefine fit --config local_pair.yaml --run_name first {QUICK}", scratch, env),
        timed(f"fedrefine test --config runs/first/config.yaml --model.evaluation.test_routes '{ROUTES}' {EVALUATION}",
              scratch, env),
        timed(f"fedrefine bench --config local_sweep.yaml --train_missing.config local_pair.yaml --train_missing.args "
              f"{train_args} --num_questions 8 --batch_size 8 --evaluation.t2t.budget 8 "
              f"--evaluation.rephrase.max_new_tokens 8 --evaluation.rephrase.candidates 1 --device cpu", scratch, env),
    ]
    ready = scratch / "sender.port"
    serve = f"fedrefine serve participant --config serve.yaml --port 0 --ready-file {ready.name}"  # cwd: scratch
    start = time.perf_counter()
    server = subprocess.Popen(shlex.split(serve), cwd=scratch, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        steps.append({"command": serve + " &", "seconds": round(time.perf_counter() - start, 2),
                      "status": 0 if ready.exists() else 1, "note": "until it serves"})
        reader = {"class_path": "fedrefine.participants.sources.HubParticipant",
                  "init_args": {"name_or_path": "models/sender", "name": "my-sender", "dtype": "auto"}}
        remote = json.dumps({"class_path": "fedrefine.runtime.participant_client.RemoteParticipant",
                             "init_args": {"endpoint": f"grpc://127.0.0.1:{ready.read_text() if ready.exists() else 0}",
                                           "reader": reader}})
        steps.append(timed(f"fedrefine test --config runs/first/config.yaml --model.sender {shlex.quote(remote)} "
                           f"--model.evaluation.test_routes '[receiver, c2c, t2t]' --run_name remote {EVALUATION}",
                           scratch, env))
    finally:
        server.terminate()
        server.wait(timeout=30)
    steps.append(timed(f"{shlex.quote(sys.executable)} api.py", scratch, env, shown="python api.py"))
    return steps


class StepTimer(Callback):
    """Wall time of each optimizer step's batch."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def fit_speed(scratch: Path, precision: str | None, steps: int) -> float:
    """Fit steps per second (after the first) with configs/local_pair.yaml on the real-shape models, in-process."""
    from fedrefine.recipes.trainer_cli import build_cli

    root = scratch / "speed" / str(precision)
    args = ["fit", "--config", str(scratch / "speed_pair.yaml"), "--trainer.default_root_dir", str(root),
            "--overwrite", "true", "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
            "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.callbacks", "[]", "--data.train_samples", str(8 * steps), "--model.max_length", "256"]
    if precision is not None:
        args += ["--trainer.precision", precision]
    cli = build_cli(args[1:], run=False)
    timer = StepTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return (len(timer.seconds) - 1) / sum(timer.seconds[1:])


def speed_rounds(scratch: Path, steps: int, rounds: int) -> dict[str, list[float]]:
    """Fit steps/s per round, alternating local_pair.yaml as shipped and at bf16, so both see the same machine."""
    speeds: dict[str, list[float]] = {"local_pair": [], "bf16": []}
    for _ in range(rounds):
        speeds["local_pair"].append(fit_speed(scratch, None, steps))
        speeds["bf16"].append(fit_speed(scratch, "bf16-mixed", steps))
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed-steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/first_hour"))
    parser.add_argument("--speed-only", metavar="SCRATCH", help=argparse.SUPPRESS)  # the no-bf16-units measurement
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.speed_only:
        print("SPEEDS " + json.dumps(speed_rounds(Path(args.speed_only), args.speed_steps, args.rounds)))
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO / "src")}
    with tempfile.TemporaryDirectory(prefix="first-hour-") as name:
        scratch = Path(name)
        steps = workflow(scratch, env)
        save(build_random_participant("Qwen/Qwen3-0.6B", num_hidden_layers=2), scratch / "speed" / "receiver")
        save(build_random_participant("meta-llama/Llama-3.2-1B-Instruct", num_hidden_layers=2, seed=1),
             scratch / "speed" / "sender")
        edited("configs/local_pair.yaml", scratch / "speed_pair.yaml",
               {"/path/to/receiver": str(scratch / "speed/receiver"), "/path/to/sender": str(scratch / "speed/sender"),
                "/path/to/conversations.jsonl": str(REPO / "data/tiny/chat.jsonl"),
                "/path/to/questions_{split}.jsonl": str(REPO / "data/tiny/openbookqa_{split}.jsonl")})
        speeds = speed_rounds(scratch, args.speed_steps, args.rounds)
        # A CPU without bf16 units, on this one: oneDNN limited to AVX2 computes bf16 as such a CPU does (emulated).
        avx2 = subprocess.run([sys.executable, __file__, "--speed-only", str(scratch), "--speed-steps", str(args.speed_steps),
                               "--rounds", str(args.rounds)], env={**env, "ONEDNN_MAX_CPU_ISA": "AVX2"},
                              capture_output=True, text=True, check=True)
        without_units = json.loads(next(line for line in avx2.stdout.splitlines() if line.startswith("SPEEDS "))[7:])
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    bf16_units = sorted({flag for flag in ("amx_bf16", "avx512_bf16") if flag in cpuinfo.split()})
    measured = {"native": speeds, "without_bf16_units": without_units}
    fit_speed_rows = {}
    for setting, rounds in measured.items():
        fp32, bf16 = max(rounds["local_pair"]), max(rounds["bf16"])
        fit_speed_rows[setting] = {
            "local_pair_cpu": {"precision": "32-true (chosen by the accelerator)", "dtype": "float32",
                               "steps_per_s": fp32, "rounds_steps_per_s": rounds["local_pair"]},
            "qwen3_llama_dtype_bf16": {"precision": "bf16-mixed", "dtype": "bfloat16", "steps_per_s": bf16,
                                       "rounds_steps_per_s": rounds["bf16"]},
            "ratio": fp32 / bf16, "bar": ">= 4", "met": fp32 / bf16 >= 4,
        }
    fit_speed_rows["native"]["cpu_bf16_units"] = bf16_units
    fit_speed_rows["without_bf16_units"]["how"] = "ONEDNN_MAX_CPU_ISA=AVX2: oneDNN computes bf16 as a CPU without bf16 units does"
    payload = {
        "command": script_command(), "commit": git_commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, 2 threads",
        "steps": steps, "all_status_0": all(s["status"] == 0 for s in steps),
        "fit_speed": {
            "models": "Qwen3-0.6B and Llama-3.2-1B shapes, 2 layers each, random weights, saved to disk",
            "steps": args.speed_steps, "rounds": args.rounds, "batch_size": 8, **fit_speed_rows,
        },
    }
    lines = [f"# The first hour with your own models ({payload['machine']})", "",
             f"Command: `{payload['command']}` at commit `{payload['commit']}`.", "",
             *markdown_table(["command", "seconds", "status"], [[f"`{s['command'][:140]}`", s["seconds"], s["status"]] for s in steps]),
             "", f"Fit steps/s, {args.speed_steps} steps at batch 8 on 2-layer real-shape models (best of {args.rounds}), "
             f"configs/local_pair.yaml on CPU (32-true, float32) against today's qwen3_llama.yaml dtype (bf16-mixed, bfloat16):", "",
             *markdown_table(["CPU", "float32 steps/s", "bf16 steps/s", "ratio", "bar >= 4x"], [
                 [f"this one ({', '.join(bf16_units) or 'no bf16 units'})" if setting == "native" else
                  "as one without bf16 units (oneDNN limited to AVX2)",
                  f"{row['local_pair_cpu']['steps_per_s']:.3f}", f"{row['qwen3_llama_dtype_bf16']['steps_per_s']:.3f}",
                  f"{row['ratio']:.1f}x", "met" if row["met"] else "NOT met"] for setting, row in fit_speed_rows.items()]), ""]
    write_results(args.out, payload, "\n".join(lines))


if __name__ == "__main__":
    main()
