"""Latency and cost at the paper's real shapes (random weights): receiver alone, C2C with 1, 2 and 4 senders,
T2T with 64-token hints, private C2C and T2T with a 64-token rephrase, the fuser's training step.

    python benchmarks/latency.py [--repeats 5] [--batch16-repeats 3] [--threads 2]

Models are the shipped configs (fp32 on CPU; bf16 on CUDA when a GPU is there; real vocabulary sizes for the
receiver and the first sender, the other senders' cut to the local tokenizer to fit 24 GiB):
receiver Qwen3-0.6B; senders Qwen2.5-0.5B-Instruct, then Llama-3.2-1B-Instruct, Qwen2.5-Coder-0.5B-Instruct
and Qwen2.5-1.5B-Instruct. One OpenBookQA-length prompt (about 128 receiver tokens), the answer read
from the next-token logits (letter mode). Generated texts (hints, rephrasings) are forced to 64 tokens:
random weights stop at random places. Routes are interleaved, so drift hits all alike; medians.

Per route: stage seconds (rephrase, sender prefill, transfer at 10 / 100 / 1000 Mbit/s from the bytes,
fuse, receiver), serial total, and the critical path with the senders beside the receiver:
max(rephrase + sender + transfer, receiver alone) + added. ``fuse`` is the fusion step timed on its own
(last-token fusion runs inside the receiver's last token: there it is ``added``); ``added`` is what the
receiver with fusion takes beyond the receiver alone on the same prompt. Measured too: C2C with the senders
in threads of one process (a process of its own: see PHASES), and (one sender) with the sender in its own
process pinned to its own core, one thread each; and (batch 1) the receiver alone cast to bf16 (``receiver.bf16``, the same
seeded weights and token ids: ``bf16_receiver_over_fp32_receiver``, reported without a bar). ``added`` of last-token
fusion is the median of its paired differences (in each run the receiver alone, with fusion twice, alone again).
The issue's bars are listed with each ratio and whether it is met. Writes benchmarks/results/latency.{json,md}
(benchmarks/results/gpu/latency.* on CUDA).

Fusers are the shipped real-pair config's (configs/qwen3_qwen25.yaml), random weights; ``c2c.values`` is the
same fuser without its key stream (values-only fusion), ``c2c.hidden128`` the same at half its width. The
fuser's matrix products are also timed alone, with their multiply-accumulates against the receiver's: the
floor of the fuse step (``fuse_over_fuser_matmul_floor`` is the median ratio of fuse steps and floors timed in turn). Every phase runs with glibc told to keep large freed blocks in its heap
(``--heap-tunables``; '' for glibc's defaults): fusion's large temporaries otherwise cost page faults on
each call, a standard CPU-inference setting, recorded in the results.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from remote_latency import participant_config, served  # the same server launcher (benchmarks/ is on sys.path)

from fedrefine.bench.records import git_commit, markdown_table, script_command, write_results
from fedrefine.fuser import Fuser, FuserConfig
from fedrefine.fusion import FusedReceiver, FusionBatch
from fedrefine.fusion.strategy import prefill_all_but_last
from fedrefine.participants import Participant
from fedrefine.participants.padding import left_pad
from fedrefine.participants.sources import RandomRealParticipant
from fedrefine.privacy.rephrase import DEFAULT_REPHRASE_TEMPLATE
from fedrefine.runtime.participant_client import CallSettings, ParticipantClient
from fedrefine.runtime.security import ClientSecurity
from fedrefine.tasks.multiple_choice import MultipleChoiceItem
from fedrefine.tasks.t2t import TOKEN_ID_BYTES, T2TConfig, hint_messages
from fedrefine.timing import stopwatch, synchronize, time_inside

RECEIVER = "Qwen/Qwen3-0.6B"
SENDERS = ["Qwen/Qwen2.5-0.5B-Instruct", "meta-llama/Llama-3.2-1B-Instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct",
           "Qwen/Qwen2.5-1.5B-Instruct"]
GENERATED_TOKENS = 64
RATES_MBIT = (10, 100, 1000)
SHIPPED_CONFIG = "configs/qwen3_qwen25.yaml"
#: The hidden size of the slimmer fuser also timed (the toy world's; the shipped config's is 256).
SLIM_HIDDEN = 128
#: glibc keeps freed blocks up to 32 MiB in its heap instead of returning them to the OS (the default mmaps
#: every block over 128 KiB afresh, so each large temporary costs page faults). Set for every phase's process.
HEAP_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"
QUESTION = MultipleChoiceItem(
    id="latency-0",
    question_stem=("A student holds one end of a spoon, a stick, a rod and a straw while the other end sits in boiling "
                   "water. Which lets the most heat through"),
    choices=("the metal spoon", "the wooden stick", "the glass rod", "the plastic straw"),
    labels=("A", "B", "C", "D"),
    answer_key="A",
)


# --- participants and fusers -----------------------------------------------------------------------
def real_source(hub_id: str, real_vocabulary: bool = True) -> RandomRealParticipant:
    """Random weights at the real shape and the real vocabulary size (a small local tokenizer makes the ids)."""
    return RandomRealParticipant(hub_id, seed=0, real_vocabulary=real_vocabulary)


def real_participant(hub_id: str, device: torch.device, dtype: torch.dtype, real_vocabulary: bool = True) -> Participant:
    participant = real_source(hub_id, real_vocabulary).load()
    participant.model.to(device, dtype)
    return participant


def shipped_fuser_config() -> dict:
    """The fuser of the shipped real-pair config (:data:`SHIPPED_CONFIG`), the one users train."""
    return dict(yaml.safe_load(Path(SHIPPED_CONFIG).read_text())["model"]["init_args"]["fuser"])


def fuser_for(sender: Participant, receiver: Participant, **config) -> Fuser:
    """A fuser of the shipped config (``config`` overrides fields), with random weights so every delta is computed."""
    fuser = Fuser(sender.identity, receiver.identity, FuserConfig(**(shipped_fuser_config() | config | {"dropout": 0.0})))
    return fuser.to(receiver.device, next(receiver.model.parameters()).dtype).eval()


def question_messages() -> list[dict]:
    options = " ".join(f"({label}) {choice}" for label, choice in zip(QUESTION.labels, QUESTION.choices))
    return [{"role": "user", "content": f"{QUESTION.question_stem}?\n{options}\nAnswer with the letter."}]


def batch_for(model: FusedReceiver, messages, size: int, sender_messages=None) -> FusionBatch:
    example = model.encoder.encode(messages, sender_messages=sender_messages)
    return model.encoder.collate([example] * size).to(model.receiver.device)


# --- timed pieces ------------------------------------------------------------------------------------
def seconds(run: Callable[[], object], device: torch.device) -> float:
    with stopwatch(device) as elapsed:
        run()
    return elapsed.seconds


def generate_forced(participant: Participant, prompt: str, size: int) -> tuple[list[int], float]:
    """Greedy generation of exactly :data:`GENERATED_TOKENS` tokens for ``prompt`` (batch ``size``); ids, seconds."""
    from fedrefine.participants.chat import encode_chat

    ids = encode_chat(participant, [{"role": "user", "content": prompt}]).input_ids
    input_ids, mask = left_pad([ids] * size, participant.tokenizer.pad_token_id)
    input_ids, mask = input_ids.to(participant.device), mask.to(participant.device)
    with stopwatch(participant.device) as elapsed:
        output = participant.model.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=GENERATED_TOKENS, min_new_tokens=GENERATED_TOKENS,
            do_sample=False, pad_token_id=participant.tokenizer.pad_token_id,
        )
    return output[0, input_ids.shape[1] :].tolist(), elapsed.seconds


def receiver_forward(receiver: Participant, messages, size: int) -> float:
    """The receiver alone over ``messages`` (B = ``size``): its next-token logits, seconds."""
    model = FusedReceiver(receiver, [], [])
    batch = model.encoder.collate([model.encoder.encode(messages)] * size).to(receiver.device)
    return seconds(lambda: model(batch), receiver.device)


def c2c_stages(model: FusedReceiver, batch: FusionBatch, senders: list[str], own_prompt: bool = False) -> dict[str, float]:
    """Sender prefills (each timed), then the receiver over the messages: fuse (inside the fusers) and the rest.

    ``own_prompt``: the route's prompt is not the plain one (last-token fusion reads an answer prefix), so the
    receiver alone is timed on it too and the fuse stage is measured against that.
    """
    device = model.receiver.device
    stages, messages = {}, {}
    for name in senders:
        with stopwatch(device) as elapsed:
            messages[name] = model.sending.send(name, batch.senders[name])
        stages[f"sender:{name}"] = elapsed.seconds
    if own_prompt:  # alone, fused, fused, alone: the difference is what fusion adds, drift cancelled
        alone = [seconds(lambda: model(batch), device)]
    with time_inside(list(model.fusers), device) as inside, stopwatch(device) as elapsed:
        model(batch, messages)
    stages["fuse_inside"], stages["receiver_with_fusion"] = inside.seconds, elapsed.seconds
    if own_prompt:
        stages["receiver_with_fusion"] = (elapsed.seconds + seconds(lambda: model(batch, messages), device)) / 2
        stages["receiver_own_prompt"] = (alone[0] + seconds(lambda: model(batch), device)) / 2
    if not own_prompt:  # the fusion step itself, timed alone: prompt-position and concat fusion run it before the
        # receiver's last tokens (last-token fusion runs inside them: there only the difference measures it)
        stages["fuse_step"] = seconds(fuse_step(model, batch, messages), device)
    stages["bytes"] = float(sum(m.nbytes for m in messages.values()))
    stages["sender_bytes"] = {n: float(m.nbytes) for n, m in messages.items()}
    return stages


def fuse_step(model: FusedReceiver, batch: FusionBatch, messages: dict) -> Callable[[], object]:
    """The fusion step alone (prompt-position or concat fusion), over the receiver's prefill of all but the last token."""
    ids, mask = batch.receiver_input_ids, batch.receiver_attention_mask
    inputs = model.fusion_inputs(batch, messages)
    own = prefill_all_but_last(model.receiver, ids, mask) if model.strategy.aligns else None
    return lambda: model.strategy.prepare(model.receiver, ids, mask, inputs, own)


