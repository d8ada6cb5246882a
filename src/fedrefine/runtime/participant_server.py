"""``fedrefine serve participant``: one frozen participant as a gRPC service.

    Identity  -> its exact identity (what its fusers were trained for), wire format, codecs
    Prefill   -> its KV message in the wire format (fedrefine.kv_message), streamed in chunks
    Hint      -> T2T: greedy replies to prompts (the hints it writes)
    Rephrase  -> rewrites of queries (when the served config offers rephrasing)
    health    -> gRPC's standard health service

Requests are validated before any model runs (batch size, tokens, token ids, layers, codec), and one
model call runs at a time. A call whose client has gone (cancelled, or past its deadline) is not run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from torch import Tensor

from fedrefine.participants import Participant
from fedrefine.participants.generation import generate_replies
from fedrefine.participants.padding import left_pad
from fedrefine.participants.sources import ParticipantSource
from fedrefine.privacy.rephrase import RephraseConfig, Rephraser
from fedrefine.runtime.drills import TAMPERINGS
from fedrefine.runtime.identities import identity_json
from fedrefine.runtime.protos import participant_pb2 as pb
from fedrefine.runtime.protos import participant_pb2_grpc as pb_grpc
from fedrefine.runtime.security import ServerSecurity, logger
from fedrefine.runtime.serving import (
    add_address_arguments,
    add_health,
    add_security_arguments,
    new_server,
    security_from,
    serve_forever,
)
from fedrefine.settings import documented
from fedrefine.wire.codecs import CODEC_NAMES, codec_by_name
from fedrefine.wire.format import FORMAT_NAME, FORMAT_VERSION, serialize_message
from fedrefine.wire.message import prefill_message

SERVICE_NAME = "fedrefine.participant.v1.Participant"
#: Bytes of message per streamed chunk (well under gRPC's 4 MiB default message size).
CHUNK_BYTES = 1 << 20


@documented
@dataclass
class ServeLimits:
    """What one request may ask of a served participant."""

    max_batch: int = field(default=64, metadata={"help": "Most prompts per request."})
    max_tokens: int = field(default=65536, metadata={"help": "Most prompt tokens per request (all prompts)."})
    max_new_tokens: int = field(default=512, metadata={"help": "Longest Hint reply a request may ask for."})


@documented
@dataclass
class FaultDrill:
    """Make this participant misbehave on purpose, to see how a federation copes (off by default)."""

    delay_s: float = field(default=0.0, metadata={"help": "Sleep this long before answering each Prefill."})
    truncate: bool = field(default=False, metadata={"help": "Send only the first half of every KV message."})
    tamper: str | None = field(
        default=None,
        metadata={"help": f"Send every KV message tampered this way (a hostile sender): one of {', '.join(TAMPERINGS)}."},
    )

    def __post_init__(self) -> None:
        if self.tamper is not None and self.tamper not in TAMPERINGS:
            raise ValueError(f"Unknown drill.tamper {self.tamper!r}; choose one of {list(TAMPERINGS)}.")


class ParticipantServicer(pb_grpc.ParticipantServicer):
    """The gRPC methods of one participant.

    Args:
        participant: the frozen model served.
        rephraser: set when this participant offers rephrasing.
        limits: request limits.
        drill: deliberate faults (tests and drills only).
    """

    def __init__(
        self,
        participant: Participant,
        rephraser: Rephraser | None = None,
        limits: ServeLimits | None = None,
        drill: FaultDrill | None = None,
    ) -> None:
        self.participant, self.rephraser = participant, rephraser
        self.limits, self.drill = limits or ServeLimits(), drill or FaultDrill()
        self._model_lock = threading.Lock()  # one model call at a time: they share the CPU threads / the GPU

    def Identity(self, request: pb.IdentityRequest, context: grpc.ServicerContext) -> pb.IdentityReply:
        return pb.IdentityReply(
            identity_json=identity_json(self.participant.identity),
            wire_format=FORMAT_NAME,
            wire_version=FORMAT_VERSION,
            codecs=list(CODEC_NAMES),
            rephrases=self.rephraser is not None,
        )

    # --- Prefill ---------------------------------------------------------------------------------
    def Prefill(self, request: pb.PrefillRequest, context: grpc.ServicerContext) -> Iterator[pb.MessageChunk]:
        rows = self._prompt_rows(request, context)
        width = request.width or max(len(r) for r in rows)
        if width < max(len(r) for r in rows):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"width {width} is shorter than the longest prompt")
        identity = self.participant.identity
        layers = list(request.layers) or list(range(identity.num_layers))
        if any(not 0 <= j < identity.num_layers for j in layers) or len(set(layers)) != len(layers):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"layers {layers} are not distinct layers of a "
                                                            f"{identity.num_layers}-layer model")
        if request.codec not in CODEC_NAMES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown codec {request.codec!r}; use one of {CODEC_NAMES}")
        codec = codec_by_name(request.codec, request.group_size or 128)
        input_ids, attention_mask = left_pad(rows, self.participant.tokenizer.pad_token_id, width)  # (B, width) each
        sent = self._sent_mask(request, attention_mask, context)
        if self.drill.delay_s:
            time.sleep(self.drill.delay_s)
        with self._model_lock:
            if not context.is_active():  # the client left (deadline or cancel) while this call waited
                return
            start = time.perf_counter()
            device = self.participant.device
            message = prefill_message(self.participant, input_ids.to(device), attention_mask.to(device), layers,
                                      None if sent is None else sent.to(device))
            prefill_seconds = time.perf_counter() - start
        start = time.perf_counter()
        data = serialize_message(message, codec)
        encode_seconds = time.perf_counter() - start
        if self.drill.tamper:
            data = TAMPERINGS[self.drill.tamper](data)
        if self.drill.truncate:
            data = data[: len(data) // 2]
        yield from chunks(data, prefill_seconds, encode_seconds)

    def _prompt_rows(self, request: pb.PrefillRequest, context: grpc.ServicerContext) -> list[list[int]]:
        if bool(request.prompts) == bool(request.texts):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give exactly one of prompts (token ids) or texts")
        if request.texts:
            tokenizer = self.participant.tokenizer
            rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in request.texts]
        else:
            rows = [list(p.ids) for p in request.prompts]
        limits, vocab = self.limits, self.participant.identity.vocab_size
        if len(rows) > limits.max_batch:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{len(rows)} prompts; this participant takes at most "
                                                            f"{limits.max_batch} per request")
        if any(not r for r in rows):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an empty prompt")
        if sum(map(len, rows)) > limits.max_tokens:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{sum(map(len, rows))} prompt tokens; at most "
                                                              f"{limits.max_tokens} per request")
        if any(not 0 <= t < vocab for r in rows for t in r):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"token ids outside this tokenizer's vocabulary (0..{vocab - 1}):"
                                                            " tokenize with the participant's own tokenizer")
        return rows

    @staticmethod
    def _sent_mask(request: pb.PrefillRequest, attention_mask: Tensor, context: grpc.ServicerContext) -> Tensor | None:
        if not request.sent:
            return None
        if len(request.sent) != attention_mask.shape[0]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sent has {len(request.sent)} rows for "
                                                            f"{attention_mask.shape[0]} prompts")
        sent = torch.zeros_like(attention_mask)  # (B, width)
        for i, row in enumerate(request.sent):
            columns = list(row.ids)
            if any(not 0 <= c < attention_mask.shape[1] or not attention_mask[i, c] for c in columns):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sent row {i} names columns outside its prompt")
            sent[i, columns] = 1
        return sent

    # --- Hint / Rephrase -------------------------------------------------------------------------
    def Hint(self, request: pb.HintRequest, context: grpc.ServicerContext) -> pb.HintReply:
        if len(request.prompts) > self.limits.max_batch:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {self.limits.max_batch} prompts per request")
        if not 0 <= request.max_new_tokens <= self.limits.max_new_tokens:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"max_new_tokens must be in 0..{self.limits.max_new_tokens}")
        with self._model_lock:
            if not context.is_active():
                return pb.HintReply()
            replies = generate_replies(self.participant, list(request.prompts), request.max_new_tokens,
                                       request.batch_size or 16)
        return pb.HintReply(replies=[pb.Reply(text=r.text, token_ids=list(r.token_ids), seconds=r.seconds) for r in replies])

    def Rephrase(self, request: pb.RephraseRequest, context: grpc.ServicerContext) -> pb.RephraseReply:
        if self.rephraser is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this participant does not offer rephrasing (serve it with "
                                                         "a `rephrase:` section)")
        if len(request.queries) > self.limits.max_batch:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {self.limits.max_batch} queries per request")
        with self._model_lock:
            found = self.rephraser.rephrase(list(request.queries), request.variant or None)
        return pb.RephraseReply(rephrasings=[
            pb.Rephrasing(original=r.original, text=r.text, num_tokens=r.num_tokens, seconds=r.seconds) for r in found
        ])


def chunks(data: bytes, prefill_seconds: float, encode_seconds: float) -> Iterator[pb.MessageChunk]:
    """``data`` as :data:`CHUNK_BYTES` pieces; the first names the total, the last the sender's timings."""
    starts = range(0, max(1, len(data)), CHUNK_BYTES)
    for index, offset in enumerate(starts):
        chunk = pb.MessageChunk(data=data[offset : offset + CHUNK_BYTES])
        if index == 0:
            chunk.total_bytes = len(data)
        if index == len(starts) - 1:
            chunk.prefill_seconds, chunk.encode_seconds = prefill_seconds, encode_seconds
        yield chunk


