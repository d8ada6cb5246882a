"""C2C reference checkpoints imported into FedRefine: every tensor survives, and the fused receiver computes what
the reference computes.

    python benchmarks/c2c_import.py [--no-full-size] [--threads 2]

For two tiny pairs of the real architecture classes (a Qwen3 receiver; a Qwen2 sender that shares the receiver's
tokenizer, and a Llama sender with another tokenizer) this script writes a checkpoint folder in the reference's
format (``projector_t.json`` with the class name and init args, ``projector_t.pt`` with random tensors under the
reference's parameter names, ``projector_config.json`` with the layer map), imports it (``import_c2c``), and

- ``roundtrip_max_abs_diff``: the largest difference between a tensor written and the same tensor in the imported
  fuser, and in the checkpoint that fuser exports again (0: every tensor survives);
- ``logits_max_abs_diff``: the largest difference between the receiver's next-token logits after a multiple-choice
  prompt (the reference's logits protocol) from FedRefine's ``FusedReceiver`` with the imported fuser and from a
  plain-torch restatement of the reference's forward written below from the math: both models prefill the fused
  section; each receiver layer's projector computes ``t + [k > 0] sigmoid(W_w FFN(h)) * (W_p FFN(h))`` with
  ``h = FFN(W_in [s ; t] + b)`` on the keys as the caches hold them (rotated) and on the values; the result is
  written over the receiver's cache there; the receiver runs the rest of the prompt over it. FedRefine's logits
  are taken both ways it reads a prompt: ``FusedReceiver.forward`` (training) and ``read_prompt`` (evaluation).

The restatement takes the sender's token ids and where its columns sit from the encoding (the same vocabulary:
the receiver's own ids, asserted; another tokenizer: FedRefine's re-encoding of the reference's alignment,
which ``tests/test_c2c_import.py`` checks token by token). At full size a random checkpoint for
Qwen3-0.6B <- Qwen2.5-0.5B-Instruct (28 projectors, hidden 1024, bfloat16 as the reference trains) is written
and imported: parameter count, file size and import seconds. Writes ``benchmarks/results/c2c_import.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from fedrefine.bench.records import git_commit, script_command
from fedrefine.fuser import Fuser
from fedrefine.fuser.c2c_import import export_c2c, import_c2c
from fedrefine.fuser.reference import reference_names
from fedrefine.fusion import FusedReceiver
from fedrefine.kv.cache import with_cache
from fedrefine.participants import ParticipantIdentity, TinySpec, build_tiny_participant, real_model_config
from fedrefine.tasks.multiple_choice import MultipleChoiceItem, encode_question

RECEIVER = TinySpec("qwen3-receiver", "qwen3", num_layers=3, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16)
QWEN2 = TinySpec("qwen2-sender", "qwen2", num_layers=4, hidden_size=32, num_heads=4, num_kv_heads=1, head_dim=8, seed=2)
LLAMA = TinySpec(
    "llama-sender", "llama", num_layers=2, hidden_size=48, num_heads=6, num_kv_heads=3, head_dim=8,
    rope_theta=500000.0, tokenizer_kind="metaspace_bpe", chat_style="llama3", seed=1,
)
QUESTIONS = [
    MultipleChoiceItem("q1", "Which city is the capital of France?", ("Paris", "Rome", "Berlin", "Madrid"),
                       ("A", "B", "C", "D"), "A"),
    MultipleChoiceItem("q2", "What do plants need to grow?", ("sand", "sunlight", "noise", "plastic"),
                       ("A", "B", "C", "D"), "B"),
]


# --- a checkpoint in the reference's format, from random tensors ----------------------------------------------
def reference_state(sender: ParticipantIdentity, receiver: ParticipantIdentity, hidden: int, inner: int, blocks: int,
                    generator: torch.Generator, gates: tuple[float, float]) -> dict[str, Tensor]:
    """One projector's state dict under the reference's names, with random tensors at Linear-like scales."""
    source, target = sender.num_kv_heads * sender.head_dim, receiver.num_kv_heads * receiver.head_dim

    def uniform(*shape: int) -> Tensor:
        bound = 1 / math.sqrt(shape[-1])
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound

    def mlp(prefix: str, width: int, count: int) -> dict[str, Tensor]:
        out = {}
        for i in range(count):
            out[f"{prefix}.blocks.{i}.norm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=generator)
            out[f"{prefix}.blocks.{i}.w1.weight"] = uniform(width, hidden)
            out[f"{prefix}.blocks.{i}.w2.weight"] = uniform(hidden, width)
        return out

    state: dict[str, Tensor] = {}
    for stream, gate in zip(("key", "value"), gates):
        state |= {f"{stream}_in.weight": uniform(hidden, source + target), f"{stream}_in.bias": uniform(hidden, 1)[:, 0]}
        state |= mlp(f"{stream}_mlp1", inner, 1) | mlp(f"{stream}_scalar_mlp2", hidden, 1)
        state |= mlp(f"{stream}_proj_mlp2", inner, blocks - 2)
        state |= {f"{stream}_scalar_head.weight": uniform(receiver.num_kv_heads, hidden),
                  f"{stream}_scalar_head.bias": uniform(receiver.num_kv_heads, 1)[:, 0],
                  f"{stream}_proj_out.weight": uniform(target, hidden), f"{stream}_proj_out.bias": uniform(target, 1)[:, 0],
                  f"{stream}_gate_logit": torch.tensor(gate)}
    state["gate_temperature"] = torch.tensor(0.001)
    return state


def write_reference_checkpoint(directory: Path, sender: ParticipantIdentity, receiver: ParticipantIdentity,
                               hidden: int, inner: int, blocks: int, dtype: torch.dtype, seed: int,
                               closed: dict[int, tuple[float, float]]) -> dict[int, dict[str, Tensor]]:
    """The folder the reference's training writes (top layers aligned); returns the tensors written per projector."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    T, S = receiver.num_layers, sender.num_layers
    init_args = {"source_dim": sender.head_dim, "target_dim": receiver.head_dim, "source_num_heads": sender.num_kv_heads,
                 "target_num_heads": receiver.num_kv_heads, "intermediate_dim": inner, "hidden_dim": hidden,
                 "num_layers": blocks, "dtype": {"__type__": "torch.dtype", "value": str(dtype).split(".")[-1]}}
    written = {}
    for t in range(T):
        state = {k: v.to(dtype) for k, v in reference_state(sender, receiver, hidden, inner, blocks, generator,
                                                              closed.get(t, (1.0, 1.0))).items()}
        torch.save(state, directory / f"projector_{t}.pt")
        (directory / f"projector_{t}.json").write_text(json.dumps({"class": "C2CProjector", "init_args": init_args}))
        written[t] = state
    mapping = {"0": {"1": {str(t): [[max(S - T + t, 0), t]] for t in range(T)}}}
    (directory / "projector_config.json").write_text(json.dumps(mapping))
    return written


