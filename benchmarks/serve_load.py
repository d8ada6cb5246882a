"""Load on a served participant, batched and unbatched: throughput and latency as clients grow.

    python benchmarks/serve_load.py [--clients 1 4 16 64] [--window-s 4] [--warmup-s 1]

The toy world's Llama-style sender is served (``fedrefine serve participant --config
configs/serve/toy_llama.yaml``) in its own process on 127.0.0.1 (a free port), once with ``batching.enabled``
false (one request per model call, in arrival order) and once with the default batching settings; every other
setting is the same. For each request size (small: 4 prompts x 48 tokens, large: 16 x 256; fp32 messages) and
each client count, that many clients (threads of this process, a connection each) send Prefill requests one
after another for ``--warmup-s`` + ``--window-s`` seconds, reading each reply's chunks without decoding them (a
light client). Requests completed inside the window (``--large-scale`` x longer for large requests, and its
warmup too) give the throughput and the latency percentiles (of those requests); a refused
request (RESOURCE_EXHAUSTED) is counted and retried after the server's retry hint. Every loop is bounded by
the window and every call by a deadline.

Bars (``"bars"``): ``throughput_ratio_16_clients`` (batched over unbatched requests/s, small requests, 16
clients) >= 3, and the batched p99 at 16 clients <= 2 x the unbatched single-client p50 + max_queue_delay_ms.

Writes ``benchmarks/results/serve_load.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch
from remote_latency import served  # noqa: E402 (benchmarks/ is on the path of a script run from it)

from fedrefine.bench.records import git_commit, markdown_table, script_command, write_results
from fedrefine.runtime.batcher import BatchingConfig
from fedrefine.runtime.participant_client import retry_hint_s
from fedrefine.runtime.protos import participant_pb2 as pb
from fedrefine.runtime.protos import participant_pb2_grpc as pb_grpc

CONFIG = "configs/serve/toy_llama.yaml"
SIZES = {"small": (4, 48), "large": (16, 256)}
MODES = {"unbatched": ["--batching.enabled", "false"], "batched": []}
CALL_DEADLINE_S = 60.0


def request_of(prompts: int, tokens: int) -> pb.PrefillRequest:
    rows = [pb.TokenRow(ids=[(7 * i + j) % 200 + 3 for j in range(tokens)]) for i in range(prompts)]
    return pb.PrefillRequest(prompts=rows, codec="fp32")


def channel(port: int) -> grpc.Channel:
    """A channel with its own connection (gRPC shares one between channels to one target by default)."""
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1),
                                                               ("grpc.max_receive_message_length", 8 << 20)])


def load(port: int, request: pb.PrefillRequest, clients: int, warmup_s: float, window_s: float) -> dict:
    """``clients`` closed-loop clients for warmup + window; the window's completed requests measured."""
    start = time.monotonic()
    begin, end = start + warmup_s, start + warmup_s + window_s
    latencies: list[list[float]] = [[] for _ in range(clients)]
    refused, failed = [0] * clients, [0] * clients

    def client(index: int) -> None:
        with channel(port) as own:
            stub = pb_grpc.ParticipantStub(own)
            while (sent := time.monotonic()) < end:
                try:
                    for _chunk in stub.Prefill(request, timeout=CALL_DEADLINE_S):
                        pass
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        failed[index] += 1
                        time.sleep(0.05)
                        continue
                    refused[index] += 1
                    hint = retry_hint_s(err, longest=float("inf"))  # the client's parser; waits capped at 1 s here
                    time.sleep(0.05 if hint is None else min(1.0, hint))
                    continue
                done = time.monotonic()
                if begin <= done <= end:  # completed in the window (warmup: at least one round trip)
                    latencies[index].append(done - sent)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=warmup_s + window_s + CALL_DEADLINE_S + 5)
    values = sorted(v for per in latencies for v in per)
    p99 = values[min(len(values) - 1, int(0.99 * len(values)))] if values else None
    return {
        "clients": clients, "completed": len(values), "requests_per_s": round(len(values) / window_s, 1),
        "p50_ms": round(statistics.median(values) * 1000, 1) if values else None,
        "p99_ms": round(p99 * 1000, 1) if values else None,
        "refused": sum(refused), "failed": sum(failed),
    }


