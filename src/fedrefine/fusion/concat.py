"""Concat fusion (the FedRefine paper's eq. 1 and 4): projected sender caches placed ahead of the receiver's.

    each selected sender's cache is projected into receiver cache entries, stacked sender by
    sender ahead of the receiver's own positions (RoPE applied at those positions), and the
    receiver runs its whole prompt over that prefix; texts need not be aligned
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedrefine.fusion.strategy import FusionInput, FusionStrategy, ReceiverContext
from fedrefine.kv.cache import layers_to_cache, positions_from_mask
from fedrefine.kv.rope import RotaryFrame
from fedrefine.kv.stack import KVStack
from fedrefine.participants import Participant


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
        whole_prompt: bool = False,
    ) -> ReceiverContext:
        """The senders' projected caches ahead of the prompt; the receiver's prompt runs after them, so a
        prefill made without them (``own``) cannot be used."""
        dtype = next(inputs[0].fuser.parameters()).dtype
        every_layer = tuple(range(receiver.identity.num_layers))
        per_sender = []
        for item in inputs:
            entries = item.fuser(item.kv.unrotated(dtype))  # every receiver layer: (L, B, H_t, N_s, D_t)
            if entries is None or entries.layers != every_layer:
                raise ValueError(
                    f"Concat fusion needs entries for every receiver layer from sender {item.kv.sender.name}; its "
                    "message lacks layers its fuser reads. Send every layer in fuser.sender_layers_needed()."
                )
            if item.weight is not None:  # the gating network's share per sample and layer: (L, B, 1, 1, 1)
                scale = item.weight.T[:, :, None, None, None]
                entries = entries.map(lambda k: k, lambda v: v * scale)
            per_sender.append(entries)
        prefix_mask = torch.cat([item.kv.attention_mask for item in inputs], dim=1)  # (B, P = sum of N_s)
        frame = RotaryFrame(receiver.rotary_embedding, positions_from_mask(prefix_mask))
        model_dtype = next(receiver.model.parameters()).dtype
        keys = torch.cat([entries.keys for entries in per_sender], dim=3)  # (L, B, H_t, P, D_t)
        values = torch.cat([entries.values for entries in per_sender], dim=3)
        layers = KVStack(every_layer, frame.rotate(keys).to(model_dtype), values.to(model_dtype)).unbind()
        return ReceiverContext(layers_to_cache([layers[i] for i in every_layer]), prefix_mask, consumed=0)
