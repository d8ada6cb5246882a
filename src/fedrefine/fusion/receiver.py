"""A frozen receiver fused with any subset of its senders' KV caches: C2C's forward, prompt reads and generation.

    send:        each selected sender prefills its own rendering of the prompt   -> messages (KVMessage)
    fuse:        the gate weighs them; the strategy (residual or concat, chosen once)
                 puts them into the receiver's cache                            -> Fused (context, gate weights)
    forward / read_prompt / generate:
                 the receiver runs the rest of its prompt (+ response / continuations / generation) over it

Messages are sent once and passed in: every call after :meth:`FusedReceiver.send` takes them as an
argument, and so does the link they travel over. Senders that are not selected never run; a sender
whose fuser has every gate closed sends nothing. Senders are consulted only at prefill.

A sender may live in another process (a :class:`~fedrefine.wire.RemoteSender`): the receiver then
sends its requests to every remote sender at once and prefills its own prompt meanwhile; a remote
sender that does not deliver in time (or delivers an invalid message) is left out of that batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from fedrefine.fuser import Fuser
from fedrefine.fusion.batch import FusionBatch
from fedrefine.fusion.concat import ConcatFusion
from fedrefine.fusion.encoding import PromptEncoder
from fedrefine.fusion.gating import SourceGate
from fedrefine.fusion.residual import Combine, ResidualFusion
from fedrefine.fusion.sender_gate import SenderStateGate
from fedrefine.fusion.sender_kv import SenderKV
from fedrefine.fusion.sending import Sending, SendOutcome
from fedrefine.fusion.strategy import FusionInput, FusionStrategy, ReceiverContext, prefill_all_but_last
from fedrefine.kv.cache import returned_cache, with_cache
from fedrefine.kv.prompt import PromptState, read_prompt, run_over
from fedrefine.participants import Participant
from fedrefine.participants.generation import trim_at_eos
from fedrefine.wire import LinkConfig, RemoteSender
from fedrefine.wire.message import KVMessage


def choose_strategy(fusers: Sequence[Fuser], combine: Combine = "parallel") -> FusionStrategy:
    """The one fusion strategy of a receiver's fusers: they must agree on mode and fused positions."""
    if combine not in ("parallel", "sequential"):
        raise ValueError(f"Unknown combine {combine!r}; choose 'parallel' or 'sequential'.")
    modes = {f.mode for f in fusers}
    if len(modes) > 1:
        raise ValueError(f"All fusers of a receiver must share one fusion mode, got {sorted(modes)}.")
    fuse_at = {f.config.fuse_at for f in fusers}
    if len(fuse_at) > 1:
        raise ValueError(f"All fusers of a receiver must fuse the same positions (fuse_at), got {sorted(fuse_at)}.")
    if modes == {"concat"}:
        return ConcatFusion()
    return ResidualFusion(fuse_at.pop() if fuse_at else "prompt", combine)


def check_pairs(receiver: Participant, senders: Sequence[Participant], fusers: Sequence[Fuser]) -> None:
    """Every fuser must be the one trained for exactly its (sender -> receiver) pair."""
    if len(senders) != len(fusers):
        raise ValueError(f"Got {len(senders)} senders but {len(fusers)} fusers; give one fuser per sender.")
    for sender, fuser in zip(senders, fusers):
        if (fuser.sender, fuser.receiver) != (sender.identity, receiver.identity):
            raise ValueError(
                f"Fuser is for {fuser.sender.key} -> {fuser.receiver.key}, participants are "
                f"{sender.identity.key} -> {receiver.identity.key}."
            )


@dataclass(frozen=True)
class Fused:
    """The receiver's context fused with the senders' messages, and what the gating network gave each sender:
    ``gate_weights`` sender -> (B, L_t) share per sample and receiver layer (empty without a gate or senders)."""

    context: ReceiverContext
    gate_weights: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class ReceiverOutput:
    """Receiver logits for the last prompt token and every response token, (B, 1 + R, V), and the gate weights
    of the fusion they were computed over (see :class:`Fused`)."""

    logits: Tensor
    gate_weights: dict[str, Tensor] = field(default_factory=dict)