def fuser_matmul_floor(fuser: Fuser, receiver: Participant, tokens: int, repeats: int,
                       step: Callable[[], object]) -> dict[str, float]:
    """The fuser's matrix products alone (its stacked inference weights, ``tokens`` rows of random inputs):
    the part of the fuse step that no change to the code around them removes. With the multiply-accumulates
    of those products and of the receiver's own over its prompt (its decoder layers' weight matrices per
    token, the output head for one; attention scores left out), the floor as a ratio, by time and by count.
    ``step`` (the fuse step whose floor this is) is timed in turn with the products, ``repeats`` pairs, and the ratio
    is the median of paired ratios (drift between two separately timed medians moved it by 0.2 and more here)."""
    stack = fuser._stacks.stack
    if stack is None:
        raise RuntimeError("Run the fuser once in inference before timing its products (it stacks its weights then).")
    weights = []
    for stream in (s for s in (stack.key, stack.value) if s is not None):
        blocks = (stream.trunk, *stream.projection_blocks, stream.weight_block)
        weights += [stream.sender_input[0], stream.projection[0], stream.weight_head[0]]
        weights += [w for block in blocks for w in (block.up[0], block.down[0])]
        weights += [] if stream.receiver_input is None else [stream.receiver_input]
    inputs = [torch.randn(w.shape[0], tokens, w.shape[1], dtype=w.dtype, device=w.device) for w in weights]

    def products() -> None:
        for x, w in zip(inputs, weights):
            torch.bmm(x, w)  # (L, tokens, in) @ (L, in, out)

    products()
    step()  # warm-up
    times, steps = [], []
    for _ in range(repeats):
        steps.append(seconds(step, receiver.device))
        times.append(seconds(products, receiver.device))
    fuser_macs = sum(w.numel() * tokens for w in weights)
    decoder = sum(p.numel() for name, p in receiver.model.named_parameters() if ".layers." in name and p.dim() == 2)
    head = receiver.model.get_output_embeddings().weight.numel()
    return {"fuser_matmuls_s": statistics.median(times), "fuser_macs": float(fuser_macs),
            "receiver_macs": float(decoder * (tokens + 1) + head), "fuse_step_paired_s": statistics.median(steps),
            "fuse_over_floor_paired": statistics.median(f / m for f, m in zip(steps, times))}