def run_mode(mode: str, args, workdir: Path) -> dict:
    server_args = ["participant", "--config", CONFIG, "--threads", str(args.server_threads), *MODES[mode]]
    out: dict[str, list[dict]] = {}
    with served(server_args, workdir, f"participant-{mode}", args.server_core, args.server_threads) as port:
        for size in args.sizes:
            request = request_of(*SIZES[size])
            out[size] = []
            scale = args.large_scale if size == "large" else 1.0
            for clients in args.clients:
                row = load(port, request, clients, args.warmup_s * scale, args.window_s * scale)
                print(mode, size, row, flush=True)
                out[size].append(row)
    return out


def bars(results: dict, config: BatchingConfig) -> dict:
    def at(mode: str, clients: int) -> dict:
        return next(r for r in results[mode]["small"] if r["clients"] == clients)

    batched16, unbatched16, single = at("batched", 16), at("unbatched", 16), at("unbatched", 1)
    ratio = batched16["requests_per_s"] / max(unbatched16["requests_per_s"], 1e-9)
    p99_limit = 2 * single["p50_ms"] + config.max_queue_delay_ms
    return {
        "throughput_ratio_16_clients": round(ratio, 2),
        "throughput_ratio_16_clients_at_least": 3.0,
        "throughput_ratio_met": ratio >= 3.0,
        "batched_p99_16_clients_ms": batched16["p99_ms"],
        "batched_p99_16_clients_limit_ms": round(p99_limit, 1),
        "p99_met": batched16["p99_ms"] is not None and batched16["p99_ms"] <= p99_limit,
    }


def markdown(payload: dict) -> str:
    lines = [f"# Serve load (toy Llama-style sender, {payload['server']})", "",
             f"`{payload['command']}` (commit {payload['commit']}, {payload['machine']})", ""]
    for size in payload["results"]["batched"]:
        prompts, tokens = SIZES[size]
        lines += [f"## {size}: {prompts} prompts x {tokens} tokens per request", ""]
        rows = []
        for index, clients in enumerate(payload["clients"]):
            u, b = (payload["results"][m][size][index] for m in ("unbatched", "batched"))
            rows.append([clients, u["requests_per_s"], b["requests_per_s"],
                         round(b["requests_per_s"] / max(u["requests_per_s"], 1e-9), 2),
                         u["p50_ms"], u["p99_ms"], b["p50_ms"], b["p99_ms"], u["refused"] + b["refused"]])
        lines += markdown_table(["clients", "unbatched req/s", "batched req/s", "ratio", "unbatched p50 ms",
                                 "unbatched p99 ms", "batched p50 ms", "batched p99 ms", "refused"], rows) + [""]
    bar = payload["bars"]
    lines += ["## Bars", "",
              f"- throughput_ratio_16_clients = {bar['throughput_ratio_16_clients']} (>= 3: "
              f"{'met' if bar['throughput_ratio_met'] else 'NOT met'})",
              f"- batched p99 at 16 clients = {bar['batched_p99_16_clients_ms']} ms (<= 2 x unbatched 1-client p50 + "
              f"max_queue_delay_ms = {bar['batched_p99_16_clients_limit_ms']} ms: "
              f"{'met' if bar['p99_met'] else 'NOT met'})", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--window-s", type=float, default=4.0)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--server-threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--server-core", type=int, default=None, help="pin the server to this core (default: not)")
    parser.add_argument("--large-scale", type=float, default=2.0, help="window and warmup x this for large requests")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--out", default="benchmarks/results/serve_load")
    args = parser.parse_args()
    if 16 not in args.clients or 1 not in args.clients:
        parser.error("--clients must include 1 and 16 (the bars)")
    config = BatchingConfig()
    with tempfile.TemporaryDirectory(prefix="fedrefine-serve-load-") as scratch:
        results = {mode: run_mode(mode, args, Path(scratch)) for mode in MODES}
    payload = {
        "command": script_command(), "commit": git_commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "server": f"{args.server_threads} torch threads, " + (f"core {args.server_core}" if args.server_core is not None
                                                                else "not pinned") + "; clients in one process",
        "batching": vars(config), "clients": args.clients, "window_s": args.window_s, "warmup_s": args.warmup_s,
        "large_scale": args.large_scale,
        "sizes": {k: {"prompts": p, "tokens": t} for k, (p, t) in SIZES.items()},
        "results": results, "bars": bars(results, config),
    }
    write_results(args.out, payload, markdown(payload))


if __name__ == "__main__":
    main()
