"""FedRefine's routes answering lm-eval requests: the contexts of a batch are read once (prefilled, sent and fused
once), and every continuation is scored, or an answer generated, from that read.

    receiver / sender:<name>   the model alone reads each context (plain text as lm-eval's ``hf`` model tokenizes
                               it, or the conversation in its own chat template)
    c2c[:A+B][_random_kv]      each sender renders the conversation in its own template and sends once; the
                               receiver reads its prompt fused with the messages (gated when the federation is)
    t2t[:A+B]                  each sender writes a hint about the last user message; the receiver reads the
                               conversation with the hints placed as ``evaluation.t2t`` says
    adaptive[:A+B]             the route the adaptive profile picks for the configured link and budget

``@private`` (c2c, t2t): the receiver keeps the user's text; each sender reads the receiver's rephrasing of the last
user message (``evaluation.rephrase``) and, for C2C, the answer prefix.

Refused, each with one line naming the setting: fused and hinted routes on plain-text contexts (fusers are trained
on chat prompts: ``--apply_chat_template``), ``@shared`` and the controls that need a question's options (lm-eval
requests carry text only), ``c2c:auto`` (needs a question's category), senders served elsewhere alone.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedrefine.evaluation.adaptive_choice import AdaptiveChoice
from fedrefine.evaluation.config import EvaluationConfig
from fedrefine.fusion import FusedReceiver, FusionBatch
from fedrefine.harness.contexts import Context, FormatError, adds_special_tokens, encode_context
from fedrefine.kv.prompt import PromptState, read_prompt
from fedrefine.participants import Participant
from fedrefine.participants.chat import EncodedChat, Message, encode_chat
from fedrefine.participants.generation import generate_replies, trim_at_eos
from fedrefine.participants.padding import left_pad
from fedrefine.privacy.rephrase import Rephraser
from fedrefine.tasks.routes import Route, RouteError, parse_routes
from fedrefine.tasks.t2t import T2TConfig
from fedrefine.wire import LinkConfig
from fedrefine.wire.message import KVMessage, random_message_like


def refuse_plain(route: Route, context: Context) -> None:
    if not context.chat:
        raise FormatError(
            f"Route {route.label!r} fuses or hints a chat prompt (its fusers were trained on chat prompts), but this "
            f"request's context is plain text: pass --apply_chat_template (or route=receiver / route=sender:<name>)."
        )


class SenderQueries:
    """What each sender reads of a context's last user message: the message itself (``@original``), or its own
    rephrasing by the receiver (``@private``: the receiver keeps the user's text; the rephrasing of the whole
    message, few-shot examples and options included, since lm-eval requests do not say which part is the stem).

    Args:
        route: the route (its query mode and senders).
        rephraser: writes the rephrasings (``@private``).
    """

    def __init__(self, route: Route, rephraser: Rephraser | None = None) -> None:
        self.route, self.rephraser = route, rephraser

    def texts(self, contexts: Sequence[Context]) -> dict[str, list[str]]:
        """Sender name -> the text it reads in place of each context's last user message."""
        for context in contexts:
            refuse_plain(self.route, context)
            if self.route.query_mode == "private" and sum(m["role"] == "user" for m in context.messages) != 1:
                raise FormatError(
                    f"Route {self.route.label!r} keeps the user's text from the senders, but this conversation has several "
                    f"user turns that would reach them verbatim: drop --fewshot_as_multiturn (few-shot examples then sit "
                    f"in the one user message that is rephrased)."
                )
        originals = [c.last_user_content() for c in contexts]
        if self.route.query_mode != "private":
            return {name: originals for name in self.route.senders}
        return {name: [r.text for r in self.rephraser.rephrase(originals, variant=name)] for name in self.route.senders}