# --- one measurement pass ----------------------------------------------------------------------------
class Bench:
    """The receiver, the first ``num_senders`` senders, and fused receivers for each recipe."""

    def __init__(self, args, device: torch.device, dtype: torch.dtype, num_senders: int) -> None:
        self.args, self.device = args, device
        self.receiver = real_participant(RECEIVER, device, dtype)
        # The receiver and the first sender (the pair the ratios are about) at their real vocabulary sizes; the
        # other three senders' vocabularies are cut to the local tokenizer, to fit 24 GiB: a sender's prefill
        # computes one position's logits, so its vocabulary costs it little time.
        self.senders = {
            f"s{i}": real_participant(hub, device, dtype, real_vocabulary=i == 0) for i, hub in enumerate(SENDERS[:num_senders])
        }
        names = list(self.senders)
        prompt = {n: fuser_for(s, self.receiver) for n, s in self.senders.items()}
        self.models = {
            "prompt": FusedReceiver(self.receiver, list(self.senders.values()), list(prompt.values()), sender_names=names).eval(),
            "prompt_threads": FusedReceiver(self.receiver, list(self.senders.values()), list(prompt.values()),
                                            sender_names=names, concurrent_senders=True).eval(),
            "last": FusedReceiver(self.receiver, [self.senders["s0"]], [fuser_for(self.senders["s0"], self.receiver, fuse_at="last")],
                                  sender_names=["s0"]).eval(),
            "concat": FusedReceiver(self.receiver, [self.senders["s0"]], [fuser_for(self.senders["s0"], self.receiver, mode="concat")],
                                    sender_names=["s0"]).eval(),
            # the shipped fuser without its key stream (fuse_keys: false): what fusing keys costs
            "values": FusedReceiver(self.receiver, [self.senders["s0"]], [fuser_for(self.senders["s0"], self.receiver, fuse_keys=False)],
                                    sender_names=["s0"]).eval(),
            # half the shipped width (the toy world's): what a slimmer fuser would cost
            "slim": FusedReceiver(self.receiver, [self.senders["s0"]],
                                  [fuser_for(self.senders["s0"], self.receiver, hidden_size=SLIM_HIDDEN)], sender_names=["s0"]).eval(),
        }
        self.messages = question_messages()
        self.bf16: tuple[FusedReceiver, FusionBatch] | None = None

    def routes(self, size: int) -> dict[str, Callable[[], dict[str, float]]]:
        """Route name -> a run returning its stages (seconds; bytes where there are any)."""
        messages, models = self.messages, self.models
        batch = batch_for(models["prompt"], messages, size)
        # last-token fusion reads the answer prefix as message content (evaluation.prefill_answer), so it aligns
        prefilled = [*messages, {"role": "assistant", "content": "The correct answer is"}]
        last, concat = batch_for(models["last"], prefilled, size), batch_for(models["concat"], messages, size)

        def alone() -> dict[str, float]:
            return {"receiver": seconds(lambda: models["prompt"](batch), self.device)}  # no messages: the receiver alone

        def c2c(key: str, data: FusionBatch, senders: list[str]) -> Callable[[], dict[str, float]]:
            return lambda: c2c_stages(models[key], data, senders)

        def threads(senders: list[str]) -> Callable[[], dict[str, float]]:
            def run() -> None:  # the senders in threads, the receiver's prefill meanwhile
                sent = models["prompt_threads"].send(batch, senders)
                models["prompt_threads"](batch, sent.messages, sent.own)

            return lambda: {"wall": seconds(run, self.device)}

        def t2t(private: bool) -> dict[str, float]:
            stages, question = {}, QUESTION.question_stem
            if private:
                _, stages["rephrase"] = generate_forced(self.receiver, DEFAULT_REPHRASE_TEMPLATE.format(query=question), size)
            hint, stages["sender:s0"] = generate_forced(self.senders["s0"], T2TConfig().prompt_template.format(question=question), size)
            text = self.senders["s0"].tokenizer.decode(hint, skip_special_tokens=True)
            stages["receiver"] = receiver_forward(self.receiver, hint_messages(QUESTION, [text], T2TConfig()), size)
            stages["bytes"] = float(len(hint) * TOKEN_ID_BYTES * size)
            return stages

        def private_c2c() -> dict[str, float]:
            ids, rephrase = generate_forced(self.receiver, DEFAULT_REPHRASE_TEMPLATE.format(query=QUESTION.question_stem), size)
            rephrased = [{"role": "user", "content": self.receiver.tokenizer.decode(ids, skip_special_tokens=True)}]
            data = batch_for(models["concat"], messages, size, sender_messages={"s0": rephrased})
            return {"rephrase": rephrase, **c2c_stages(models["concat"], data, ["s0"])}

        routes = {
            "receiver": alone,
            "c2c:1": c2c("prompt", batch, ["s0"]),
            "c2c:1 threads": threads(["s0"]),
            "c2c.last:1": lambda: c2c_stages(models["last"], last, ["s0"], own_prompt=True),
            "c2c.concat:1": c2c("concat", concat, ["s0"]),
            "t2t:1": lambda: t2t(False),
        }
        if size == 1:
            routes |= {
                "receiver.bf16": self.receiver_bf16,
                "c2c.values:1": c2c("values", batch, ["s0"]),
                f"c2c.hidden{SLIM_HIDDEN}:1": c2c("slim", batch, ["s0"]),
                "c2c:2": c2c("prompt", batch, ["s0", "s1"]),
                "c2c:4": c2c("prompt", batch, ["s0", "s1", "s2", "s3"]),
                "c2c:4 threads": threads(["s0", "s1", "s2", "s3"]),
                "private c2c.concat:1": private_c2c,
                "private t2t:1": lambda: t2t(True),
            }
        return routes

    def receiver_bf16(self) -> dict[str, float]:
        """The receiver alone in bf16 (the same seeded weights, cast; the same token ids), loaded when first run."""
        if self.bf16 is None:
            model = FusedReceiver(real_participant(RECEIVER, self.device, torch.bfloat16), [], [])
            self.bf16 = model, batch_for(model, self.messages, 1)
        model, batch = self.bf16
        return {"receiver": seconds(lambda: model(batch), self.device)}

    def fuse_step(self, size: int) -> Callable[[], object]:
        """c2c:1's fuse step at batch ``size`` (the pair the floor is about), its message sent once."""
        model = self.models["prompt"]
        batch = batch_for(model, self.messages, size)
        with torch.no_grad():
            messages = {"s0": model.sending.send("s0", batch.senders["s0"])}
            step = fuse_step(model, batch, messages)

        def run() -> None:
            with torch.no_grad():
                step()

        return run

    def measure(self, size: int, repeats: int, threads: bool = False) -> dict[str, dict]:
        """The routes at batch ``size``: those with the senders in threads (``threads``), or all the others; the
        receiver alone with either."""
        chosen = {"receiver", *filter(None, self.args.routes.split(","))}
        routes = {n: r for n, r in self.routes(size).items() if (not self.args.routes or n in chosen)
                  and (n == "receiver" or n.endswith(" threads") == threads)}
        runs: dict[str, list[dict]] = {name: [] for name in routes}
        with torch.no_grad():
            for run in routes.values():  # warm-up
                run()
            for _ in range(repeats):  # interleaved
                for name, run in routes.items():
                    runs[name].append(run())
        return {name: summarise(name, rows, runs) for name, rows in runs.items()}

    def training_step(self, repeats: int) -> dict[str, float]:
        """A fuser training step (sender prefill, fused forward, backward into the fuser, AdamW) vs a receiver
        forward + backward on the same batch (prompt plus a 16-token response)."""
        model = FusedReceiver(self.receiver, [self.senders["s0"]], [fuser_for(self.senders["s0"], self.receiver)], sender_names=["s0"])
        encoded = model.encoder.encode(self.messages, response="The answer is (A), the metal spoon, because metal conducts heat.")
        batch = model.encoder.collate([encoded]).to(self.device)
        model.fusers.train()
        optimizer = torch.optim.AdamW(model.fusers.parameters(), lr=1e-4)
        full = torch.cat((batch.receiver_input_ids, batch.response_ids), dim=1)
        mask = torch.cat((batch.receiver_attention_mask, batch.response_mask), dim=1)

        def fuser_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            sent = model.send(batch)
            model(batch, sent.messages, sent.own).logits[:, :-1].float().logsumexp(-1).mean().backward()
            optimizer.step()

        def receiver_step() -> None:  # what fine-tuning the receiver would cost: its weights take gradients
            params = list(self.receiver.model.parameters())
            for p in params:
                p.requires_grad_(True)
            try:
                keep = batch.response_ids.shape[1] + 1  # the same logits the fuser's loss reads
                self.receiver.model(input_ids=full, attention_mask=mask, logits_to_keep=keep).logits.float().logsumexp(-1).mean().backward()
            finally:
                for p in params:
                    p.requires_grad_(False)
                    p.grad = None

        times = {"fuser_step": [], "receiver_step": []}
        for _ in range(repeats + 1):  # the first of each is a warm-up
            times["fuser_step"].append(seconds(fuser_step, self.device))
            times["receiver_step"].append(seconds(receiver_step, self.device))
        return {k: statistics.median(v[1:]) for k, v in times.items()}


