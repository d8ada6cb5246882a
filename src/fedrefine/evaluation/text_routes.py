"""Routes whose models exchange text, not caches: a sender alone, and T2T (senders write hints, the receiver
reads them)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedrefine.evaluation.choices import Choices, extract_choices
from fedrefine.evaluation.config import answer_style
from fedrefine.evaluation.handler import RouteHandler
from fedrefine.evaluation.metrics import RouteResult
from fedrefine.evaluation.question_batch import QuestionBatch
from fedrefine.participants.generation import Reply
from fedrefine.tasks.routes import Route
from fedrefine.tasks.scoring import NORMALIZATIONS, score_alone
from fedrefine.tasks.t2t import T2TConfig, t2t_predict
from fedrefine.timing import stopwatch
from fedrefine.wire import SenderUnavailable


class SenderAlone(RouteHandler):
    """``sender:<name>``: one sender answers alone, from its own model and its own prompt."""

    def answer(self, batch: QuestionBatch, route: Route, result: RouteResult) -> Choices:
        name = route.senders[0]
        if name in self.model.remotes:
            raise ValueError(f"Route 'sender:{name}' scores options with the sender's own model, which is served "
                             f"elsewhere ({self.model.remotes[name].endpoint}); evaluate it where it runs.")
        with stopwatch(batch.labels.device) as elapsed:
            chosen = self._answer(batch, name)
        result.stages["sender"] = elapsed.seconds
        return chosen

    @torch.no_grad()
    def _answer(self, batch: QuestionBatch, name: str) -> Choices:
        sender, alone, answering = self.model.senders[name], batch.alone[name], self.answering
        if answering.mode != "generate":
            scores = score_alone(sender, alone.input_ids, alone.attention_mask, alone.options, answer_style(answering.mode))
            return Choices.of(scores.cpu(), answering.normalization)
        output = sender.model.generate(
            input_ids=alone.input_ids,
            attention_mask=alone.attention_mask,
            max_new_tokens=answering.max_new_tokens,
            do_sample=False,
            pad_token_id=sender.tokenizer.pad_token_id,
            eos_token_id=sender.end_of_turn_token_id,
        )
        texts = sender.tokenizer.batch_decode(output[:, alone.input_ids.shape[1] :], skip_special_tokens=True)
        return Choices(extract_choices(texts, batch))


class TextRoute(RouteHandler):
    """``t2t[:A+B]``: the senders write hints (remote ones over their transport); the receiver answers with them
    in its prompt."""

    def answer(self, batch: QuestionBatch, route: Route, result: RouteResult) -> Choices:
        model, config = self.model, self.answering.t2t or T2TConfig()
        plans = batch.plans[(route.query_mode, self.planner.route_options(route))]
        senders = [model.senders[n] for n in route.senders]
        writers = {model.senders[n].name: self._remote_writer(n, result) for n in route.senders if n in model.remotes}
        answers = t2t_predict(
            model.receiver,
            senders,
            [p.receiver_item for p in plans],
            config,
            sender_questions={model.senders[n].name: [p.sender_texts[n] for p in plans] for n in route.senders},
            style=plans[0].style if plans else "letter",
            normalization=self.answering.normalization,
            writers=writers,
        )
        for answer in answers:
            for stage, seconds in answer.seconds.items():
                key = "sender" if stage.startswith("sender:") else stage
                result.stages[key] = result.stages.get(key, 0.0) + seconds
            result.bytes_sent += answer.id_bytes
        result.sender_bytes_per_token = {name: float(config.bytes_per_id) for name in route.senders}  # each hint token's id
        result.bytes_per_token = float(config.bytes_per_id) * len(senders)
        cloze = {}
        if self.answering.mode == "cloze":
            cloze = {n: torch.tensor([a.cloze_predictions[n] for a in answers]) for n in NORMALIZATIONS}
        scored_as = self.answering.normalization if self.answering.mode == "cloze" else "logits"
        return Choices(torch.tensor([a.prediction for a in answers]), cloze, [{scored_as: a.option_scores} for a in answers])

    def _remote_writer(self, name: str, result: RouteResult):
        """Hints from a remote sender; one that fails writes empty hints (left out of the prompt), recorded."""
        remote = self.model.remotes[name]

        def write(prompts: Sequence[str], budget: int, batch_size: int) -> list[Reply]:
            try:
                delivery = remote.hints(prompts, budget, batch_size)
            except SenderUnavailable as err:
                result.dropped[name] = err.why
                return [Reply("", (), 0.0) for _ in prompts]
            result.contributed = (*result.contributed, name)
            result.transport_bytes += delivery.transport_bytes
            result.stages["transfer"] = result.stages.get("transfer", 0.0) + delivery.transfer_seconds
            return delivery.replies

        return write
