"""``fedrefine serve participant``: one frozen participant as a gRPC service.

    Identity  -> its exact identity (what its fusers were trained for), wire format, codecs
    Prefill   -> its KV message in the wire format (fedrefine.kv_message), streamed in chunks
    Hint      -> T2T: greedy replies to prompts (the hints it writes)
    Rephrase  -> rewrites of queries (when the served config offers rephrasing)
    health    -> gRPC's standard health service

Requests are validated field by field before any model runs (:mod:`fedrefine.runtime.requests`). Model calls
run one at a time in a :class:`~fedrefine.runtime.batcher.Batcher`, which merges concurrent compatible requests
into one call (:mod:`fedrefine.runtime.model_calls`; each gets exactly its unbatched result) from a bounded
queue: a full queue answers RESOURCE_EXHAUSTED with a retry hint. Calls that run a model or stream are admitted
by a :class:`~fedrefine.runtime.admission.CallGate` (bounded per client and in total, each send with a
deadline); a call waiting in the queue holds a waiting place, not a reply slot. So health and Identity stay
answerable whatever other clients do. A call whose client has gone (cancelled, or past its deadline) is not
run. Every refusal is INVALID_ARGUMENT, RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED, short, and logged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import torch
from jsonargparse import ActionConfigFile, ArgumentParser

from fedrefine.participants import Participant
from fedrefine.participants.precision import cast_for_precision, resolve_precision
from fedrefine.participants.sources import ParticipantSource
from fedrefine.privacy.rephrase import RephraseConfig, Rephraser
from fedrefine.runtime.admission import CallGate, checked, refuse
from fedrefine.runtime.batcher import Batcher, BatcherClosed, BatchingConfig, QueueFull
from fedrefine.runtime.drills import TAMPERINGS
from fedrefine.runtime.identities import identity_json
from fedrefine.runtime.model_calls import HintWork, ModelCalls, RephraseWork, hint_key, prefill_key, rephrase_key
from fedrefine.runtime.protos import participant_pb2 as pb
from fedrefine.runtime.protos import participant_pb2_grpc as pb_grpc
from fedrefine.runtime.requests import ServeLimits, check_hint, check_prefill, check_rephrase
from fedrefine.runtime.security import ServerSecurity, logger
from fedrefine.runtime.serving import (
    add_address_arguments,
    add_health,
    add_security_arguments,
    new_server,
    security_from,
    serve_forever,
)
from fedrefine.settings import SettingsError, documented
from fedrefine.wire.codecs import CODEC_NAMES
from fedrefine.wire.format import FORMAT_NAME, FORMAT_VERSION

SERVICE_NAME = "fedrefine.participant.v1.Participant"
#: Bytes of message per streamed chunk (well under gRPC's 4 MiB default message size).
CHUNK_BYTES = 1 << 20


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
            raise SettingsError(f"Unknown drill.tamper {self.tamper!r}; choose one of {list(TAMPERINGS)}.")


class ParticipantServicer(pb_grpc.ParticipantServicer):
    """The gRPC methods of one participant.

    Args:
        participant: the frozen model served.
        rephraser: set when this participant offers rephrasing.
        limits: request limits.
        drill: deliberate faults (tests and drills only).
        batching: how concurrent requests share model calls.
    """

    def __init__(
        self,
        participant: Participant,
        rephraser: Rephraser | None = None,
        limits: ServeLimits | None = None,
        drill: FaultDrill | None = None,
        batching: BatchingConfig | None = None,
    ) -> None:
        self.participant, self.rephraser = participant, rephraser
        self.limits, self.drill = limits or ServeLimits(), drill or FaultDrill()
        self.batching = batching or BatchingConfig()
        # waiting places: the queue, the batch being run, and as many ready calls waiting for a reply slot
        waiting = self.batching.max_queue + 2 * self.batching.max_batch
        self.gate = CallGate(self.limits.max_calls, self.limits.max_calls_per_client, self.limits.send_timeout_s, waiting)
        self.batcher = Batcher(ModelCalls(participant, rephraser), self.batching)  # the one thread running the model

    def close(self) -> None:
        """Fail the queued calls and stop the model thread (bounded)."""
        self.batcher.close()

    def _model_call(self, context: grpc.ServicerContext, call, method: str, key, tokens: int, payload):
        """The payload's result from the batcher (None: the client left), then a reply slot for ``call``."""
        try:
            job = self.batcher.submit(key, payload, tokens, context.is_active)
        except QueueFull as full:
            refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(full), method, retry_after_s=full.retry_after_s)
        except BatcherClosed as err:
            refuse(context, grpc.StatusCode.UNAVAILABLE, f"{err}; retry later", method)
        try:
            result = self.batcher.result(job, context.time_remaining())
        except (TimeoutError, BatcherClosed) as err:
            if not context.is_active():
                return None
            code = grpc.StatusCode.DEADLINE_EXCEEDED if isinstance(err, TimeoutError) else grpc.StatusCode.UNAVAILABLE
            refuse(context, code, f"the model queue did not run this request: {err}", method)
        self.gate.take_slot(call, method)
        return result

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
        plan = checked(check_prefill, context, "Prefill", request, self.participant, self.limits)
        with self.gate.admit(context, "Prefill", queued=True) as call:
            if self.drill.delay_s:
                time.sleep(self.drill.delay_s)
            done = self._model_call(context, call, "Prefill", *prefill_key(plan), plan)
            if done is None:  # the client left (deadline or cancel) while this call waited
                return
            data, prefill_seconds, encode_seconds = done
            if self.drill.tamper:
                data = TAMPERINGS[self.drill.tamper](data)
            if self.drill.truncate:
                data = data[: len(data) // 2]
            yield from self.gate.stream(call, chunks(data, prefill_seconds, encode_seconds))

    # --- Hint / Rephrase -------------------------------------------------------------------------
    def Hint(self, request: pb.HintRequest, context: grpc.ServicerContext) -> pb.HintReply:
        work = HintWork(*checked(check_hint, context, "Hint", request, self.participant, self.limits))
        with self.gate.admit(context, "Hint", queued=True) as call:
            replies = self._model_call(context, call, "Hint", *hint_key(self.participant, work), work)
            if replies is None:
                return pb.HintReply()
        return pb.HintReply(replies=[pb.Reply(text=r.text, token_ids=list(r.token_ids), seconds=r.seconds) for r in replies])

    def Rephrase(self, request: pb.RephraseRequest, context: grpc.ServicerContext) -> pb.RephraseReply:
        if self.rephraser is None:
            refuse(context, grpc.StatusCode.UNIMPLEMENTED, "this participant does not offer rephrasing (serve it with "
                                                           "a `rephrase:` section)", "Rephrase")
        work = RephraseWork(*checked(check_rephrase, context, "Rephrase", request, self.limits))
        key, tokens = rephrase_key(self.rephraser, work)
        with self.gate.admit(context, "Rephrase", queued=True) as call:
            found = self._model_call(context, call, "Rephrase", key, tokens, work)
            if found is None:
                return pb.RephraseReply()
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


class ParticipantServer:
    """A :class:`grpc.Server` (every method passed through) whose ``stop`` also stops the servicer's model thread,
    once the calls in flight had their grace."""

    def __init__(self, server: grpc.Server, servicer: ParticipantServicer) -> None:
        self._server, self.servicer = server, servicer

    def __getattr__(self, name: str):
        return getattr(self._server, name)

    def stop(self, grace: float | None) -> threading.Event:
        stopped = self._server.stop(grace)

        def close() -> None:
            stopped.wait((grace or 0) + 5)
            self.servicer.close()

        threading.Thread(target=close, name="fedrefine-batcher-close", daemon=True).start()
        return stopped


def serve_participant(
    participant: Participant,
    host: str = "127.0.0.1",
    port: int = 0,
    security: ServerSecurity | None = None,
    rephrase: RephraseConfig | None = None,
    rephrase_cache_dir: str | None = None,
    limits: ServeLimits | None = None,
    drill: FaultDrill | None = None,
    batching: BatchingConfig | None = None,
) -> tuple[grpc.Server, int]:
    """A (not yet started) server for ``participant`` and the port it is bound to (stopping it, see
    :func:`~fedrefine.runtime.serving.new_server`, also stops its model thread)."""
    security = security or ServerSecurity()
    rephraser = None if rephrase is None else Rephraser(participant, rephrase, rephrase_cache_dir)
    servicer = ParticipantServicer(participant, rephraser, limits, drill, batching)
    server = ParticipantServer(new_server(security, workers=servicer.gate.workers), servicer)
    pb_grpc.add_ParticipantServicer_to_server(servicer, server)
    add_health(server, SERVICE_NAME)
    bound = security.add_port(server, f"{host}:{port}")
    return server, bound


def load_served(source: ParticipantSource, precision: str | None = None) -> Participant:
    """The participant ``source`` names, in ``precision``'s weight dtype (None: bf16 on a GPU, fp32 on CPU)."""
    resolved = resolve_precision(precision)  # a wrong value is refused before anything loads
    participant = source.load()
    cast_for_precision(participant.model, resolved)
    return participant


def config_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="fedrefine serve participant", description="Serve one participant over gRPC.")
    parser.add_argument("--config", action=ActionConfigFile, help="participant config (YAML)")
    parser.add_argument("--participant", type=ParticipantSource, required=True, help="the participant served")
    parser.add_argument("--rephrase", type=RephraseConfig | None, default=None, help="offer rephrasing with these settings")
    parser.add_argument("--rephrase_cache_dir", type=str | None, default=None, help="cache of its rephrasings")
    parser.add_argument("--limits", type=ServeLimits, default=ServeLimits(), help="request limits")
    parser.add_argument("--batching", type=BatchingConfig, default=BatchingConfig(),
                        help="how concurrent requests share model calls")
    parser.add_argument("--drill", type=FaultDrill, default=FaultDrill(), help="deliberate faults (drills and tests)")
    parser.add_argument("--threads", type=int | None, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--precision", type=str | None, default=None,
                        help="32-true, bf16-true or bf16-mixed: the served model's dtype (null: bf16 on a GPU, fp32 on CPU)")
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
    participant = load_served(init.participant, args.precision)
    server, port = serve_participant(
        participant, args.host, args.port, security_from(args), init.rephrase, args.rephrase_cache_dir,
        init.limits, init.drill, init.batching,
    )
    logger.info("serving %s", participant.identity.key)
    serve_forever(server, port, f"participant {participant.identity.name_or_path}", args.ready_file)