def summarise(name: str, rows: list[dict], runs: dict[str, list[dict]]) -> dict:
    """Median stages of a route, its serial total, and its critical path with the senders beside the receiver."""
    keys = [k for k in rows[0] if k not in ("sender_bytes",)]
    median = {k: statistics.median(r[k] for r in rows) for k in keys}
    if "wall" in median:
        return {"measured_s": median["wall"]}
    out = {"stages": {}, "bytes": median.get("bytes", 0.0)}
    senders = {k: v for k, v in median.items() if k.startswith("sender:")}
    alone = statistics.median(r["receiver"] for r in runs["receiver"])
    rephrase = median.get("rephrase", 0.0)
    if "receiver_with_fusion" in median:
        alone = median.get("receiver_own_prompt", alone)  # the receiver alone on this route's prompt
        fuse = median["receiver_with_fusion"] - alone  # everything fusion adds on the receiver's side
        if "receiver_own_prompt" in median:  # timed back to back in each run: the median of the paired differences
            fuse = statistics.median(r["receiver_with_fusion"] - r["receiver_own_prompt"] for r in rows)
        out["stages"] = {"rephrase": rephrase, "sender": max(senders.values()), "fuse": median.get("fuse_step", fuse),
                         "fuse_inside": median["fuse_inside"], "added_to_receiver": fuse, "receiver": alone}
        share = {n: b / max(1.0, median["bytes"]) for n, b in rows[0]["sender_bytes"].items()}
        for rate in RATES_MBIT:
            wire = {n: median["bytes"] * s * 8 / (rate * 1e6) for n, s in share.items()}
            out[f"critical_path_{rate}mbit_s"] = max(rephrase + max(senders[f"sender:{n}"] + wire[n] for n in wire), alone) + fuse
            out[f"serial_{rate}mbit_s"] = rephrase + sum(senders.values()) + sum(wire.values()) + median["receiver_with_fusion"]
    else:  # receiver alone, T2T: nothing runs beside the receiver
        out["stages"] = {"rephrase": rephrase, "sender": sum(senders.values()), "receiver": median["receiver"]}
        for rate in RATES_MBIT:
            wire = out["bytes"] * 8 / (rate * 1e6)
            out[f"critical_path_{rate}mbit_s"] = out[f"serial_{rate}mbit_s"] = sum(out["stages"].values()) + wire
    return out


