"""Answering a batch of encoded questions by one route: the receiver alone, a sender alone, C2C (any sender
subset, with controls, or chosen per question) or T2T, timed per stage with the bytes each sender sent."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedrefine.evaluation.adaptive_choice import AdaptiveChoice
from fedrefine.evaluation.choices import Choices, extract_choices
from fedrefine.evaluation.config import AnswerMode, answer_style
from fedrefine.evaluation.metrics import RouteResult
from fedrefine.evaluation.question_batch import QueryPlanner, QuestionBatch, Variant
from fedrefine.evaluation.text_routes import TextRoutes
from fedrefine.federation.selection import SenderSelection
from fedrefine.fusion import FusedReceiver, FusionBatch
from fedrefine.privacy.leakage import leakage_report
from fedrefine.tasks.routes import Route
from fedrefine.tasks.scoring import NORMALIZATIONS, Normalization, score_options
from fedrefine.tasks.t2t import T2TConfig
from fedrefine.timing import stopwatch, time_inside
from fedrefine.wire.message import KVMessage, random_message_like


class RouteRunner:
    """Answers encoded question batches by any route of a fused receiver.

    Args:
        model: the receiver, its senders and fusers.
        mode: answer mode (letter logits, cloze or generation).
        normalization: how cloze scores are normalised for the reported predictions (each one is kept too).
        max_new_tokens: generation budget (``generate`` mode).
        planner: who read what in rephrased modes (for the rephrase stage and leakage).
        t2t: the T2T baseline's settings.
        selection: chooses senders per question for ``c2c:auto``.
        generator: random numbers of the ``_random_kv`` control (None: torch's global generator).
        adaptive: the ``adaptive`` route's choice (see :mod:`fedrefine.evaluation.adaptive_choice`).
    """

    def __init__(
        self,
        model: FusedReceiver,
        mode: AnswerMode = "logits",
        max_new_tokens: int = 64,
        planner: QueryPlanner | None = None,
        t2t: T2TConfig | None = None,
        selection: SenderSelection | None = None,
        generator: torch.Generator | None = None,
        normalization: Normalization = "token_mean",
        adaptive: AdaptiveChoice | None = None,
    ) -> None:
        self.model, self.mode, self.max_new_tokens, self.normalization = model, mode, max_new_tokens, normalization
        self.planner = planner or QueryPlanner()
        self.selection, self.generator = selection, generator
        self.adaptive = adaptive
        self.text = TextRoutes(model, mode, max_new_tokens, t2t, normalization)

    def run(self, batch: QuestionBatch, route: Route) -> RouteResult:
        """Answer every encodable question of the batch; questions that failed to encode are predicted -1."""
        device = batch.labels.device
        predictions = torch.full((len(batch),), -1, dtype=torch.long, device=device)
        result = RouteResult(predictions, 0.0)
        if self.mode == "cloze":
            result.cloze_predictions = {n: predictions.clone() for n in NORMALIZATIONS}
        if not batch.encoded_rows:
            return result
        plans = batch.plans.get((route.query_mode, self.planner.route_options(route)))
        if plans is not None and route.query_mode != "original":
            readers = {plans[0].receiver, *route.senders} if plans else set()
            read = [[r for name, r in p.rephrasings.items() if name in readers] for p in plans]  # by this route only
            generations = [{(r.query, r.seed): r for r in rs} for rs in read]  # per question; greedy: senders share one
            result.stages["rephrase"] = sum(r.seconds for g in generations for r in g.values())
            rephrased = [rs for rs in read if rs]  # the receiver alone reads none in private mode
            result.unfaithful = (sum(not all(r.faithful for r in rs) for rs in rephrased), len(rephrased))
            summary = leakage_report(plans)[1]
            result.leakage, result.private_tokens = summary.mean_token_overlap, (summary.private_tokens_leaked, summary.private_tokens)
        if route.kind == "adaptive":
            return self._adaptive(batch, route)
        if route.kind == "t2t":
            chosen = self.text.t2t(route, plans, result)
        elif route.auto:
            chosen = self._auto(batch, result)
        elif route.kind == "sender":
            with stopwatch(device) as elapsed:
                chosen = self.text.alone(batch, route.senders[0])
            result.stages["sender"] = elapsed.seconds
        else:
            chosen = self._fused(batch, route, result)
        rows = torch.tensor(batch.encoded_rows, device=device)
        predictions[rows] = chosen.chosen.to(device)
        for normalization, picks in chosen.cloze.items():
            result.cloze_predictions[normalization][rows] = picks.to(device)
        result.seconds = sum(result.stages.values())
        return result

    # --- C2C -----------------------------------------------------------------------------------
    def _send(self, fusion: FusionBatch, senders: Sequence[str], result: RouteResult) -> dict[str, KVMessage]:
        """Every selected sender's message (remote ones all at once), timed and its bytes counted; remote senders
        that did not deliver are recorded and left out."""
        with stopwatch(fusion.receiver_input_ids.device) as elapsed:
            outcome, _ = self.model.send_all(fusion, senders)
        kv_messages = outcome.messages
        transfer = max((d.transfer_seconds for d in outcome.deliveries.values()), default=0.0)
        result.stages["sender"] = elapsed.seconds - transfer
        if outcome.deliveries:
            result.stages["transfer"] = transfer  # measured: the slowest call's time on the wire
        result.transport_bytes += sum(d.transport_bytes for d in outcome.deliveries.values())
        result.contributed = tuple(kv_messages)
        result.dropped = {n: err.why for n, err in outcome.dropped.items()}
        result.bytes_sent += sum(m.nbytes for m in kv_messages.values())
        result.sender_bytes_per_token = {n: float(m.bytes_per_token) for n, m in kv_messages.items()}
        result.bytes_per_token += sum(result.sender_bytes_per_token.values())
        return kv_messages

    @torch.no_grad()
    def _choose(
        self, fusion: FusionBatch, senders: Sequence[str], kv_messages: Mapping[str, KVMessage] | None, options
    ) -> Choices:
        """Option chosen per row by the (fused) receiver, scored by letter logits or by cloze likelihood."""
        model = self.model

        def next_token_logits() -> Tensor:
            return model(fusion, senders=senders, kv_messages=kv_messages)[:, 0]  # (B, V)

        def forward(response_ids: Tensor, response_mask: Tensor) -> Tensor:
            device = fusion.receiver_input_ids.device
            scored = dataclasses.replace(fusion, response_ids=response_ids.to(device), response_mask=response_mask.to(device))
            return model(scored, senders=senders, kv_messages=kv_messages)  # (B, 1 + R, V)

        scores = score_options(next_token_logits, forward, options, answer_style(self.mode), model.receiver.tokenizer.pad_token_id)
        return Choices.of(scores.cpu(), self.normalization)

    def _fused(self, batch: QuestionBatch, route: Route, result: RouteResult) -> Choices:
        fusion = batch.fusion[Variant.of(route)]
        options = batch.receiver_options[route.query_mode]
        senders = list(route.senders) if route.kind == "c2c" else []
        kv_messages = self._send(fusion, senders, result) if senders else {}
        if route.control == "random_kv":
            kv_messages = {n: random_message_like(m, self.generator) for n, m in kv_messages.items()}
        device = fusion.receiver_input_ids.device
        model = self.model
        fusing = [*model.fusers, *([model.source_gate] if model.source_gate is not None else [])]
        with time_inside(fusing, device) as fuse, stopwatch(device) as elapsed:
            if self.mode != "generate":
                chosen = self._choose(fusion, list(kv_messages), kv_messages, options)
            else:
                generated = model.generate(fusion, self.max_new_tokens, senders=list(kv_messages), kv_messages=kv_messages)
                texts = model.receiver.tokenizer.batch_decode(generated, skip_special_tokens=True)
                chosen = Choices(extract_choices(texts, batch))
        if kv_messages:
            result.stages["fuse"] = fuse.seconds
        result.stages["receiver"] = elapsed.seconds - fuse.seconds
        return chosen

    def _auto(self, batch: QuestionBatch, result: RouteResult) -> Choices:
        if self.selection is None:
            raise ValueError("Route 'c2c:auto' needs a sender selection (model.selection or measure_selection).")
        result.selected = [tuple(self.selection.select(item)) for item in batch.items]
        fusion, options = batch.fusion[Variant("item", "original")], batch.receiver_options["original"]
        empty = torch.empty(len(result.selected), dtype=torch.long)
        chosen = Choices(empty, {n: empty.clone() for n in NORMALIZATIONS} if self.mode == "cloze" else {})
        with stopwatch(fusion.receiver_input_ids.device) as elapsed:
            for subset in sorted(set(result.selected)):
                rows = [i for i, s in enumerate(result.selected) if s == subset]
                part = self._choose(fusion.select(rows), list(subset), None, [options[i] for i in rows])
                chosen.chosen[rows] = part.chosen
                for normalization, picks in part.cloze.items():
                    chosen.cloze[normalization][rows] = picks
        result.stages["receiver"] = elapsed.seconds
        return chosen

    def _adaptive(self, batch: QuestionBatch, route: Route) -> RouteResult:
        """The option the adaptive policy chose, run as its own route over its own link."""
        if self.adaptive is None:
            raise ValueError("Route 'adaptive' needs evaluation.adaptive.profile.")
        option, model = self.adaptive.option, self.model
        saved = model.link
        model.link = self.adaptive.link_for(option, saved) if option.route == "c2c" else saved
        try:
            return self.run(batch, self.adaptive.route_for(option, route.senders))
        finally:
            model.link = saved