def roundtrip_diff(written: dict[int, dict[str, Tensor]], fuser: Fuser, exported: Path) -> float:
    """Largest |written - imported| and |written - exported again| over every parameter of every projector."""
    names = reference_names(fuser.config.num_blocks)
    worst = 0.0
    for t, state in written.items():
        again = torch.load(exported / f"projector_{t}.pt", weights_only=True)
        for mine, theirs in names.items():
            ours = fuser.layers[t].get_parameter(mine).detach()
            worst = max(worst, (ours - state[theirs].float()).abs().max().item(),
                        (again[theirs].float() - state[theirs].float()).abs().max().item())
    return worst


# --- the reference's forward, restated from the math ----------------------------------------------------------
def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def ffn(x: Tensor, state: dict[str, Tensor], prefix: str, count: int) -> Tensor:
    """``count`` pre-norm blocks x + W2 GELU(W1 RMSNorm(x)), bias-free."""
    for i in range(count):
        block = f"{prefix}.blocks.{i}"
        x = x + F.gelu(rms_norm(x, state[f"{block}.norm.weight"]) @ state[f"{block}.w1.weight"].T) @ state[f"{block}.w2.weight"].T
    return x


def projector(state: dict[str, Tensor], stream: str, source: Tensor, target: Tensor, blocks: int) -> Tensor:
    """One stream of one projector: source (1, H_s, n, D_s), target (1, H_t, n, D_t) -> the new target."""
    batch, heads, length, dim = target.shape
    s = source.permute(0, 2, 1, 3).reshape(batch, length, -1)
    t = target.permute(0, 2, 1, 3).reshape(batch, length, -1)
    h = torch.cat([s, t], -1) @ state[f"{stream}_in.weight"].T + state[f"{stream}_in.bias"]
    h = ffn(h, state, f"{stream}_mlp1", 1)
    projected = ffn(h, state, f"{stream}_proj_mlp2", blocks - 2) @ state[f"{stream}_proj_out.weight"].T + state[f"{stream}_proj_out.bias"]
    weight = torch.sigmoid(ffn(h, state, f"{stream}_scalar_mlp2", 1) @ state[f"{stream}_scalar_head.weight"].T
                           + state[f"{stream}_scalar_head.bias"])  # (1, n, H_t)
    gate = (state[f"{stream}_gate_logit"] > 0).float()
    delta = weight.permute(0, 2, 1)[..., None] * projected.view(batch, length, heads, dim).permute(0, 2, 1, 3)
    return target + gate * delta