def measured_critical_path(bench: Bench, repeats: int, workdir: Path) -> dict[str, float]:
    """One sender in its own process on core 1, the receiver here on core 0, one thread each (CPU only)."""
    sender, fuser = bench.senders["s0"], bench.models["prompt"].fuser_for("s0")
    bench.models.clear()  # make room for the served sender's process
    gc.collect()
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {0})
    try:
        model = FusedReceiver(bench.receiver, [sender], [fuser], sender_names=["s0"]).eval()
        batch = batch_for(model, bench.messages, 1)
        (workdir / "token").write_text("latency-benchmark")
        config = participant_config(workdir, "sender", real_source(SENDERS[0]).describe())
        with served(["participant", "--config", config, "--token-file", str(workdir / "token")], workdir, "sender", 1) as port:
            # the served sender is the same seeded model as the local view bench.senders["s0"] (identities match)
            client = ParticipantClient(f"grpc://127.0.0.1:{port}", bench.senders["s0"].identity,
                                       ClientSecurity(token_file=str(workdir / "token")), CallSettings(deadline_s=120.0))
            fused = FusedReceiver(bench.receiver, [sender], [fuser], sender_names=["s0"], remotes={"s0": client}).eval()
            times = {"receiver_alone": [], "c2c_remote": [], "c2c_serial": []}

            def c2c(receiver: FusedReceiver):  # the sender sends once (remote: the receiver prefills meanwhile)
                sent = receiver.send(batch)
                return receiver(batch, sent.messages, sent.own)

            with torch.no_grad():
                c2c(fused)
                for _ in range(repeats):
                    times["receiver_alone"].append(seconds(lambda: model(batch), bench.device))
                    times["c2c_remote"].append(seconds(lambda: c2c(fused), bench.device))
                    times["c2c_serial"].append(seconds(lambda: c2c(model), bench.device))
        return {k: statistics.median(v) for k, v in times.items()}
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count())))
        torch.set_num_threads(bench.args.threads)