def with_last_user_message(messages: Sequence[Message], text: str, private: bool) -> tuple[Message, ...]:
    """The conversation with its last user message's content replaced by ``text``; ``private``: only that message
    and what follows it (the answer prefix), so that nothing else the user wrote reaches a sender."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    replaced = (*messages[:last], {"role": "user", "content": text}, *messages[last + 1 :])
    return replaced[last:] if private else replaced


@dataclass
class Read:
    """Contexts as the answering model read them: each prompt that continuations extend, and the model's state after
    all of them (one row per context)."""

    prompts: list[EncodedChat]
    state: PromptState
    model: nn.Module


class HarnessRoute(ABC):
    """Reads a batch of contexts once, for scoring continuations or generating.

    Args:
        answering: the participant whose model continues the contexts (its tokenizer encodes continuations).
    """

    def __init__(self, answering: Participant) -> None:
        self.answering = answering

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end a generated answer: the end of the answering model's turn, and its EOS."""
        tokenizer = self.answering.tokenizer
        return sorted({self.answering.end_of_turn_token_id, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])})

    def trim(self, rows: Sequence[Sequence[int]]) -> list[list[int]]:
        """Generated ids up to the first stop token."""
        out = []
        for row in rows:
            row = list(row)
            for stop in self.stop_ids:
                row = trim_at_eos(row, stop)
            out.append(row)
        return out

    @abstractmethod
    def read(self, contexts: Sequence[Context]) -> Read:
        """Every context read once (one row each)."""

    @abstractmethod
    def generate(self, contexts: Sequence[Context], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation ids of every context, up to a stop token."""


class Alone(HarnessRoute):
    """``receiver`` / ``sender:<name>``: one participant reads each context alone."""

    def prompts(self, contexts: Sequence[Context]) -> list[EncodedChat]:
        """Each context as the participant reads it; an empty one is the token lm-eval conditions on (BOS, else EOS)."""
        p, tokenizer = self.answering, self.answering.tokenizer
        prompts = [encode_context(p, c, adds_special_tokens(p, c.text)) for c in contexts]
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [chat if chat.input_ids else dataclasses.replace(chat, input_ids=[prefix], offsets=[(0, 0)]) for chat in prompts]

    def _padded(self, prompts: Sequence[EncodedChat]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = left_pad([chat.input_ids for chat in prompts], self.answering.tokenizer.pad_token_id)  # (B, N)
        return ids.to(self.answering.device), mask.to(self.answering.device)

    @torch.no_grad()
    def read(self, contexts: Sequence[Context]) -> Read:
        prompts = self.prompts(contexts)
        return Read(prompts, read_prompt(self.answering.model, *self._padded(prompts)), self.answering.model)

    @torch.no_grad()
    def generate(self, contexts: Sequence[Context], max_new_tokens: int) -> list[list[int]]:
        ids, mask = self._padded(self.prompts(contexts))
        output = self.answering.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=self.answering.tokenizer.pad_token_id, eos_token_id=self.stop_ids,
        )
        return self.trim(output[:, ids.shape[1] :].tolist())


def hinted_messages(messages: Sequence[Message], hints: Sequence[str], config: T2TConfig) -> tuple[Message, ...]:
    """The conversation with the senders' hints placed per ``config`` (as :func:`fedrefine.tasks.t2t.hint_messages`
    places them in a multiple-choice question): in the last user message, or as a dialogue turn before it."""
    hints = [h.strip() for h in hints if h.strip()]
    if not hints:
        return tuple(messages)
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    question = messages[last]["content"]
    if config.placement == "dialogue":
        turn = ({"role": "user", "content": config.prompt_template.format(question=question)},
                {"role": "assistant", "content": "\n\n".join(hints)})
        return (*messages[:last], *turn, *messages[last:])
    block = "".join(f"{hint}\n\n" for hint in hints)
    return (*messages[:last], {"role": "user", "content": f"{config.hint_header}{block}{question}"}, *messages[last + 1 :])


class Hinted(Alone):
    """``t2t[:A+B]``: every sender writes a hint about each context's last user message (the communication prompt of
    ``evaluation.t2t``); the receiver reads the conversation with the hints in it."""

    def __init__(self, model: FusedReceiver, route: Route, config: T2TConfig, queries: SenderQueries) -> None:
        super().__init__(model.receiver)
        self.model, self.route, self.config, self.queries = model, route, config, queries

    def hinted(self, contexts: Sequence[Context]) -> list[Context]:
        texts = self.queries.texts(contexts)
        hints = []
        for name in self.route.senders:
            prompts = [self.config.prompt_template.format(question=text) for text in texts[name]]
            if name in self.model.remotes:
                replies = self.model.remotes[name].hints(prompts, self.config.budget, self.config.batch_size).replies
            else:
                replies = generate_replies(self.model.senders[name], prompts, self.config.budget, self.config.batch_size)
            hints.append([r.text for r in replies])
        return [
            Context(c.text, hinted_messages(c.messages, [h[i] for h in hints], self.config), c.add_generation_prompt)
            for i, c in enumerate(contexts)
        ]

    def read(self, contexts: Sequence[Context]) -> Read:
        return super().read(self.hinted(contexts))

    def generate(self, contexts: Sequence[Context], max_new_tokens: int) -> list[list[int]]:
        return super().generate(self.hinted(contexts), max_new_tokens)


class Fused(HarnessRoute):
    """``c2c[:A+B][_random_kv]``: each sender renders the conversation in its own template (with the answer prefix
    when the fusers were trained reading it, ``evaluation.prefill_answer``) and sends once; the receiver reads its
    prompt fused with every message once.

    Args:
        model: the receiver, its senders, fusers and gate.
        route: which senders (and the ``_random_kv`` control).
        link: what the messages travel over (None: in-process tensors).
        prefill_answer: senders read the assistant prefix (lm-eval's ``gen_prefix``) too.
    """

    def __init__(
        self, model: FusedReceiver, route: Route, link: LinkConfig | None, prefill_answer: bool, queries: SenderQueries
    ) -> None:
        super().__init__(model.receiver)
        self.model, self.route, self.link, self.prefill_answer, self.queries = model, route, link, prefill_answer, queries

    def sender_messages(self, context: Context) -> tuple[Message, ...]:
        """The conversation the senders read (their last user message as :class:`SenderQueries` says)."""
        if not self.prefill_answer:
            return context.messages[:-1] if context.prefilled else context.messages
        if not context.prefilled:
            raise FormatError(
                f"Route {self.route.label!r}: the senders' fusers were trained reading the answer prefix as an assistant "
                f"prefill (evaluation.prefill_answer), but this task has none: set the task's gen_prefix (e.g. "
                f"'The correct answer is'), or pass prefill_answer=false in --model_args."
            )
        return context.messages

    def batch(self, contexts: Sequence[Context]) -> tuple[list[EncodedChat], FusionBatch]:
        model, prompts, examples = self.model, [], []
        texts, private = self.queries.texts(contexts), self.route.query_mode == "private"
        for row, context in enumerate(contexts):
            for_senders = self.sender_messages(context)
            prompt = encode_context(model.receiver, context, False)
            chats = {n: encode_chat(model.senders[n], with_last_user_message(for_senders, texts[n][row], private))
                     for n in self.route.senders}
            prompts.append(prompt)
            examples.append(model.encoder.encode_chats(prompt, chats, strict=True))
        return prompts, model.encoder.collate(examples).to(model.receiver.device)

    def messages(self, fusion: FusionBatch) -> Mapping[str, KVMessage]:
        """Every sender's message, sent once (remote senders that fail are left out, as in ``fedrefine test``)."""
        messages = self.model.send(fusion, list(self.route.senders), self.link, prefill_meanwhile=False).messages
        if self.route.control == "random_kv":
            messages = {n: random_message_like(m) for n, m in messages.items()}
        return messages

    @torch.no_grad()
    def read(self, contexts: Sequence[Context]) -> Read:
        prompts, fusion = self.batch(contexts)
        return Read(prompts, self.model.read_prompt(fusion, self.messages(fusion)), self.model.receiver_model)

    @torch.no_grad()
    def generate(self, contexts: Sequence[Context], max_new_tokens: int) -> list[list[int]]:
        _, fusion = self.batch(contexts)
        return self.trim(self.model.generate(fusion, self.messages(fusion), max_new_tokens))


def build_route(
    text: str, model: FusedReceiver, evaluation: EvaluationConfig, prefill_answer: bool | None = None
) -> tuple[Route, HarnessRoute]:
    """The route ``text`` (see :mod:`fedrefine.tasks.routes`) over ``model``, as it answers lm-eval requests;
    ``adaptive`` resolves to the route its profile picks. ``prefill_answer`` None: the evaluation's."""
    route = parse_routes([text], model.sender_names)[0]
    link = evaluation.link
    if route.kind == "adaptive":
        choice = AdaptiveChoice(evaluation.adaptive)
        route, link = choice.route_for(choice.option, route.senders), choice.link_for(choice.option, link) if choice.option.route == "c2c" else link
    if route.query_mode == "shared" or route.control in ("mismatched", "reordered") or route.auto:
        raise RouteError(
            f"Route {route.label!r} needs multiple-choice items (a shared rephrasing the receiver answers, mismatched or "
            f"reordered questions, a question's category), but lm-eval requests carry text only: use it with "
            f"`fedrefine test`, or drop the '@shared' / control / auto part here (@private runs)."
        )
    if route.kind == "receiver":
        return route, Alone(model.receiver)
    if route.kind == "sender":
        name = route.senders[0]
        if name in model.remotes:
            raise RouteError(f"Route {route.label!r} runs the sender's own model, which is served elsewhere: evaluate it where it runs.")
        return route, Alone(model.senders[name])
    rephraser = Rephraser(model.receiver, evaluation.rephrase, evaluation.rephrase_cache_dir)
    queries = SenderQueries(route, rephraser if route.query_mode == "private" else None)
    if route.kind == "t2t":
        return route, Hinted(model, route, evaluation.t2t, queries)
    route.check("rephrase" if route.query_mode == "private" else "verbatim", model.mode, model.strategy.aligned_messages)
    model.sending.check(link)
    prefill = evaluation.prefill_answer if prefill_answer is None else prefill_answer
    return route, Fused(model, route, link, prefill, queries)
