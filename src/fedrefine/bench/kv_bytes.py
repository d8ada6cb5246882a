"""Bytes a sender transmits per prompt token: C2C (its K/V cache) vs T2T (token ids), from config shapes alone.

``fedrefine kv-bytes`` prints the table for the FedRefine paper's models (no weights needed), to
compare with the paper's 88 KB (four senders, KV) vs 16 bytes (T2T) per token.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedrefine.fuser.config import LayerMapKind, layer_map
from fedrefine.kv.cache import positions_from_mask
from fedrefine.participants import REAL_MODELS, ParticipantIdentity, load_model_config, real_model_config
from fedrefine.tasks.t2t import TOKEN_ID_BYTES
from fedrefine.wire import CODEC_NAMES, codec_by_name, serialize_message
from fedrefine.wire.message import KVMessage

PAPER_RECEIVER = "Qwen/Qwen3-0.6B"
PAPER_SENDERS = (
    "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen/Qwen2.5-Coder-0.5B-Instruct",
    "Qwen/Qwen2.5-1.5B-Instruct",
    "meta-llama/Llama-3.2-1B-Instruct",
)


def identity_of(name_or_path: str) -> ParticipantIdentity:
    """The identity (cache shape) of a shipped real config, or of any local directory / hub id's config.json."""
    config = real_model_config(name_or_path) if name_or_path in REAL_MODELS else load_model_config(name_or_path)
    return ParticipantIdentity.from_config(config, name_or_path, "main")


@dataclass(frozen=True)
class SenderBytes:
    """One sender's transmission per prompt token."""

    sender: str
    layers_sent: int
    num_kv_heads: int
    head_dim: int
    kv_bytes: int
    token_bytes: int


def sender_bytes(
    sender: ParticipantIdentity,
    receiver: ParticipantIdentity,
    dtype: torch.dtype = torch.bfloat16,
    map_kind: LayerMapKind = "bottom_up",
    token_bytes: int = TOKEN_ID_BYTES,
) -> SenderBytes:
    """K and V of every sender layer the receiver's fusers read (one token), and T2T's bytes per token id."""
    layers = len(set(layer_map(map_kind, receiver.num_layers, sender.num_layers)))
    kv = sender.kv_bytes_per_token(layers, torch.tensor([], dtype=dtype).element_size())
    return SenderBytes(sender.name_or_path, layers, sender.num_kv_heads, sender.head_dim, kv, token_bytes)


def wire_bytes_per_token(
    sender: ParticipantIdentity, layers: int, codec: str, tokens: int = 128, dtype: torch.dtype = torch.bfloat16
) -> float:
    """Serialised bytes per prompt token of one sender's message (header included, spread over ``tokens``):
    random K/V of the sender's exact shapes for one ``tokens``-long prompt, encoded with ``codec``."""
    generator = torch.Generator().manual_seed(0)
    shape = (1, sender.num_kv_heads, tokens, sender.head_dim)
    kv = {j: tuple(torch.randn(shape, generator=generator).to(dtype) for _ in range(2)) for j in range(layers)}
    mask = torch.ones(1, tokens, dtype=torch.long)
    message = KVMessage(sender, kv, positions_from_mask(mask), mask)
    return len(serialize_message(message, codec_by_name(codec))) / tokens


def bytes_table(
    receiver: str = PAPER_RECEIVER,
    senders: Sequence[str] = PAPER_SENDERS,
    dtype: torch.dtype = torch.bfloat16,
    map_kind: LayerMapKind = "bottom_up",
) -> list[SenderBytes]:
    """Per-sender bytes per prompt token for a receiver and its senders, from their configs."""
    target = identity_of(receiver)
    return [sender_bytes(identity_of(s), target, dtype, map_kind) for s in senders]


def format_table(rows: Sequence[SenderBytes], receiver: str, dtype: torch.dtype, codec: str | None = None) -> str:
    what = f"{codec} wire format, header included" if codec else f"{str(dtype).removeprefix('torch.')} K/V"
    lines = [
        f"Bytes per prompt token sent to {receiver} ({what}; T2T: token ids)",
        f"{'sender':40} {'layers':>6} {'kv heads x dim':>15} {'C2C bytes':>10} {'T2T bytes':>10}",
    ]
    for r in rows:
        lines.append(f"{r.sender:40} {r.layers_sent:>6} {f'{r.num_kv_heads} x {r.head_dim}':>15} "
                     f"{r.kv_bytes:>10,} {r.token_bytes:>10}")
    kv, tokens = sum(r.kv_bytes for r in rows), sum(r.token_bytes for r in rows)
    lines.append(f"{f'all {len(rows)} senders':40} {'':>6} {'':>15} {kv:>10,} {tokens:>10}")
    lines.append(f"C2C sends {kv / 1024:.1f} KiB ({kv / 1000:.1f} kB) per token, {kv // max(1, tokens):,}x T2T's "
                 f"{tokens} bytes (the paper: 88 KB vs 16 bytes).")
    return "\n".join(lines)


#: Bounds on what ``fedrefine kv-bytes --codec`` allocates to measure a message.
MAX_PROMPT_TOKENS, MAX_MEASURED_BYTES = 65536, 2**30


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedrefine kv-bytes", description=__doc__.splitlines()[0])
    parser.add_argument("--receiver", default=PAPER_RECEIVER, help="hub id with a shipped config, or a local model dir")
    parser.add_argument("--senders", nargs="+", default=list(PAPER_SENDERS))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--layer-map", default="bottom_up", choices=["bottom_up", "top_down", "uniform"])
    parser.add_argument("--codec", choices=CODEC_NAMES, help="measure serialised messages with this codec instead")
    parser.add_argument("--prompt-tokens", type=int, default=128,
                        help=f"prompt length the header is spread over (1..{MAX_PROMPT_TOKENS:,})")
    args = parser.parse_args(argv)
    if not 1 <= args.prompt_tokens <= MAX_PROMPT_TOKENS:
        parser.error(f"--prompt-tokens must be in 1..{MAX_PROMPT_TOKENS:,}, got {args.prompt_tokens:,}")
    dtype = getattr(torch, args.dtype)
    rows = bytes_table(args.receiver, args.senders, dtype, args.layer_map)
    for row in rows if args.codec else []:  # the measured message is allocated: bound it first
        sender = identity_of(row.sender)
        size = row.layers_sent * 2 * sender.num_kv_heads * sender.head_dim * args.prompt_tokens * dtype.itemsize
        if size > MAX_MEASURED_BYTES:
            parser.error(f"--prompt-tokens {args.prompt_tokens:,} makes {row.sender}'s measured message {size:,} bytes, "
                         f"over {MAX_MEASURED_BYTES:,}; bytes per token hardly change past a few hundred tokens: use fewer")
    if args.codec:
        rows = [dataclasses.replace(r, kv_bytes=round(wire_bytes_per_token(
            identity_of(r.sender), r.layers_sent, args.codec, args.prompt_tokens, dtype))) for r in rows]
    print(format_table(rows, args.receiver, dtype, args.codec))