# --- report ------------------------------------------------------------------------------------------
def fuse_ratios(results: dict) -> dict[str, float]:
    """The fuse step against its matmul floor (prompt positions, batch 1 and 16) and what last-token fusion adds to
    the receiver alone on its prompt (batch 1)."""
    out = {}
    for size in (1, 16):
        batch = results.get(f"batch_{size}", {})
        if "fuser_floor" in batch:
            suffix = "" if size == 1 else "_batch16"
            out[f"fuse_over_fuser_matmul_floor{suffix}"] = batch["fuser_floor"]["fuse_over_floor_paired"]
    if "receiver.bf16" in results.get("batch_1", {}):  # reported, no bar
        b1 = results["batch_1"]
        out["bf16_receiver_over_fp32_receiver"] = b1["receiver.bf16"]["stages"]["receiver"] / b1["receiver"]["stages"]["receiver"]
    if "c2c.last:1" in results.get("batch_1", {}):
        last = results["batch_1"]["c2c.last:1"]["stages"]
        out["last_token_added_over_receiver_alone"] = last["added_to_receiver"] / last["receiver"]
    return out


def ratios(results: dict) -> dict[str, float]:
    if not {"batch_1", "training"} <= set(results):  # a partial run (--phases): the fuse ratios only
        return fuse_ratios(results)
    b1 = results["batch_1"]
    alone = b1["receiver"]["stages"]["receiver"]
    c2c, t2t = b1["c2c:1"], b1["t2t:1"]
    out = {
        "c2c_over_t2t": c2c["critical_path_1000mbit_s"] / t2t["critical_path_1000mbit_s"],
        "c2c_serial_over_t2t": c2c["serial_1000mbit_s"] / t2t["serial_1000mbit_s"],
        "c2c_threads_over_t2t": b1["c2c:1 threads"]["measured_s"] / t2t["serial_1000mbit_s"],
        "fuse_over_receiver_alone": c2c["stages"]["fuse"] / alone,
        "added_to_receiver_over_receiver_alone": c2c["stages"]["added_to_receiver"] / alone,
        "fuse_inside_fusers_over_receiver_alone": c2c["stages"]["fuse_inside"] / alone,
        "fuse_values_only_over_receiver_alone": b1["c2c.values:1"]["stages"]["fuse"] / alone,
        f"fuse_hidden{SLIM_HIDDEN}_over_receiver_alone": b1[f"c2c.hidden{SLIM_HIDDEN}:1"]["stages"]["fuse"] / alone,
        "fuser_step_over_receiver_step": results["training"]["fuser_step"] / results["training"]["receiver_step"],
        "fuser_matmuls_over_receiver_alone": b1["fuser_floor"]["fuser_matmuls_s"] / alone,
        "fuser_macs_over_receiver_macs": b1["fuser_floor"]["fuser_macs"] / b1["fuser_floor"]["receiver_macs"],
    }
    if "critical_path_measured" in results:
        m = results["critical_path_measured"]
        out["c2c_critical_path_over_receiver_alone"] = m["c2c_remote"] / m["receiver_alone"]
    return out | fuse_ratios(results)


#: The bars of issue 37 on :func:`ratios` (``bf16_receiver_over_fp32_receiver`` is reported, with no bar).
BARS = {
    "fuse_over_fuser_matmul_floor": ("<=", 1.3),
    "fuse_over_fuser_matmul_floor_batch16": ("<=", 1.3),
    "last_token_added_over_receiver_alone": ("<=", 0.03),
    "c2c_critical_path_over_receiver_alone": ("<=", 1.2),
    "c2c_over_t2t": ("<=", 0.25),
    "fuser_step_over_receiver_step": ("<=", 1.0),
}


