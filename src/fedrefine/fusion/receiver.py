"""A frozen receiver fused with any subset of its senders' KV caches: C2C's forward and generation.

    each selected sender prefills its own rendering of the prompt     -> KVMessage (sending)
    the fusion strategy (residual or concat, chosen once) prepares     -> ReceiverContext
    the receiver runs the rest of its prompt (+ response / generation) over that context

Senders that are not selected never run; a sender whose fuser has every gate closed sends
nothing. Senders are consulted only at prefill.

A sender may live in another process (a :class:`~fedrefine.wire.RemoteSender`): the receiver then
sends its requests to every remote sender at once and prefills its own prompt meanwhile; a remote
sender that does not deliver in time (or delivers an invalid message) is left out of that batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import Tensor, nn

from fedrefine.fuser import Fuser
from fedrefine.fusion.batch import FusionBatch, SenderBatch
from fedrefine.fusion.concat import ConcatFusion
from fedrefine.fusion.encoding import PromptEncoder
from fedrefine.fusion.gating import SourceGate
from fedrefine.fusion.residual import Combine, ResidualFusion
from fedrefine.fusion.sender_gate import SenderStateGate
from fedrefine.fusion.sender_kv import SenderKV
from fedrefine.fusion.sending import Sending, SendOutcome
from fedrefine.fusion.strategy import FusionInput, FusionStrategy, NoFusion, ReceiverContext, prefill_all_but_last
from fedrefine.kv.cache import positions_from_mask, with_cache
from fedrefine.participants import Participant
from fedrefine.participants.generation import trim_at_eos
from fedrefine.wire import Delivery, LinkConfig, RemoteSender
from fedrefine.wire.message import KVMessage

T = TypeVar("T")


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
        self.encoder = PromptEncoder(receiver, self.senders, self.strategy.aligns, self.strategy.aligned_messages)
        self.receiver_model = receiver.model
        self.sender_models = nn.ModuleList(s.model for s in senders)
        self.fusers = nn.ModuleList(fusers)
        self.source_gate = source_gate
        self.gate_weights: dict[str, float] = {}  # the last training fusion's mean weight per sender (with a gate)
        self.sending = Sending(self.senders, dict(zip(self.sender_names, fusers)), self.strategy, remotes, concurrent_senders)

    @property
    def mode(self) -> str:
        """The fusers' mode: ``residual`` or ``concat``."""
        return self.strategy.mode

    def fuser_for(self, name: str) -> Fuser:
        return self.fusers[self._index(name)]

    def _index(self, name: str) -> int:
        if name not in self.senders:
            raise KeyError(f"Unknown sender {name!r}; this receiver has {self.sender_names}.")
        return self.sender_names.index(name)

    # --- sending (see fedrefine.fusion.sending) ------------------------------------------------
    @property
    def link(self) -> LinkConfig | None:
        """How messages travel (set from the evaluation config)."""
        return self.sending.link

    @link.setter
    def link(self, link: LinkConfig | None) -> None:
        self.sending.link = link

    @property
    def remotes(self) -> dict[str, RemoteSender]:
        return self.sending.remotes

    def send(self, name: str, batch: SenderBatch) -> KVMessage | None:
        return self.sending.send(name, batch, self.training)

    def deliver(self, name: str, batch: SenderBatch) -> Delivery | None:
        return self.sending.deliver(name, batch, self.training)

    def send_all(
        self, batch: FusionBatch, senders: Sequence[str], meanwhile: Callable[[], T] | None = None
    ) -> tuple[SendOutcome, T | None]:
        return self.sending.send_all(batch, senders, self.training, meanwhile)

    def kv_messages(
        self, batch: FusionBatch, senders: Sequence[str], given: Mapping[str, KVMessage] | None = None
    ) -> dict[str, KVMessage]:
        """The selected senders' messages: ``given`` ones (controls, or timed elsewhere) or fresh prefills
        (remote senders that fail are left out)."""
        return self._messages(batch, senders, given)[0]

    def _messages(
        self,
        batch: FusionBatch,
        senders: Sequence[str],
        given: Mapping[str, KVMessage] | None,
        meanwhile: Callable[[], T] | None = None,
    ) -> tuple[dict[str, KVMessage], T | None]:
        """``given`` messages and fresh ones for the other senders, in selection order, and ``meanwhile``'s result."""
        given = given or {}
        outcome, done = self.send_all(batch, [n for n in senders if n not in given], meanwhile)
        found = {n: given.get(n) or outcome.messages[n] for n in senders if n in given or n in outcome.messages}
        return found, done

    @contextmanager
    def without_gate(self) -> Iterator[None]:
        """Fuse every selected sender at full weight, as if there were no gating network (e.g. to measure what
        each sender alone does, the target a gate learns)."""
        gate, self.source_gate = self.source_gate, None
        try:
            yield
        finally:
            self.source_gate = gate

    def fusion_inputs(self, batch: FusionBatch, kv_messages: Mapping[str, KVMessage]) -> list[FusionInput]:
        """Each sending sender's K/V, fuser, alignment and (with a gating network) weight per receiver layer."""
        names = list(kv_messages)
        weights = None  # (B, L_t, len(names))
        if self.source_gate is not None and names:
            available = [self._index(name) for name in names]
            weights = self.source_gate.weigh(self.receiver_model, batch, kv_messages, available)
            if self.training:  # logged by fit; a device sync inference need not pay
                self.gate_weights = dict(zip(names, weights.detach().mean(dim=(0, 1)).tolist()))
        return [
            FusionInput(
                SenderKV(self.senders[name], kv_messages[name]),
                self.fuser_for(name),
                batch.senders[name].alignment,
                None if weights is None else weights[:, :, slot],
            )
            for slot, name in enumerate(names)
        ]

    # --- prefill / forward / generate -----------------------------------------------------------
    def prepare(
        self,
        batch: FusionBatch,
        senders: Sequence[str] | None = None,
        fuse: bool = True,
        kv_messages: Mapping[str, KVMessage] | None = None,
    ) -> ReceiverContext:
        """The receiver's context for the batch's prompts, fused with ``senders`` (default: every sender in the
        batch); with none selected (or ``fuse=False``, or every gate closed) the receiver's own prefill."""
        selected = (list(batch.senders) if senders is None else list(senders)) if fuse else []
        fresh = [n for n in selected if n not in (kv_messages or {})]
        meanwhile = None
        if self.strategy.aligns and (self.sending.concurrent or any(n in self.remotes for n in fresh)):
            # residual fusion starts from the receiver's own prefill: run it while the senders work
            ids, mask = batch.receiver_input_ids, batch.receiver_attention_mask
            meanwhile = lambda: prefill_all_but_last(self.receiver, ids, mask)  # noqa: E731
        found, own = self._messages(batch, selected, kv_messages, meanwhile)
        strategy = self.strategy if found else NoFusion()
        inputs = self.fusion_inputs(batch, found)
        return strategy.prepare(self.receiver, batch.receiver_input_ids, batch.receiver_attention_mask, inputs, own)

    def forward(
        self,
        batch: FusionBatch,
        senders: Sequence[str] | None = None,
        fuse: bool = True,
        kv_messages: Mapping[str, KVMessage] | None = None,
    ) -> Tensor:
        """Receiver logits for the last prompt token and every response token, (B, 1 + R, V).

        ``senders``/``fuse`` select the senders (see :meth:`prepare`); ``kv_messages`` replace
        senders' own prefills (controls).
        """
        prompt_ids = batch.receiver_input_ids  # (B, N)
        full_ids, full_mask = prompt_ids, batch.receiver_attention_mask
        if batch.response_ids is not None:
            full_ids = torch.cat((prompt_ids, batch.response_ids), dim=1)  # (B, N + R)
            full_mask = torch.cat((full_mask, batch.response_mask), dim=1)
        context = self.prepare(batch, senders, fuse, kv_messages)
        attention = full_mask if context.prefix_mask is None else torch.cat((context.prefix_mask, full_mask), dim=1)
        positions = positions_from_mask(attention)[:, context.prefix_length + context.consumed :]
        output = self.receiver_model(
            input_ids=full_ids[:, context.consumed :],
            attention_mask=attention,  # (B, P + N + R): cached entries and the tokens run now
            position_ids=positions,
            **with_cache(self.receiver_model, context.cache),
            use_cache=False,
            logits_to_keep=full_ids.shape[1] - (prompt_ids.shape[1] - 1),
        )
        return output.logits

    @torch.no_grad()
    def generate(
        self,
        batch: FusionBatch,
        max_new_tokens: int = 64,
        senders: Sequence[str] | None = None,
        fuse: bool = True,
        kv_messages: Mapping[str, KVMessage] | None = None,
    ) -> list[list[int]]:
        """Greedy continuation of each prompt over the fused context; new token ids per sample (up to eos)."""
        context = self.prepare(batch, senders, fuse, kv_messages)
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
