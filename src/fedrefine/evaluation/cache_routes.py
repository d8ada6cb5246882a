"""Routes answered by the receiver's own model over its (fused) cache: the receiver alone, C2C with a subset of
senders (controls included), and C2C with the senders a selection picks per question."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedrefine.evaluation.choices import Choices
from fedrefine.evaluation.handler import Answering, RouteHandler
from fedrefine.evaluation.metrics import RouteResult
from fedrefine.evaluation.question_batch import QueryPlanner, QuestionBatch, Variant
from fedrefine.federation.selection import SenderSelection
from fedrefine.fusion import FusedReceiver, FusionBatch
from fedrefine.tasks.routes import Route
from fedrefine.timing import stopwatch, time_inside
from fedrefine.wire.message import KVMessage, random_message_like


class ReceiverAlone(RouteHandler):
    """``receiver``: the receiver answers from its own prefill (of the rephrasing, in shared mode)."""

    def answer(self, batch: QuestionBatch, route: Route, result: RouteResult) -> Choices:
        fusion = batch.fusion[Variant.of(route)]
        with stopwatch(fusion.receiver_input_ids.device) as elapsed:
            chosen = self.choose(fusion, {}, batch.receiver_options[route.query_mode], batch)
        result.stages["receiver"] = elapsed.seconds
        return chosen


class CacheRoute(RouteHandler):
    """``c2c[:A+B][_control]``: every selected sender sends once; the receiver reads its prompt fused with the
    messages once and answers from that read. ``_random_kv`` fuses Gaussian stand-ins of the messages.

    Args:
        generator: random numbers of the ``_random_kv`` control (None: torch's global generator).
    """

    def __init__(
        self, model: FusedReceiver, answering: Answering, planner: QueryPlanner, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(model, answering, planner)
        self.generator = generator

    def answer(self, batch: QuestionBatch, route: Route, result: RouteResult) -> Choices:
        fusion = batch.fusion[Variant.of(route)]
        messages = self.send(fusion, route.senders, result)
        if route.control == "random_kv":
            messages = {n: random_message_like(m, self.generator) for n, m in messages.items()}
        model, device = self.model, fusion.receiver_input_ids.device
        fusing = [*model.fusers, *([model.source_gate] if model.source_gate is not None else [])]
        with time_inside(fusing, device) as fuse, stopwatch(device) as elapsed:
            chosen = self.choose(fusion, messages, batch.receiver_options[route.query_mode], batch)
        if messages:
            result.stages["fuse"] = fuse.seconds
        result.stages["receiver"] = elapsed.seconds - fuse.seconds
        return chosen

    def send(self, fusion: FusionBatch, senders: Sequence[str], result: RouteResult) -> dict[str, KVMessage]:
        """Every selected sender's message (remote ones all at once), timed and its bytes counted; remote senders
        that did not deliver are recorded and left out. The receiver's own prefill is not overlapped with the
        senders here, so that the sender and receiver stages are measured apart."""
        with stopwatch(fusion.receiver_input_ids.device) as elapsed:
            outcome = self.model.send(fusion, senders, self.answering.link, prefill_meanwhile=False)
        messages = outcome.messages
        transfer = max((d.transfer_seconds for d in outcome.deliveries.values()), default=0.0)
        result.stages["sender"] = elapsed.seconds - transfer
        if outcome.deliveries:
            result.stages["transfer"] = transfer  # measured: the slowest call's time on the wire
        result.transport_bytes += sum(d.transport_bytes for d in outcome.deliveries.values())
        result.contributed = tuple(messages)
        result.dropped = {n: err.why for n, err in outcome.dropped.items()}
        result.bytes_sent += sum(m.nbytes for m in messages.values())
        result.sender_bytes_per_token = {n: float(m.bytes_per_token) for n, m in messages.items()}
        result.bytes_per_token += sum(result.sender_bytes_per_token.values())
        return messages


class AutoRoute(RouteHandler):
    """``c2c:auto``: per question, the senders ``selection`` picks; questions with the same pick answer together.

    Args:
        selection: chooses the senders of each question.
    """

    def __init__(
        self, model: FusedReceiver, answering: Answering, planner: QueryPlanner, selection: SenderSelection | None
    ) -> None:
        if selection is None:
            raise ValueError("Route 'c2c:auto' needs a sender selection (model.selection or measure_selection).")
        super().__init__(model, answering, planner)
        self.selection = selection

    def answer(self, batch: QuestionBatch, route: Route, result: RouteResult) -> Choices:
        result.selected = [tuple(self.selection.select(item)) for item in batch.items]
        fusion, options = batch.fusion[Variant("item", "original")], batch.receiver_options["original"]
        parts, where = [], []
        with stopwatch(fusion.receiver_input_ids.device) as elapsed:
            for subset in sorted(set(result.selected)):
                rows = [i for i, s in enumerate(result.selected) if s == subset]
                part_fusion = fusion.select(rows)
                sent = self.model.send(part_fusion, list(subset), self.answering.link)
                parts.append(self.choose(part_fusion, sent.messages, [options[i] for i in rows], batch, sent.own))
                where.append(rows)
        chosen = Choices.concat(parts, where, len(result.selected))
        result.stages["receiver"] = elapsed.seconds
        return chosen
