"""Fuzz every place where another participant's or a user's input enters FedRefine, and count what happens.

    python benchmarks/fuzz.py [--inputs 6000] [--seed 0]

Targets (seeded random inputs, every one bounded by a per-input alarm):

    wire       KV message bytes: random bytes, flipped and truncated honest messages, header fields replaced by
               random JSON, and every hostile tampering of ``fedrefine.runtime.drills`` (decoded as a receiver
               does, with the request it made)
    prefill    Prefill requests (token rows, layers, sent columns, codec, group size, width) through the
               participant server's checks
    hint       Hint requests (prompts, max_new_tokens, batch size)
    download   registry Download requests (identity JSON, file names)
    results    sweep results files (random JSON) through the bench loader

An input ends in a *clean error* (the format's or service's own refusal), is *accepted* (then checked to lie
within what was asked), or a *raw error* (any other exception: a bug), or a *hang* (past ``--alarm-s``).
Resident memory is sampled throughout; its growth past the warm-up is ``max_rss_growth_mb``.
Writes ``benchmarks/results/fuzz.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import signal
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import torch

from fedrefine.bench.records import git_commit, markdown_table, script_command, write_results
from fedrefine.bench.results_file import ResultsFileError, StaleResultsError, SweepResultsFile
from fedrefine.participants import ParticipantIdentity, TinySpec, build_tiny_participant
from fedrefine.runtime import drills
from fedrefine.runtime.admission import RequestError
from fedrefine.runtime.identities import identity_json
from fedrefine.runtime.protos import participant_pb2 as pb
from fedrefine.runtime.protos import registry_pb2 as rpb
from fedrefine.runtime.registry_server import check_download
from fedrefine.runtime.requests import ServeLimits, check_hint, check_prefill
from fedrefine.wire import WireFormatError, codec_by_name, deserialize_message, serialize_message
from fedrefine.wire.format import MessageRequest
from fedrefine.wire.message import prefill_message

SENDER = TinySpec("llama-sender", "llama", num_layers=2, hidden_size=48, num_heads=6, num_kv_heads=3, head_dim=8,
                  rope_theta=500000.0, tokenizer_kind="metaspace_bpe", chat_style="llama3", seed=1)
SHARES = {"wire": 0.5, "prefill": 0.2, "hint": 0.07, "download": 0.1, "results": 0.13}
CLEAN = (WireFormatError, RequestError, ResultsFileError, StaleResultsError)


class Hang(Exception):
    """An input that ran past the alarm."""


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, -1, 2**31, -(2**63), 2**70, rng.randrange(-10, 300)])
    if kind == 3:
        return rng.choice([0.5, float("nan"), float("inf"), -1e308, 2.5])
    if kind == 4:
        return rng.choice(["", "x", "int4", "fp32", "float32", "a" * rng.randrange(1, 3000)])
    if kind in (5, 6):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {rng.choice(["name", "group_size", "rows", "status", "key", rng.choice("abc")]): random_json(rng, depth + 1)
            for _ in range(rng.randrange(5))}


class Fuzzer:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.sender = build_tiny_participant(SENDER)
        ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
        mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
        self.message = prefill_message(self.sender, ids, mask)
        self.request = MessageRequest.of(list(self.message.layers), mask)
        self.honest = {name: serialize_message(self.message, codec_by_name(name, 4)) for name in ("fp32", "int8", "int4",
                                                                                                  "int2", "bf16")}
        self.limits = ServeLimits(max_batch=8, max_tokens=256, max_prompt_tokens=64, max_text_chars=2000)
        self.scratch = Path(tempfile.mkdtemp(prefix="fedrefine-fuzz-"))

    # --- one input per target ------------------------------------------------------------------------
    def wire(self) -> None:
        rng = self.rng
        valid = self.honest[rng.choice(list(self.honest))]
        kind = rng.randrange(6)
        if kind == 0:
            data = rng.randbytes(rng.randrange(600))
        elif kind == 1:
            data = bytearray(valid)
            for _ in range(rng.randrange(1, 8)):
                data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
            data = bytes(data)
        elif kind == 2:
            data = valid[: rng.randrange(len(valid))] + rng.randbytes(rng.randrange(16))
        elif kind == 3:
            data = drills.TAMPERINGS[rng.choice(list(drills.TAMPERINGS))](valid)
        else:
            tensors, header, metadata = drills.split(valid)
            for _ in range(rng.randrange(1, 3)):
                field = rng.choice(["batch", "length", "transmitted", "layers", "codec", "dtype", "sender"])
                header[field] = random_json(rng)
            if kind == 5 and rng.random() < 0.5:
                header = random_json(rng)
            data = drills.join(tensors, header, metadata)
        decoded = deserialize_message(data, self.sender.identity, request=self.request if rng.random() < 0.8 else None,
                                      max_decoded_bytes=2**26)
        assert all(torch.isfinite(t).all() for pair in decoded.layers.values() for t in pair), "non-finite accepted"

    def _ints(self, low: int, high: int, size: int) -> list[int]:
        extremes = [-(2**31), -1, 0, 1, 2**31 - 1]
        return [self.rng.choice(extremes) if self.rng.random() < 0.1 else self.rng.randrange(low, high)
                for _ in range(self.rng.randrange(size))]

    def prefill(self) -> None:
        rng = self.rng
        if rng.random() < 0.5:  # near-valid: a few lies in an otherwise plausible request
            rows = [[rng.randrange(3, 300) for _ in range(rng.randrange(1, 40))] for _ in range(rng.randrange(1, 6))]
            request = pb.PrefillRequest(prompts=[pb.TokenRow(ids=r) for r in rows], codec=rng.choice(["fp32", "int4"]),
                                        layers=rng.sample(range(2), rng.randrange(3)), width=rng.choice([0, 40, 64, 80]))
            if rng.random() < 0.3:
                request.sent.extend(pb.TokenRow(ids=[len(r) - 1 + rng.choice([0, 0, 1, -40])]) for r in rows)
            plan = check_prefill(request, self.sender, self.limits)
            assert plan.input_ids.shape[1] <= 64 and plan.input_ids.numel() <= 256, "a plan past the limits"
            return
        rows = [self._ints(0, 400, 80) for _ in range(rng.randrange(10))]
        request = pb.PrefillRequest(
            prompts=[pb.TokenRow(ids=r) for r in rows] if rng.random() < 0.85 else [],
            texts=[] if rng.random() < 0.85 else ["word " * rng.randrange(600) for _ in range(rng.randrange(4))],
            layers=self._ints(-2, 5, 6), codec=rng.choice(["fp32", "int4", "int8", "int3", ""]),
            group_size=rng.choice([0, 1, 4, 128, -3, 2**31 - 1]), width=rng.choice([0, 1, 6, 64, 65, 16384, -1]),
            sent=[pb.TokenRow(ids=self._ints(-1, 70, 8)) for _ in range(rng.randrange(4))],
        )
        plan = check_prefill(request, self.sender, self.limits)
        batch, width = plan.input_ids.shape
        assert batch <= 8 and width <= 64 and batch * width <= 256, "a plan past the limits"

    def hint(self) -> None:
        rng = self.rng
        request = pb.HintRequest(prompts=["Q " * rng.randrange(800) for _ in range(rng.randrange(10))],
                                 max_new_tokens=rng.choice([-1, 0, 8, 512, 513, 2**31 - 1]),
                                 batch_size=rng.choice([-(2**31), -1, 0, 3, 8, 9, 2**31 - 1]))
        prompts, new, batch = check_hint(request, self.sender, self.limits)
        assert len(prompts) <= 8 and 0 <= new <= 512 and 1 <= batch <= 16, "a Hint past the limits"

    def download(self) -> None:
        rng = self.rng
        honest = identity_json(ParticipantIdentity("tiny/a", "main", "LlamaForCausalLM", 2, 2, 32, 64, 128))

        def identity() -> str:
            choice = rng.choice([0, 0, 0, 1, 2, 3])
            if choice == 0:
                return honest
            if choice == 1:
                data = json.loads(honest)
                data[rng.choice(list(data))] = random_json(rng)
                return json.dumps(data)
            return json.dumps(random_json(rng)) if choice == 2 else rng.randbytes(rng.randrange(50)).decode("latin-1")

        names = ["fuser.json", "fuser.safetensors"] * 4 + ["../x", "", "a" * 300]
        files = [rng.choice(names) for _ in range(rng.randrange(4))]
        check_download(rpb.DownloadRequest(sender_identity_json=identity(), receiver_identity_json=identity(), files=files))

    def results(self) -> None:
        rng = self.rng
        path = self.scratch / "sweep.json"
        if rng.random() < 0.5:
            row = {"key": "receiver", "route": "receiver", "query_mode": "original", "status": "ok", "accuracy": 0.5,
                   "ci_low": 0.4, "ci_high": 0.6}
            row[rng.choice(list(row) + ["latency_s", "n_questions"])] = random_json(rng)
            content = {"fingerprint": "x", "rows": [row]}
        else:
            content = random_json(rng)
        path.write_text(json.dumps(content) if rng.random() < 0.95 else json.dumps(content)[:-1])
        SweepResultsFile(path).load({"fingerprint": "x", "name": "sweep"})

    # --- the run -------------------------------------------------------------------------------------
    def run(self, inputs: int, alarm_s: float) -> dict:
        targets = [t for t, share in SHARES.items() for _ in range(round(share * 100))]
        counts = {t: Counter() for t in SHARES}
        raw_samples: list[str] = []
        signal.signal(signal.SIGALRM, _alarm)
        warm = None
        peak = 0.0
        start = time.perf_counter()
        for index in range(inputs):
            target = self.rng.choice(targets)
            signal.setitimer(signal.ITIMER_REAL, alarm_s)
            try:
                getattr(self, target)()
                outcome = "accepted"
            except Hang:
                outcome = "hang"
            except CLEAN:
                outcome = "clean_error"
            except Exception as err:  # noqa: BLE001 - counting raw errors is the point
                outcome = "raw_error"
                if len(raw_samples) < 10:
                    raw_samples.append(f"{target}: {type(err).__name__}: {str(err)[:200]} @ "
                                       f"{traceback.extract_tb(err.__traceback__)[-1].name}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            counts[target][outcome] += 1
            if index % 50 == 0:
                rss = rss_mb()
                warm = rss if index == 500 or warm is None and index > 500 else warm
                peak = max(peak, rss)
        seconds = time.perf_counter() - start
        total = Counter()
        for counter in counts.values():
            total.update(counter)
        peak = max(peak, rss_mb())
        return {
            "inputs": inputs,
            "clean_errors": total["clean_error"],
            "accepted": total["accepted"],
            "raw_errors": total["raw_error"],
            "hangs": total["hang"],
            "max_rss_growth_mb": round(peak - (warm or peak), 1),
            "rss_after_warmup_mb": round(warm or peak, 1),
            "rss_peak_mb": round(peak, 1),
            "seconds": round(seconds, 1),
            "alarm_s": alarm_s,
            "by_target": {t: dict(c) for t, c in counts.items()},
            "raw_error_samples": raw_samples,
        }


def _alarm(*_) -> None:
    raise Hang()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alarm-s", type=float, default=5.0, help="an input running longer is counted as a hang")
    parser.add_argument("--out", default="benchmarks/results/fuzz")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    result = Fuzzer(args.seed).run(args.inputs, args.alarm_s)
    payload = {"command": script_command(), "commit": git_commit(), "machine": f"{platform.node()} "
               f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}".strip(), **result}
    rows = [[t, *(counts.get(k, 0) for k in ("accepted", "clean_error", "raw_error", "hang"))]
            for t, counts in result["by_target"].items()]
    markdown = "\n".join([
        "# Fuzzing FedRefine's inputs", "", f"`{payload['command']}` at {payload['commit']} ({payload['machine']})", "",
        f"{result['inputs']} inputs in {result['seconds']} s: {result['clean_errors']} clean errors, "
        f"{result['accepted']} accepted (each checked), **{result['raw_errors']} raw errors, {result['hangs']} hangs**; "
        f"resident memory grew {result['max_rss_growth_mb']} MB past the warm-up.", "",
        *markdown_table(["target", "accepted", "clean errors", "raw errors", "hangs"], rows), "",
        *(["Raw errors:", *[f"- {s}" for s in result["raw_error_samples"]], ""] if result["raw_error_samples"] else []),
    ])
    write_results(args.out, payload, markdown + "\n")


if __name__ == "__main__":
    main()
