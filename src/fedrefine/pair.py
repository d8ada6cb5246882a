"""One sender -> receiver pair in residual C2C mode: encoding, batching and the fused forward.

Flow for a batch of prompts::

    sender prefills its own rendering of the prompt          -> KVMessage
    receiver prefills its prompt except the last token        -> receiver cache
    fuser adds g*w*p to the receiver cache at aligned positions (pre-RoPE, per sample)
    receiver runs the last prompt token (+ response or generation) over the fused cache

The sender is never consulted again after its prefill.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from fedrefine.align import align_tokens
from fedrefine.cache import (
    LayerKV,
    apply_rotary,
    cache_to_layers,
    layers_to_cache,
    positions_from_mask,
    remove_rotary,
    rotary_cos_sin,
)
from fedrefine.chat import EncodedChat, Message, encode_chat
from fedrefine.fuser import Fuser
from fedrefine.message import KVMessage, prefill_message
from fedrefine.participants import Participant


@dataclass
class PairExample:
    """One prompt encoded for both models, the alignment, and optionally the response to supervise."""

    receiver_ids: list[int]
    sender_ids: list[int]
    alignment: list[int]
    response_ids: list[int] | None = None


@dataclass
class PairBatch:
    """Padded tensors for a batch of :class:`PairExample` (prompts left-padded, responses right-padded)."""

    receiver_input_ids: Tensor
    receiver_attention_mask: Tensor
    sender_input_ids: Tensor
    sender_attention_mask: Tensor
    alignment: Tensor
    response_ids: Tensor | None = None
    response_mask: Tensor | None = None

    def to(self, device: torch.device | str) -> PairBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return PairBatch(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in moved.items()})

    def __len__(self) -> int:
        return self.receiver_input_ids.shape[0]


def encode_response(participant: Participant, response: str) -> list[int]:
    """Token ids of an assistant response, closed by the participant's end-of-turn token."""
    ids = participant.tokenizer(response, add_special_tokens=False)["input_ids"]
    return [*ids, participant.end_of_turn_token_id]


def make_pair_example(
    receiver_chat: EncodedChat, sender_chat: EncodedChat, response_ids: list[int] | None = None, strict: bool = True
) -> PairExample:
    """Align two encodings of the same messages into a :class:`PairExample` (see :func:`align_tokens`)."""
    return PairExample(
        receiver_ids=receiver_chat.input_ids,
        sender_ids=sender_chat.input_ids,
        alignment=align_tokens(receiver_chat, sender_chat, strict=strict),
        response_ids=response_ids,
    )


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
    return ids, mask


def _right_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def collate_pair_examples(examples: Sequence[PairExample], receiver_pad_id: int, sender_pad_id: int) -> PairBatch:
    """Pad a list of examples into a :class:`PairBatch`; alignment indices follow the sender's padding."""
    if not examples:
        raise ValueError("Cannot collate an empty batch.")
    receiver_ids, receiver_mask = left_pad([e.receiver_ids for e in examples], receiver_pad_id)
    sender_ids, sender_mask = left_pad([e.sender_ids for e in examples], sender_pad_id)
    alignment = torch.full(receiver_ids.shape, -1, dtype=torch.long)
    for i, example in enumerate(examples):
        sender_shift = sender_ids.shape[1] - len(example.sender_ids)
        row = torch.tensor(example.alignment, dtype=torch.long)
        row = torch.where(row >= 0, row + sender_shift, row)
        alignment[i, receiver_ids.shape[1] - len(example.receiver_ids) :] = row
    batch = PairBatch(receiver_ids, receiver_mask, sender_ids, sender_mask, alignment)
    responses = [e.response_ids for e in examples]
    if any(r is not None for r in responses):
        if any(r is None for r in responses):
            raise ValueError("Either every example of a batch has a response or none has.")
        batch.response_ids, batch.response_mask = _right_pad(responses, receiver_pad_id)
    return batch