@torch.no_grad()
def restated_logits(receiver, sender, states, layer_map, blocks, receiver_ids: list[int], sender_ids: list[int],
                    fused: tuple[int, int], sender_start: int) -> Tensor:
    """The receiver's logits after ``receiver_ids`` with its columns ``fused`` = [a, b) fused from the sender's
    columns from ``sender_start`` on; columns from b on run over the fused cache."""
    a, b = fused
    ids = torch.tensor([receiver_ids])
    sender_cache = sender.model(torch.tensor([sender_ids]), use_cache=True).past_key_values
    cache = receiver.model(ids[:, :b], use_cache=True).past_key_values
    for t, s in enumerate(layer_map):
        state = {k: v.float() for k, v in states[t].items()}
        source_k = sender_cache.layers[s].keys[:, :, sender_start : sender_start + b - a]
        source_v = sender_cache.layers[s].values[:, :, sender_start : sender_start + b - a]
        layer = cache.layers[t]
        new_k = projector(state, "key", source_k, layer.keys[:, :, a:b], blocks)
        new_v = projector(state, "value", source_v, layer.values[:, :, a:b], blocks)
        layer.keys[:, :, a:b], layer.values[:, :, a:b] = new_k, new_v
    positions = torch.arange(b, len(receiver_ids))[None]
    return receiver.model(ids[:, b:], **with_cache(receiver.model, cache), position_ids=positions).logits[0, -1]


# --- one pair ----------------------------------------------------------------------------------------------------
def run_pair(name: str, receiver, sender, tmp: Path) -> dict:
    closed = {1: (-1.0, 1.0)}  # layer 1: key gate closed, value gate open (the streams are gated apart)
    blocks, hidden, inner = 3, 32, 48
    written = write_reference_checkpoint(tmp / name, sender.identity, receiver.identity, hidden, inner, blocks,
                                         torch.float32, seed=11, closed=closed)
    report = import_c2c(tmp / name, sender.identity, receiver.identity)
    fuser = report.fuser
    exported = export_c2c(fuser, tmp / f"{name}-again")
    roundtrip = roundtrip_diff(written, fuser, exported)

    model = FusedReceiver(receiver, [sender], [fuser]).eval()
    questions = []
    for item in QUESTIONS:
        receiver_chat = encode_question(receiver, item).chat
        example = model.encoder.encode_chats(receiver_chat, {sender.name: encode_question(sender, item).chat})
        batch = model.encoder.collate([example])
        with torch.no_grad():
            sent = model.send(batch)
            ours = model(batch, sent.messages, sent.own).logits[0, 0]
            read = model.read_prompt(batch, sent.messages).last_logits[0]  # the evaluation's path
            alone = model(batch, {}).logits[0, 0]
        theirs_ids = example.senders[sender.name].input_ids
        aligned = [i for i, j in enumerate(example.senders[sender.name].alignment) if j >= 0]
        a, b = aligned[0], aligned[-1] + 1
        assert aligned == list(range(a, b)), "the reference fuses one contiguous section of a one-message prompt"
        if sender.tokenizer.get_vocab() == receiver.tokenizer.get_vocab():
            assert theirs_ids == example.receiver_ids, "same vocabulary: the sender reads the receiver's ids"
            suffix = len(receiver.tokenizer("The correct answer is", add_special_tokens=False)["input_ids"])
            assert (a, b) == (0, len(example.receiver_ids) - suffix), "the reference fuses all but the answer prefix"
        start = example.senders[sender.name].alignment[a]
        restated = restated_logits(receiver, sender, written, fuser.layer_map, blocks, example.receiver_ids,
                                   theirs_ids, (a, b), start)
        questions.append({
            "id": item.id, "receiver_tokens": len(example.receiver_ids), "sender_tokens": len(theirs_ids),
            "fused_columns": [a, b],
            "logits_max_abs_diff": max((ours - restated).abs().max().item(), (read - restated).abs().max().item()),
            "fusion_changes_logits_by": (ours - alone).abs().max().item(),
            "same_argmax": int(ours.argmax()) == int(restated.argmax()),
        })
    return {
        "pair": f"{sender.identity.architecture} -> {receiver.identity.architecture}",
        "shares_tokenizer": sender.tokenizer.get_vocab() == receiver.tokenizer.get_vocab(),
        "projectors": receiver.identity.num_layers, "layer_map": fuser.layer_map,
        "open_gates": {"key": [bool(layer.key_gate.logit > 0) for layer in fuser.layers],
                       "value": [bool(layer.value_gate.logit > 0) for layer in fuser.layers]},
        "parameters": report.parameters,
        "roundtrip_max_abs_diff": roundtrip,
        "logits_max_abs_diff": max(q["logits_max_abs_diff"] for q in questions),
        "questions": questions,
    }


