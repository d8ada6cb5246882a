"""Concat fusion (the FedRefine paper's eq. 1 and 4): projected sender caches placed ahead of the receiver's.

    each selected sender's cache is projected into receiver cache entries, stacked sender by
    sender ahead of the receiver's own positions (RoPE applied at those positions), and the
    receiver runs its whole prompt over that prefix; texts need not be aligned
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedrefine.cache import layers_to_cache, positions_from_mask
from fedrefine.fusion.strategy import FusionInput, FusionStrategy, ReceiverContext
from fedrefine.participants import Participant
from fedrefine.rope import RotaryFrame


class ConcatFusion(FusionStrategy):
    """Stacks every sender's projected entries ahead of the receiver's prompt; the gate weighs their values."""

    mode, aligns = "concat", False

    def prepare(
        self,
        receiver: Participant,
        input_ids: Tensor,
        attention_mask: Tensor,
        inputs: Sequence[FusionInput],
        own: ReceiverContext | None = None,
    ) -> ReceiverContext:
        """The senders' projected caches ahead of the prompt; the receiver's prompt runs after them, so a
        prefill made without them (``own``) cannot be used."""
        dtype = next(inputs[0].fuser.parameters()).dtype
        per_sender = []
        for item in inputs:
            entries = item.fuser(item.kv.unrotated(dtype))  # per receiver layer: (K, V), each (B, H_t, N_s, D_t)
            if item.weight is not None:
                entries = [(k, v * item.weight[:, layer].view(-1, 1, 1, 1)) for layer, (k, v) in enumerate(entries)]
            per_sender.append(entries)
        prefix_mask = torch.cat([item.kv.attention_mask for item in inputs], dim=1)  # (B, P = sum of N_s)
        frame = RotaryFrame(receiver.rotary_embedding, positions_from_mask(prefix_mask))
        model_dtype = next(receiver.model.parameters()).dtype
        layers = []
        for layer in range(receiver.identity.num_layers):
            keys = torch.cat([entries[layer][0] for entries in per_sender], dim=2)  # (B, H_t, P, D_t)
            values = torch.cat([entries[layer][1] for entries in per_sender], dim=2)
            layers.append((frame.rotate(keys).to(model_dtype), values.to(model_dtype)))
        return ReceiverContext(layers_to_cache(layers), prefix_mask, consumed=0)