class C2CPair(nn.Module):
    """A frozen sender and receiver with a trainable fuser between them (residual fusion)."""

    def __init__(self, receiver: Participant, sender: Participant, fuser: Fuser) -> None:
        super().__init__()
        if (fuser.sender, fuser.receiver) != (sender.identity, receiver.identity):
            raise ValueError(
                f"Fuser is for {fuser.sender.key} -> {fuser.receiver.key}, participants are "
                f"{sender.identity.key} -> {receiver.identity.key}."
            )
        self.receiver = receiver
        self.sender = sender
        self.receiver_model = receiver.model
        self.sender_model = sender.model
        self.fuser = fuser

    # --- data -------------------------------------------------------------------------------
    def encode(self, messages: Sequence[Message], response: str | None = None) -> PairExample:
        """Encode a prompt (messages) for both models, align them, and tokenize an optional response."""
        receiver_chat = encode_chat(self.receiver, messages, add_generation_prompt=True)
        sender_chat = encode_chat(self.sender, messages, add_generation_prompt=True)
        response_ids = None if response is None else encode_response(self.receiver, response)
        return make_pair_example(receiver_chat, sender_chat, response_ids)

    def collate(self, examples: Sequence[PairExample]) -> PairBatch:
        return collate_pair_examples(examples, self.receiver.tokenizer.pad_token_id, self.sender.tokenizer.pad_token_id)

    # --- forward ----------------------------------------------------------------------------
    def send(self, batch: PairBatch) -> KVMessage | None:
        """The sender's prefill, carrying only the layers open gates read; None if no gate is open."""
        needed = self.fuser.sender_layers_needed()
        if not needed:
            return None
        return prefill_message(self.sender, batch.sender_input_ids, batch.sender_attention_mask, needed)

    def fuse(
        self, receiver_layers: list[LayerKV], receiver_positions: Tensor, message: KVMessage, batch: PairBatch
    ) -> list[LayerKV]:
        """Receiver cache with the fuser's deltas added at aligned, unpadded prompt positions."""
        length = receiver_layers[0][0].shape[2]
        alignment = batch.alignment[:, :length]
        fused_here = (alignment >= 0) & batch.receiver_attention_mask[:, :length].bool()
        fuser_dtype = next(self.fuser.parameters()).dtype

        sender_cos, sender_sin = rotary_cos_sin(self.sender.rotary_embedding, message.positions, torch.float32)
        gather_index = alignment.clamp(min=0)[:, None, :, None]
        sender_states: list[LayerKV | None] = [None] * self.sender.identity.num_layers
        for j, (keys, values) in message.layers.items():
            keys = remove_rotary(keys.float(), sender_cos, sender_sin)
            index = gather_index.expand(-1, keys.shape[1], -1, keys.shape[3])
            sender_states[j] = (keys.gather(2, index).to(fuser_dtype), values.gather(2, index).to(fuser_dtype))

        receiver_cos, receiver_sin = rotary_cos_sin(self.receiver.rotary_embedding, receiver_positions, torch.float32)
        receiver_states = [
            (remove_rotary(k.float(), receiver_cos, receiver_sin).to(fuser_dtype), v.to(fuser_dtype))
            for k, v in receiver_layers
        ]
        deltas = self.fuser(sender_states, receiver_states)

        where = fused_here[:, None, :, None]
        fused: list[LayerKV] = []
        for (keys, values), delta in zip(receiver_layers, deltas):
            if delta is None:
                fused.append((keys, values))
                continue
            delta_keys = apply_rotary(delta[0].float(), receiver_cos, receiver_sin)
            fused.append(
                (
                    keys + torch.where(where, delta_keys, 0.0).to(keys.dtype),
                    values + torch.where(where, delta[1], 0.0).to(values.dtype),
                )
            )
        return fused

    def forward(self, batch: PairBatch, fuse: bool = True, message: KVMessage | None = None) -> Tensor:
        """Receiver logits for the last prompt token and every response token, (B, 1 + R, V).

        With ``fuse=False`` (or every gate closed) this is exactly the receiver alone. A given
        ``message`` replaces the sender's own prefill (used by controls).
        """
        prompt_ids, prompt_mask = batch.receiver_input_ids, batch.receiver_attention_mask
        if batch.response_ids is not None:
            full_ids = torch.cat((prompt_ids, batch.response_ids), dim=1)
            full_mask = torch.cat((prompt_mask, batch.response_mask), dim=1)
        else:
            full_ids, full_mask = prompt_ids, prompt_mask
        positions = positions_from_mask(full_mask)
        cut = prompt_ids.shape[1] - 1
        cache = self.prefill_receiver(full_ids[:, :cut], full_mask[:, :cut], positions[:, :cut], batch, fuse, message)
        output = self.receiver_model(
            input_ids=full_ids[:, cut:],
            attention_mask=full_mask,
            position_ids=positions[:, cut:],
            past_key_values=cache,
            use_cache=False,
        )
        return output.logits

    @torch.no_grad()
    def generate(
        self, batch: PairBatch, max_new_tokens: int = 64, fuse: bool = True, message: KVMessage | None = None
    ) -> list[list[int]]:
        """Greedy continuation of each prompt over the fused cache; new token ids per sample (up to eos)."""
        ids, mask = batch.receiver_input_ids, batch.receiver_attention_mask
        positions = positions_from_mask(mask)
        cut = ids.shape[1] - 1
        cache = self.prefill_receiver(ids[:, :cut], mask[:, :cut], positions[:, :cut], batch, fuse, message)
        tokenizer = self.receiver.tokenizer
        output = self.receiver_model.generate(
            input_ids=ids,
            attention_mask=mask,
            past_key_values=cache,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=self.receiver.end_of_turn_token_id,
        )
        return [trim_at_eos(row[ids.shape[1] :].tolist(), self.receiver.end_of_turn_token_id) for row in output]

    def prefill_receiver(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        positions: Tensor,
        batch: PairBatch,
        fuse: bool = True,
        message: KVMessage | None = None,
    ):
        """The receiver's cache over ``input_ids`` (the prompt but its last token), fused unless ``fuse=False``."""
        with torch.no_grad():
            output = self.receiver_model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True
            )
        cache = output.past_key_values
        if not fuse:
            return cache
        message = message if message is not None else self.send(batch)
        if message is None:
            return cache
        return layers_to_cache(self.fuse(cache_to_layers(cache), positions, message, batch))


def trim_at_eos(token_ids: list[int], eos_token_id: int) -> list[int]:
    """Generated ids up to (not including) the first end-of-turn token."""
    return token_ids[: token_ids.index(eos_token_id)] if eos_token_id in token_ids else token_ids
