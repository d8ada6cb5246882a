"""A receiver fused with any subset of senders' KV caches: the forward and generation of C2C.

Residual mode (C2C)::

    each selected sender prefills its own rendering of the prompt   -> KVMessage
    the receiver prefills its prompt except the last token           -> receiver cache
    each fuser adds g*w*p at the aligned positions (pre-RoPE); senders combine in parallel
    (sum of deltas) or in sequence (each fuser reads the cache already fused)
    the receiver runs the last prompt token (+ response / generation) over the fused cache

Concat mode (FedRefine eq. 1 and 4)::

    each selected sender's cache is projected into receiver cache entries, stacked sender by
    sender ahead of the receiver's own positions (RoPE applied at those positions), and the
    receiver runs its whole prompt over that prefix; texts need not be aligned

Senders that are not selected never run. Senders are consulted only at prefill.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from fedrefine.align import align_tokens
from fedrefine.batching import (
    FusionBatch,
    FusionExample,
    SenderBatch,
    SenderExample,
    collate_examples,
)
from fedrefine.cache import (
    LayerKV,
    WriteHookCache,
    apply_rotary,
    cache_to_layers,
    layers_to_cache,
    positions_from_mask,
    remove_rotary,
    returned_cache,
    rotary_cos_sin,
    with_cache,
)
from fedrefine.chat import EncodedChat, Message, encode_chat
from fedrefine.fuser import Fuser
from fedrefine.gating import SourceGate
from fedrefine.message import KVMessage, prefill_message
from fedrefine.participants import Participant

Combine = Literal["parallel", "sequential"]


def encode_response(participant: Participant, response: str) -> list[int]:
    """Token ids of an assistant response, closed by the participant's end-of-turn token."""
    ids = participant.tokenizer(response, add_special_tokens=False)["input_ids"]
    return [*ids, participant.end_of_turn_token_id]


def trim_at_eos(token_ids: list[int], eos_token_id: int) -> list[int]:
    """Generated ids up to (not including) the first end-of-turn token."""
    return token_ids[: token_ids.index(eos_token_id)] if eos_token_id in token_ids else token_ids