class FusedReceiver(nn.Module):
    """A frozen receiver, frozen senders, and one trainable fuser per sender (all of one fusion mode).

    Args:
        receiver: the participant that answers.
        senders: participants that may share their caches.
        fusers: one fuser per sender, same order, each for exactly (sender -> receiver).
        combine: residual mode with several senders: ``parallel`` (deltas summed, as the C2C
            reference) or ``sequential`` (each fuser reads the cache fused by the previous ones).
        source_gate: optional gating network weighing each sender's contribution: from the receiver's prompt
            (:class:`SourceGate`, against the receiver's own cache) or from what each sender sent
            (:class:`SenderStateGate`).
        sender_names: names for the senders (default: their identity names), used to select them.
        remotes: sender name -> its client, for senders served in other processes; their participants
            here are local views (tokenizer, chat template, rotary embedding) to encode for and read them.
        concurrent_senders: prefill local senders in threads beside the receiver's own prefill (remote
            senders always run beside it); see :mod:`~fedrefine.fusion.sending`.
    """

    def __init__(
        self,
        receiver: Participant,
        senders: Sequence[Participant],
        fusers: Sequence[Fuser],
        combine: Combine = "parallel",
        source_gate: SourceGate | SenderStateGate | None = None,
        sender_names: Sequence[str] | None = None,
        remotes: Mapping[str, RemoteSender] | None = None,
        concurrent_senders: bool = False,
    ) -> None:
        super().__init__()
        check_pairs(receiver, senders, fusers)
        self.sender_names = list(sender_names) if sender_names is not None else [s.name for s in senders]
        if len(set(self.sender_names)) != len(self.sender_names):
            raise ValueError(f"Sender names must be unique, got {self.sender_names}.")
        self.strategy = choose_strategy(fusers, combine)
        self.receiver = receiver
        self.senders = dict(zip(self.sender_names, senders))
        alignments = {name: fuser.config.token_alignment for name, fuser in zip(self.sender_names, fusers)}
        self.encoder = PromptEncoder(receiver, self.senders, self.strategy.aligns, self.strategy.aligned_messages, alignments)
        self.receiver_model = receiver.model
        self.sender_models = nn.ModuleList(s.model for s in senders)
        self.fusers = nn.ModuleList(fusers)
        self.source_gate = source_gate
        self.sending = Sending(self.senders, dict(zip(self.sender_names, fusers)), self.strategy, remotes, concurrent_senders)

    @property
    def mode(self) -> str:
        """The fusers' mode: ``residual`` or ``concat``."""
        return self.strategy.mode

    @property
    def remotes(self) -> dict[str, RemoteSender]:
        """Sender name -> client, for the senders served elsewhere."""
        return self.sending.remotes

    def fuser_for(self, name: str) -> Fuser:
        return self.fusers[self._index(name)]

    def _index(self, name: str) -> int:
        if name not in self.senders:
            raise KeyError(f"Unknown sender {name!r}; this receiver has {self.sender_names}.")
        return self.sender_names.index(name)

    # --- send once -----------------------------------------------------------------------------
    def send(
        self, batch: FusionBatch, senders: Sequence[str] | None = None, link: LinkConfig | None = None,
        prefill_meanwhile: bool = True,
    ) -> SendOutcome:
        """Every selected sender's message (default: every sender the batch was encoded for) over ``link`` (None:
        in-process tensors); remote senders that fail are dropped and named in the outcome.

        Residual fusion starts from the receiver's own prefill; when senders run elsewhere or in threads, it runs
        meanwhile (``prefill_meanwhile``) and comes back as ``outcome.own`` for :meth:`fuse` to start from."""
        selected = list(batch.senders) if senders is None else list(senders)
        overlaps = self.sending.concurrent or any(n in self.remotes for n in selected)
        meanwhile = None
        if prefill_meanwhile and selected and self.strategy.aligns and overlaps:
            meanwhile = partial(prefill_all_but_last, self.receiver, batch.receiver_input_ids, batch.receiver_attention_mask)
        outcome, own = self.sending.send_all(batch, selected, link, meanwhile)
        outcome.own = own
        return outcome

    # --- fuse ----------------------------------------------------------------------------------
    def fuse(
        self, batch: FusionBatch, messages: Mapping[str, KVMessage] | None = None, own: ReceiverContext | None = None,
        gated: bool = True, whole_prompt: bool = False,
    ) -> Fused:
        """The receiver's context for the batch's prompts fused with ``messages`` (none: its own prefill).

        ``own``: the receiver's prefill when it already ran (:meth:`send`); ``gated=False`` fuses every message at
        full weight, as if there were no gating network (e.g. what each sender alone does, the target a gate
        learns); ``whole_prompt``: the caller reads the whole prompt next (see :meth:`read_prompt`)."""
        ids, mask = batch.receiver_input_ids, batch.receiver_attention_mask
        if not messages:
            return Fused(own or prefill_all_but_last(self.receiver, ids, mask))
        inputs = self.fusion_inputs(batch, messages, gated)
        weights = {name: item.weight for name, item in zip(messages, inputs) if item.weight is not None}
        return Fused(self.strategy.prepare(self.receiver, ids, mask, inputs, own, whole_prompt), weights)

    def fusion_inputs(
        self, batch: FusionBatch, messages: Mapping[str, KVMessage], gated: bool = True
    ) -> list[FusionInput]:
        """Each message's part in the fusion, in message order: the sender's K/V, its fuser, where receiver tokens
        read it, and (``gated``, with a gating network) its weight per sample and receiver layer."""
        weights = self.gate_weights(batch, messages) if gated else {}
        return [
            FusionInput(SenderKV(self.senders[name], message), self.fuser_for(name), batch.senders[name].alignment,
                        weights.get(name))
            for name, message in messages.items()
        ]

    def gate_weights(self, batch: FusionBatch, messages: Mapping[str, KVMessage]) -> dict[str, Tensor]:
        """The gating network's weight of each sender that sent a message, sender -> (B, L_t); empty without one."""
        if self.source_gate is None or not messages:
            return {}
        names = list(messages)
        weights = self.source_gate.weigh(self.receiver_model, batch, messages, [self._index(n) for n in names])
        return {name: weights[:, :, slot] for slot, name in enumerate(names)}  # (B, L_t, S) -> per sender

    # --- run the receiver over the fused context ------------------------------------------------
    def forward(
        self, batch: FusionBatch, messages: Mapping[str, KVMessage] | None = None, own: ReceiverContext | None = None,
        gated: bool = True,
    ) -> ReceiverOutput:
        """Receiver logits for the last prompt token and every (teacher-forced) response token, (B, 1 + R, V),
        over the prompt fused with ``messages`` (see :meth:`fuse`)."""
        fused = self.fuse(batch, messages, own, gated)
        context = fused.context
        prompt_ids, prompt_mask = batch.receiver_input_ids, batch.receiver_attention_mask  # (B, N)
        full_ids, full_mask = prompt_ids, prompt_mask
        if batch.response_ids is not None:
            full_ids = torch.cat((prompt_ids, batch.response_ids), dim=1)  # (B, N + R)
            full_mask = torch.cat((full_mask, batch.response_mask), dim=1)
        keep = full_ids.shape[1] - (prompt_ids.shape[1] - 1)  # the last prompt token and every response token
        output, _ = run_over(
            self.receiver_model, context.cache, context.cached_mask(prompt_mask), full_ids[:, context.consumed :],
            full_mask[:, context.consumed :], use_cache=False, logits_to_keep=keep,
        )
        return ReceiverOutput(output.logits, fused.gate_weights)

    @torch.no_grad()
    def read_prompt(
        self, batch: FusionBatch, messages: Mapping[str, KVMessage] | None = None, own: ReceiverContext | None = None
    ) -> PromptState:
        """The receiver's state after its whole prompt, fused with ``messages``: read once, then continued in as
        many ways as needed (every option of a question, see :mod:`fedrefine.tasks.scoring`). Without messages
        (or prefill made meanwhile) the receiver reads its prompt in one forward."""
        ids, mask = batch.receiver_input_ids, batch.receiver_attention_mask
        if not messages and own is None:
            return read_prompt(self.receiver_model, ids, mask)
        context = self.fuse(batch, messages, own, whole_prompt=True).context
        output, attention = run_over(  # attention: (B, P + N), the entries ahead of the prompt and the prompt
            self.receiver_model, context.cache, context.cached_mask(mask), ids[:, context.consumed :],
            mask[:, context.consumed :], use_cache=True, logits_to_keep=1,
        )
        return PromptState(returned_cache(output), attention, output.logits[:, -1])

    @torch.no_grad()
    def generate(
        self, batch: FusionBatch, messages: Mapping[str, KVMessage] | None = None, max_new_tokens: int = 64
    ) -> list[list[int]]:
        """Greedy continuation of each prompt over the context fused with ``messages``; new token ids per sample
        (up to eos)."""
        context = self.fuse(batch, messages).context
        ids, mask = batch.receiver_input_ids, batch.receiver_attention_mask
        pad = self.receiver.tokenizer.pad_token_id
        if context.prefix_mask is not None:
            # generate() skips the tokens its cache already holds: stand-ins for the prefix entries.
            ids = torch.cat((torch.full_like(context.prefix_mask, pad), ids), dim=1)  # (B, P + N)
            mask = torch.cat((context.prefix_mask, mask), dim=1)
        eos = self.receiver.end_of_turn_token_id
        output = self.receiver_model.generate(
            input_ids=ids,
            attention_mask=mask,
            **with_cache(self.receiver_model, context.cache),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        return [trim_at_eos(row[ids.shape[1] :].tolist(), eos) for row in output]
