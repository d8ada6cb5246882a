"""Gating network: per receiver, per layer, how much of each sender's contribution to take.

The FedRefine paper: "a gating network is required for each LLM to select the data from its
own model or other fusers". Conditioned on the query (mean of the receiver's input embeddings
over the prompt), it outputs per layer a softmax over the receiver's own cache and each
available sender; the senders' shares scale their contributions (residual deltas or concat
values). Unavailable senders are masked out, so any subset works.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel


class SourceGate(nn.Module):
    """Query-conditioned per-layer weights over {receiver itself} + senders.

    Args:
        receiver_hidden: the receiver's embedding width.
        num_layers: the receiver's depth.
        num_senders: how many senders the receiver may hear from.
        hidden_size: width of the gating MLP.
        self_bias: initial logit of the receiver's own cache (senders start at 0): -2 gives one
            sender ~88% weight at start, so pairwise-trained fusers keep most of their effect.
    """

    def __init__(
        self, receiver_hidden: int, num_layers: int, num_senders: int, hidden_size: int = 64, self_bias: float = -2.0
    ) -> None:
        super().__init__()
        self.num_layers, self.num_senders = num_layers, num_senders
        self.net = nn.Sequential(
            nn.RMSNorm(receiver_hidden),
            nn.Linear(receiver_hidden, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, num_layers * (1 + num_senders)),
        )
        nn.init.zeros_(self.net[-1].weight)
        with torch.no_grad():
            self.net[-1].bias.view(num_layers, 1 + num_senders).copy_(
                torch.tensor([self_bias] + [0.0] * num_senders).expand(num_layers, -1)
            )

    def forward(self, receiver_model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, available: Sequence[int]) -> Tensor:
        """Weights (B, num_layers, len(available)) of the available senders (the receiver's own share is the rest)."""
        with torch.no_grad():
            embeddings = receiver_model.get_input_embeddings()(input_ids).float()
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (embeddings * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.net(pooled.to(self.net[1].weight.dtype)).view(-1, self.num_layers, 1 + self.num_senders)
        keep = torch.tensor([0, *(1 + i for i in available)], device=logits.device)
        return logits.index_select(-1, keep).softmax(-1)[..., 1:]