class FusedReceiver(nn.Module):
    """A frozen receiver, frozen senders, and one trainable fuser per sender (all of one fusion mode).

    Args:
        receiver: the participant that answers.
        senders: participants that may share their caches; named by their identity name.
        fusers: one fuser per sender, same order, each for exactly (sender -> receiver).
        combine: residual mode with several senders: ``parallel`` (deltas summed, as the C2C
            reference) or ``sequential`` (each fuser reads the cache fused by the previous ones).
        source_gate: optional gating network weighing the receiver's own cache against each sender.
        sender_names: names for the senders (default: their identity names), used to select them.
    """

    def __init__(
        self,
        receiver: Participant,
        senders: Sequence[Participant],
        fusers: Sequence[Fuser],
        combine: Combine = "parallel",
        source_gate: SourceGate | None = None,
        sender_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if len(senders) != len(fusers):
            raise ValueError(f"Got {len(senders)} senders but {len(fusers)} fusers; give one fuser per sender.")
        self.sender_names = list(sender_names) if sender_names is not None else [s.name for s in senders]
        if len(set(self.sender_names)) != len(self.sender_names):
            raise ValueError(f"Sender names must be unique, got {self.sender_names}.")
        for sender, fuser in zip(senders, fusers):
            if (fuser.sender, fuser.receiver) != (sender.identity, receiver.identity):
                raise ValueError(
                    f"Fuser is for {fuser.sender.key} -> {fuser.receiver.key}, participants are "
                    f"{sender.identity.key} -> {receiver.identity.key}."
                )
        modes = {f.mode for f in fusers}
        if len(modes) > 1:
            raise ValueError(f"All fusers of a receiver must share one fusion mode, got {sorted(modes)}.")
        if combine not in ("parallel", "sequential"):
            raise ValueError(f"Unknown combine {combine!r}; choose 'parallel' or 'sequential'.")
        self.mode = modes.pop() if modes else "residual"
        positions = {f.config.positions for f in fusers}
        if len(positions) > 1:
            raise ValueError(f"All fusers of a receiver must fuse the same positions, got {sorted(positions)}.")
        self.positions = positions.pop() if positions else "prompt"
        self.combine = combine
        self.receiver = receiver
        self.senders = dict(zip(self.sender_names, senders))
        self.receiver_model = receiver.model
        self.sender_models = nn.ModuleList(s.model for s in senders)
        self.fusers = nn.ModuleList(fusers)
        self.source_gate = source_gate

    def fuser_for(self, name: str) -> Fuser:
        return self.fusers[self._index(name)]

    def _index(self, name: str) -> int:
        if name not in self.senders:
            raise KeyError(f"Unknown sender {name!r}; this receiver has {self.sender_names}.")
        return self.sender_names.index(name)

    # --- data -------------------------------------------------------------------------------
    def encode(
        self,
        messages: Sequence[Message],
        response: str | None = None,
        senders: Sequence[str] | None = None,
        sender_messages: Mapping[str, Sequence[Message]] | None = None,
        strict: bool = True,
    ) -> FusionExample:
        """Encode a prompt for the receiver and each sender (residual mode: aligned to the receiver).

        ``sender_messages`` gives a sender another text than the receiver's (concat mode, or
        controls with ``strict=False``).
        """
        names = self.sender_names if senders is None else list(senders)
        sender_chats = {n: encode_chat(self.senders[n], (sender_messages or {}).get(n, messages)) for n in names}
        response_ids = None if response is None else encode_response(self.receiver, response)
        return self.encode_chats(encode_chat(self.receiver, messages), sender_chats, response_ids, strict)

    def encode_chats(
        self,
        receiver_chat: EncodedChat,
        sender_chats: Mapping[str, EncodedChat],
        response_ids: list[int] | None = None,
        strict: bool = True,
    ) -> FusionExample:
        """A :class:`FusionExample` from encodings made elsewhere (e.g. multiple-choice prompts)."""
        senders = {}
        for name, chat in sender_chats.items():
            alignment = align_tokens(receiver_chat, chat, strict=strict) if self.mode == "residual" else None
            senders[name] = SenderExample(chat.input_ids, alignment)
        return FusionExample(receiver_chat.input_ids, senders, response_ids)

    def collate(self, examples: Sequence[FusionExample]) -> FusionBatch:
        pads = {name: s.tokenizer.pad_token_id for name, s in self.senders.items()}
        return collate_examples(examples, self.receiver.tokenizer.pad_token_id, pads)

    # --- senders ----------------------------------------------------------------------------
    def send(self, name: str, batch: SenderBatch) -> KVMessage | None:
        """One sender's prefill, carrying only the layers its fuser reads; None if every gate is closed.

        With ``positions: last`` only the sender position aligned to the last prompt token is sent.
        """
        needed = self.fuser_for(name).sender_layers_needed()
        if not needed:
            return None
        message = prefill_message(self.senders[name], batch.input_ids, batch.attention_mask, needed)
        if self.positions == "last" and batch.alignment is not None:
            read = batch.alignment[:, -1:]  # the sender position each sample's last prompt token reads
            sent = (read >= 0).to(message.attention_mask.dtype)
            message.sent = torch.zeros_like(message.attention_mask).scatter(1, read.clamp(min=0), sent)
        return message

    def _messages(
        self, batch: FusionBatch, senders: Sequence[str], given: Mapping[str, KVMessage] | None
    ) -> dict[str, KVMessage]:
        messages = {}
        for name in senders:
            if name not in batch.senders:
                raise KeyError(f"Sender {name!r} was selected but the batch was not encoded for it.")
            message = (given or {}).get(name) or self.send(name, batch.senders[name])
            if message is not None:
                messages[name] = message
        return messages

    def _unrotated_sender_layers(
        self, name: str, message: KVMessage, dtype: torch.dtype, index: Tensor | None = None
    ) -> list[LayerKV | None]:
        """The carried sender layers with rotary removed; with ``index`` (B, N), only those sender positions."""
        positions = message.positions if index is None else message.positions.gather(1, index)
        cos, sin = rotary_cos_sin(self.senders[name].rotary_embedding, positions, torch.float32)
        layers: list[LayerKV | None] = [None] * self.senders[name].identity.num_layers
        for j, kv in message.layers.items():
            if index is not None:
                kv = [t.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])) for t in kv]
            layers[j] = (remove_rotary(kv[0].float(), cos, sin).to(dtype), kv[1].to(dtype))
        return layers

    def _source_weights(self, batch: FusionBatch, senders: Sequence[str]) -> Tensor | None:
        """(B, layers, len(senders)) weights of each sender's contribution, or None without a gating network."""
        if self.source_gate is None:
            return None
        available = [self._index(name) for name in senders]
        return self.source_gate(self.receiver_model, batch.receiver_input_ids, batch.receiver_attention_mask, available)

    # --- residual fusion ------------------------------------------------------------------------
    def _residual_fuse(
        self,
        receiver_layers: Mapping[int, LayerKV],
        positions: Tensor,
        batch: FusionBatch,
        messages: Mapping[str, KVMessage],
        weights: Tensor | None,
        start: int = 0,
    ) -> dict[int, LayerKV]:
        """Fused K/V of the given receiver layers (index -> rotated K, V) over prompt columns ``start ...``."""
        length = next(iter(receiver_layers.values()))[0].shape[2]
        columns = slice(start, start + length)
        dtype = next(self.fusers.parameters()).dtype
        cos, sin = rotary_cos_sin(self.receiver.rotary_embedding, positions, torch.float32)
        base: list[LayerKV | None] = [None] * self.receiver.identity.num_layers
        for layer, (keys, values) in receiver_layers.items():
            base[layer] = (remove_rotary(keys.float(), cos, sin).to(dtype), values.to(dtype))
        totals: list[list[Tensor] | None] = [None] * len(base)
        for slot, (name, message) in enumerate(messages.items()):
            alignment = batch.senders[name].alignment
            if alignment is None:
                raise ValueError(f"Residual fusion needs an alignment for sender {name}; encode in residual mode.")
            alignment = alignment[:, columns]
            where = ((alignment >= 0) & batch.receiver_attention_mask[:, columns].bool())[:, None, :, None]
            gathered = self._unrotated_sender_layers(name, message, dtype, index=alignment.clamp(min=0))
            reads = self._current(base, totals) if self.combine == "sequential" else base
            deltas = self.fuser_for(name)(gathered, reads)
            for layer, delta in enumerate(deltas):
                if delta is None:
                    continue
                scale = 1.0 if weights is None else weights[:, layer, slot].view(-1, 1, 1, 1)
                masked = [torch.where(where, d * scale, 0.0) for d in delta]
                totals[layer] = masked if totals[layer] is None else [a + b for a, b in zip(totals[layer], masked)]
        fused = {}
        for layer, (keys, values) in receiver_layers.items():
            total = totals[layer]
            if total is None:
                fused[layer] = (keys, values)
                continue
            delta_keys = apply_rotary(total[0].float(), cos, sin)
            fused[layer] = (keys + delta_keys.to(keys.dtype), values + total[1].to(values.dtype))
        return fused

    @staticmethod
    def _current(base: list[LayerKV | None], totals: list[list[Tensor] | None]) -> list[LayerKV | None]:
        return [kv if t is None or kv is None else (kv[0] + t[0], kv[1] + t[1]) for kv, t in zip(base, totals)]

    # --- concat fusion --------------------------------------------------------------------------
    def _concat_prefix(
        self, batch: FusionBatch, messages: Mapping[str, KVMessage], weights: Tensor | None
    ) -> tuple[DynamicCache, Tensor]:
        """Projected sender entries stacked ahead of the receiver: the cache and its attention mask."""
        dtype = next(self.fusers.parameters()).dtype
        per_sender, masks = [], []
        for slot, (name, message) in enumerate(messages.items()):
            entries = self.fuser_for(name)(self._unrotated_sender_layers(name, message, dtype))
            if weights is not None:
                entries = [(k, v * weights[:, layer, slot].view(-1, 1, 1, 1)) for layer, (k, v) in enumerate(entries)]
            per_sender.append(entries)
            masks.append(message.attention_mask)
        mask = torch.cat(masks, dim=1)
        cos, sin = rotary_cos_sin(self.receiver.rotary_embedding, positions_from_mask(mask), torch.float32)
        model_dtype = next(self.receiver_model.parameters()).dtype
        layers = []
        for layer in range(self.receiver.identity.num_layers):
            keys = torch.cat([entries[layer][0] for entries in per_sender], dim=2)
            values = torch.cat([entries[layer][1] for entries in per_sender], dim=2)
            layers.append((apply_rotary(keys.float(), cos, sin).to(model_dtype), values.to(model_dtype)))
        return layers_to_cache(layers), mask

    # --- forward / generate -------------------------------------------------------------------
    def _selected(self, senders: Sequence[str] | None, batch: FusionBatch, fuse: bool) -> list[str]:
        if not fuse:
            return []
        return list(batch.senders) if senders is None else list(senders)

    def forward(
        self,
        batch: FusionBatch,
        senders: Sequence[str] | None = None,
        fuse: bool = True,
        messages: Mapping[str, KVMessage] | None = None,
    ) -> Tensor:
        """Receiver logits for the last prompt token and every response token, (B, 1 + R, V).

        ``senders`` selects the senders to fuse (default: every sender in the batch); with none
        selected (or ``fuse=False``, or every gate closed) this is exactly the receiver alone.
        ``messages`` replace senders' own prefills (controls).
        """
        prompt_ids, prompt_mask = batch.receiver_input_ids, batch.receiver_attention_mask
        full_ids, full_mask = prompt_ids, prompt_mask
        if batch.response_ids is not None:
            full_ids = torch.cat((prompt_ids, batch.response_ids), dim=1)
            full_mask = torch.cat((prompt_mask, batch.response_mask), dim=1)
        cut = prompt_ids.shape[1] - 1
        selected = self._selected(senders, batch, fuse)
        if self.mode == "concat" and selected:
            found = self._messages(batch, selected, messages)
            if found:
                prefix, prefix_mask = self._concat_prefix(batch, found, self._source_weights(batch, list(found)))
                attention = torch.cat((prefix_mask, full_mask), dim=1)
                positions = positions_from_mask(attention)[:, prefix_mask.shape[1] :]
                output = self.receiver_model(
                    input_ids=full_ids,
                    attention_mask=attention,
                    position_ids=positions,
                    **with_cache(self.receiver_model, prefix),
                    use_cache=False,
                    logits_to_keep=full_ids.shape[1] - cut,
                )
                return output.logits
        positions = positions_from_mask(full_mask)
        cache = self.prefill_receiver(full_ids[:, :cut], full_mask[:, :cut], positions[:, :cut], batch, selected, messages)
        output = self.receiver_model(
            input_ids=full_ids[:, cut:],
            attention_mask=full_mask,
            position_ids=positions[:, cut:],
            **with_cache(self.receiver_model, cache),
            use_cache=False,
        )
        return output.logits

    def prefill_receiver(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        positions: Tensor,
        batch: FusionBatch,
        senders: Sequence[str] = (),
        messages: Mapping[str, KVMessage] | None = None,
    ) -> DynamicCache:
        """Residual mode: the receiver's cache over ``input_ids`` (prompt but its last token), fused with ``senders``.

        With fusers of ``positions`` ``all`` or ``last``, the cache also fuses the last prompt token
        when the receiver writes it (``last``: that token only).
        """
        with torch.no_grad():
            output = self.receiver_model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True
            )
        cache = returned_cache(output)
        found = self._messages(batch, senders, messages) if senders else {}
        if not found:
            return cache
        weights = self._source_weights(batch, list(found))
        layers = cache_to_layers(cache)
        if self.positions != "last":
            fused = self._residual_fuse(dict(enumerate(layers)), positions, batch, found, weights)
            layers = [fused[layer] for layer in range(len(layers))]
        if self.positions == "prompt":
            return layers_to_cache(layers)
        return WriteHookCache(layers, self._last_token_hook(batch, found, weights))

    def _last_token_hook(self, batch: FusionBatch, messages: Mapping[str, KVMessage], weights: Tensor | None):
        """Fuses the last prompt token's K/V as the receiver writes them, layer by layer (``positions``)."""
        last = batch.receiver_input_ids.shape[1] - 1
        position = positions_from_mask(batch.receiver_attention_mask)[:, last:]

        def hook(layer: int, keys: Tensor, values: Tensor) -> LayerKV:
            head = {layer: (keys[:, :, :1], values[:, :, :1])}
            fused_keys, fused_values = self._residual_fuse(head, position, batch, messages, weights, start=last)[layer]
            return torch.cat((fused_keys, keys[:, :, 1:]), dim=2), torch.cat((fused_values, values[:, :, 1:]), dim=2)

        return hook

    @torch.no_grad()
    def generate(
        self,
        batch: FusionBatch,
        max_new_tokens: int = 64,
        senders: Sequence[str] | None = None,
        fuse: bool = True,
        messages: Mapping[str, KVMessage] | None = None,
    ) -> list[list[int]]:
        """Greedy continuation of each prompt over the fused cache; new token ids per sample (up to eos)."""
        ids, mask = batch.receiver_input_ids, batch.receiver_attention_mask
        selected = self._selected(senders, batch, fuse)
        found = self._messages(batch, selected, messages) if selected else {}
        pad = self.receiver.tokenizer.pad_token_id
        if self.mode == "concat" and found:
            cache, prefix_mask = self._concat_prefix(batch, found, self._source_weights(batch, list(found)))
            # generate() skips the tokens its cache already holds: stand-ins for the prefix entries.
            prompt_ids = torch.cat((torch.full_like(prefix_mask, pad), ids), dim=1)
            prompt_mask = torch.cat((prefix_mask, mask), dim=1)
        else:
            positions = positions_from_mask(mask)
            cut = ids.shape[1] - 1
            cache = self.prefill_receiver(ids[:, :cut], mask[:, :cut], positions[:, :cut], batch, list(found), found)
            prompt_ids, prompt_mask = ids, mask
        output = self.receiver_model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            **with_cache(self.receiver_model, cache),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=self.receiver.end_of_turn_token_id,
        )
        eos = self.receiver.end_of_turn_token_id
        return [trim_at_eos(row[prompt_ids.shape[1] :].tolist(), eos) for row in output]