def bars(found: dict[str, float]) -> dict[str, dict]:
    """Each bar whose ratio was measured: its value, the bar, and whether it is met."""
    return {name: {"value": found[name], "bar": f"{op} {limit}", "met": found[name] <= limit}
            for name, (op, limit) in BARS.items() if name in found}


def markdown(payload: dict) -> str:
    lines = ["# Latency at real shapes (random weights)", "",
             f"`{payload['command']}` at `{payload['commit']}`; {payload['machine']}; {payload['threads']} threads, "
             f"{payload['dtype']}. Receiver {RECEIVER}; senders " + ", ".join(SENDERS) + f". One prompt of "
             f"{payload['receiver_tokens']} receiver tokens; hints and rephrasings forced to {GENERATED_TOKENS} tokens; "
             f"medians of {payload['repeats']} interleaved runs (batch 16: {payload['batch16_repeats']}). Fuser: "
             f"`{json.dumps(payload['fuser'])}` (c2c.values: the same with `fuse_keys: false`; c2c.hidden{SLIM_HIDDEN}: "
             f"with `hidden_size: {SLIM_HIDDEN}`). "
             f"GLIBC_TUNABLES=`{payload['glibc_tunables'] or 'unset'}`.", ""]
    header = ["route", "rephrase s", "sender s", "fuse s", "added s", "receiver s", "bytes", "serial s (1 Gbit/s)",
              "critical path s (1 Gbit/s)", "critical path s (10 Mbit/s)"]
    for size in (s for s in (1, 16) if f"batch_{s}" in payload["results"]):
        rows = []
        for name, r in payload["results"][f"batch_{size}"].items():
            if not isinstance(r, dict) or name == "fuser_floor":
                continue
            if "measured_s" in r:
                rows.append([name + " (measured)", "", "", "", "", "", "", "", f"{r['measured_s']:.3f}", ""])
                continue
            st = r["stages"]
            rows.append([name, f"{st.get('rephrase', 0):.3f}", f"{st.get('sender', 0):.3f}",
                         f"{st['fuse']:.3f}" if "fuse" in st else "",
                         f"{st['added_to_receiver']:.3f}" if "added_to_receiver" in st else "", f"{st['receiver']:.3f}", f"{r['bytes']:,.0f}",
                         f"{r['serial_1000mbit_s']:.3f}", f"{r['critical_path_1000mbit_s']:.3f}",
                         f"{r['critical_path_10mbit_s']:.3f}"])
        lines += [f"## Batch {size}", ""] + markdown_table(header, rows) + [""]
    results = payload["results"]
    for size in (1, 16):
        floor = results.get(f"batch_{size}", {}).get("fuser_floor")
        if floor is not None:
            paired = (f" Timed in turn with them, the fuse step takes {floor['fuse_step_paired_s']:.3f} s: "
                      f"{floor['fuse_over_floor_paired']:.3f}x its floor (median of the pairs' ratios).")
            lines += [f"The fuser's matrix products alone (c2c:1, batch {size}, its own weights): {floor['fuser_matmuls_s']:.3f} s; "
                      f"{floor['fuser_macs'] / 1e9:.2f} G multiply-accumulates against the receiver's {floor['receiver_macs'] / 1e9:.1f} G."
                      + paired, ""]
    if "critical_path_measured" in results:
        m = results["critical_path_measured"]
        lines += ["## Critical path with the sender in its own process (1 sender, each on its own core, 1 thread)", "",
                  f"receiver alone {m['receiver_alone']:.3f} s, C2C serial in one process {m['c2c_serial']:.3f} s, "
                  f"C2C with the sender in its own process {m['c2c_remote']:.3f} s.", ""]
    t = results.get("training", {"fuser_step": float("nan"), "receiver_step": float("nan")})
    lines += [f"Fuser training step {t['fuser_step']:.3f} s vs receiver forward + backward {t['receiver_step']:.3f} s. "
              f"Peak RSS of this process: {payload['peak_rss_gib']:.1f} GiB.", "", "## Ratios", ""]
    lines += markdown_table(["ratio", "value"], [[k, f"{v:.3f}"] for k, v in payload["ratios"].items()]) + [""]
    lines += ["## Bars", ""] + markdown_table(["ratio", "value", "bar", "met"], [
        [k, f"{b['value']:.3f}", b["bar"], "yes" if b["met"] else "no"] for k, b in payload["bars"].items()]) + [""]
    return "\n".join(lines)


#: Each phase runs in its own process (memory: all five models fit 24 GiB, not with batch-16 activations too), with
#: the number of senders it loads. The routes with the senders in threads have their own processes (``threads_*``):
#: once a process had run torch in a pool of sender threads, every later route in it ran 1.4-1.5x slower here (the
#: receiver alone 0.73 s before, 1.01-1.10 s after), which skewed every other figure of the phase.
PHASES = {"batch_1": 4, "threads_1": 4, "batch_16": 1, "threads_16": 1, "training": 1, "critical_path_measured": 1}