def serve_participant(
    participant: Participant,
    host: str = "127.0.0.1",
    port: int = 0,
    security: ServerSecurity | None = None,
    rephrase: RephraseConfig | None = None,
    rephrase_cache_dir: str | None = None,
    limits: ServeLimits | None = None,
    drill: FaultDrill | None = None,
) -> tuple[grpc.Server, int]:
    """A (not yet started) server for ``participant`` and the port it is bound to."""
    security = security or ServerSecurity()
    server = new_server(security)
    rephraser = None if rephrase is None else Rephraser(participant, rephrase, rephrase_cache_dir)
    pb_grpc.add_ParticipantServicer_to_server(ParticipantServicer(participant, rephraser, limits, drill), server)
    add_health(server, SERVICE_NAME)
    bound = security.add_port(server, f"{host}:{port}")
    return server, bound


def config_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="fedrefine serve participant", description="Serve one participant over gRPC.")
    parser.add_argument("--config", action=ActionConfigFile, help="participant config (YAML)")
    parser.add_argument("--participant", type=ParticipantSource, required=True, help="the participant served")
    parser.add_argument("--rephrase", type=RephraseConfig | None, default=None, help="offer rephrasing with these settings")
    parser.add_argument("--rephrase_cache_dir", type=str | None, default=None, help="cache of its rephrasings")
    parser.add_argument("--limits", type=ServeLimits, default=ServeLimits(), help="request limits")
    parser.add_argument("--drill", type=FaultDrill, default=FaultDrill(), help="deliberate faults (drills and tests)")
    parser.add_argument("--threads", type=int | None, default=None, help="torch CPU threads (default: torch's)")
    add_address_arguments(parser)
    add_security_arguments(parser)
    return parser


def instantiate(parser: ArgumentParser, args):
    """The parsed config with its classes built (``instantiate`` from jsonargparse 4.49, before: ``instantiate_classes``)."""
    return (getattr(parser, "instantiate", None) or parser.instantiate_classes)(args)


def main(argv: list[str]) -> None:
    parser = config_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    init = instantiate(parser, args)
    participant = init.participant.load()
    server, port = serve_participant(
        participant, args.host, args.port, security_from(args), init.rephrase, args.rephrase_cache_dir,
        init.limits, init.drill,
    )
    logger.info("serving %s", participant.identity.key)
    serve_forever(server, port, f"participant {participant.identity.name_or_path}", args.ready_file)