def full_size(tmp: Path) -> dict:
    """A random reference-format checkpoint for Qwen3-0.6B <- Qwen2.5-0.5B-Instruct at its real shapes, imported."""
    receiver = ParticipantIdentity.from_config(real_model_config("Qwen/Qwen3-0.6B"), "Qwen/Qwen3-0.6B", "main")
    sender = ParticipantIdentity.from_config(
        real_model_config("Qwen/Qwen2.5-0.5B-Instruct"), "Qwen/Qwen2.5-0.5B-Instruct", "main"
    )
    directory = tmp / "qwen3_0.6b+qwen2.5_0.5b_Fuser" / "final"
    started = time.perf_counter()
    write_reference_checkpoint(directory, sender, receiver, 1024, 1024, 3, torch.bfloat16, seed=0, closed={})
    written_s = time.perf_counter() - started
    size = sum(f.stat().st_size for f in directory.iterdir())
    report = import_c2c(directory, sender, receiver)
    saved = report.fuser.save(tmp / "imported")
    return {
        "pair": f"{sender.key} -> {receiver.key}", "projectors": len(report.fuser.layers),
        "hidden": report.fuser.config.hidden_size, "checkpoint_dtype": "bfloat16",
        "parameters": report.parameters, "checkpoint_bytes": size,
        "fedrefine_fuser_bytes": sum(f.stat().st_size for f in saved.iterdir()),
        "import_seconds": round(report.seconds, 2), "write_seconds": round(written_s, 2),
        "peak_rss_mb_of_the_whole_run": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-full-size", action="store_true", help="skip the full-size checkpoint")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/results/c2c_import.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    receiver = build_tiny_participant(RECEIVER)
    senders = {"qwen2_same_tokenizer": build_tiny_participant(QWEN2, tokenizer=receiver.tokenizer),
               "llama_other_tokenizer": build_tiny_participant(LLAMA)}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="c2c_import_") as tmp:
        pairs = {name: run_pair(name, receiver, sender, Path(tmp)) for name, sender in senders.items()}
        full = None if args.no_full_size else full_size(Path(tmp))
    payload = {
        "command": script_command(), "commit": git_commit(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "seconds": round(time.perf_counter() - started, 1),
        "roundtrip_max_abs_diff": max(p["roundtrip_max_abs_diff"] for p in pairs.values()),
        "logits_max_abs_diff": max(p["logits_max_abs_diff"] for p in pairs.values()),
        "bars": {"roundtrip_max_abs_diff": "== 0", "logits_max_abs_diff": "<= 1e-5"},
        "pairs": pairs, "full_size": full,
    }
    payload["bars_met"] = payload["roundtrip_max_abs_diff"] == 0 and payload["logits_max_abs_diff"] <= 1e-5
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps({k: payload[k] for k in ("roundtrip_max_abs_diff", "logits_max_abs_diff", "bars_met", "full_size")}, indent=2))


if __name__ == "__main__":
    main()