def run_phase(args, device: torch.device, dtype: torch.dtype) -> dict:
    bench = Bench(args, device, dtype, PHASES[args.phase])
    if args.phase == "batch_1":
        result = bench.measure(1, args.repeats)
        result["receiver_tokens"] = int(batch_for(bench.models["prompt"], bench.messages, 1).receiver_attention_mask.sum())
        fuser = bench.models["prompt"].fuser_for("s0")  # the prompt-position fusion fuses all but the last token
        if fuser._stacks.stack is not None:  # c2c:1 ran (not so in a partial run without it)
            result["fuser_floor"] = fuser_matmul_floor(fuser, bench.receiver, result["receiver_tokens"] - 1,
                                                       args.floor_repeats, bench.fuse_step(1))
    elif args.phase == "batch_16":
        result = bench.measure(16, args.batch16_repeats)
        tokens = int(batch_for(bench.models["prompt"], bench.messages, 1).receiver_attention_mask.sum()) - 1
        result["fuser_floor"] = fuser_matmul_floor(bench.models["prompt"].fuser_for("s0"), bench.receiver, 16 * tokens,
                                                   max(args.batch16_repeats, args.floor_repeats // 3), bench.fuse_step(16))
    elif args.phase.startswith("threads_"):
        size = int(args.phase.removeprefix("threads_"))
        result = bench.measure(size, args.repeats if size == 1 else args.batch16_repeats, threads=True)
    elif args.phase == "training":
        result = bench.training_step(args.repeats)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = measured_critical_path(bench, args.repeats, Path(tmp))
    synchronize(device)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch16-repeats", type=int, default=3)
    parser.add_argument("--floor-repeats", type=int, default=15,
                        help="fuse step / matmul floor pairs timed in turn (batch 16: a third, at least --batch16-repeats)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="default benchmarks/results/latency (gpu/latency on CUDA)")
    parser.add_argument("--heap-tunables", default=HEAP_TUNABLES,
                        help="GLIBC_TUNABLES for every phase's process ('' leaves glibc's defaults)")
    parser.add_argument("--phases", default="", help=f"comma-separated subset of {','.join(PHASES)} (default: all; "
                        "a partial run reports the fuse ratios only: give --out another path)")
    parser.add_argument("--routes", default="", help="comma-separated route names to time (default: all); "
                        "'receiver' is always timed")
    parser.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)  # one phase, in a child process
    parser.add_argument("--phase-out", help=argparse.SUPPRESS)
    args, argv = parser.parse_args(), sys.argv[1:]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_num_threads(args.threads)
    if args.phase:
        Path(args.phase_out).write_text(json.dumps(run_phase(args, device, dtype)))
        return
    phases = [p for p in PHASES if p != "critical_path_measured" or (device.type == "cpu" and os.cpu_count() >= 2)]
    phases = [p for p in phases if not args.phases or p in args.phases.split(",")]
    results = {}
    env = os.environ | ({"GLIBC_TUNABLES": args.heap_tunables} if args.heap_tunables else {})
    with tempfile.TemporaryDirectory() as tmp:
        for phase in phases:
            out = Path(tmp) / f"{phase}.json"
            subprocess.run([sys.executable, __file__, *argv, "--phase", phase, "--phase-out", str(out)], check=True, env=env)
            results[phase] = json.loads(out.read_text())
    peak_rss = max(r.pop("peak_rss_gib") for r in results.values())
    for size in (1, 16):  # the threads routes join their batch's table (their receiver alone is kept apart)
        if f"threads_{size}" in results and f"batch_{size}" in results:
            threaded = results.pop(f"threads_{size}")
            results[f"batch_{size}"] |= {k: v for k, v in threaded.items() if k.endswith(" threads")}
            results[f"batch_{size}"]["receiver_in_threads_phase_s"] = threaded["receiver"]["stages"]["receiver"]
    out = args.out or ("benchmarks/results/gpu/latency" if device.type == "cuda" else "benchmarks/results/latency")
    payload = {
        "command": script_command(), "commit": git_commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores" + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""),
        "threads": args.threads, "dtype": str(dtype).removeprefix("torch."), "repeats": args.repeats,
        "batch16_repeats": args.batch16_repeats, "torch": torch.__version__,
        "fuser": shipped_fuser_config() | {"dropout": 0.0, "from": SHIPPED_CONFIG}, "glibc_tunables": args.heap_tunables,
        "phases": phases, "routes": args.routes or "all",
        "receiver_tokens": results.get("batch_1", {}).pop("receiver_tokens", None),
        "peak_rss_gib": peak_rss,
        "results": results,
    }
    payload["ratios"] = ratios(results)
    payload["bars"] = bars(payload["ratios"])
    write_results(out, payload, markdown(payload))


if __name__ == "__main__":
    main()
