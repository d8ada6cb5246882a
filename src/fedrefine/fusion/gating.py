"""Gating network: per receiver, per layer, how much of each sender's contribution to take.

The FedRefine paper: "a gating network is required for each LLM to select the data from its
own model or other fusers". Conditioned on the query (mean of the receiver's input embeddings
over the prompt), it outputs per layer a softmax over the receiver's own cache and each
available sender; the senders' shares scale their contributions (residual deltas or concat
values). Unavailable senders are masked out, so any subset works.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from fedrefine.fuser import Fuser, read_weights, write_weights
from fedrefine.fusion.batch import FusionBatch
from fedrefine.wire.message import KVMessage

FORMAT_NAME = "fedrefine.source_gate"
FORMAT_VERSION = 1
WEIGHTS_FILE, METADATA_FILE = "source_gate.safetensors", "source_gate.json"


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
        self.receiver_hidden, self.hidden_size = receiver_hidden, hidden_size
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
            embeddings = receiver_model.get_input_embeddings()(input_ids).float()  # (B, N, E)
        mask = attention_mask.unsqueeze(-1).float()  # (B, N, 1)
        pooled = (embeddings * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, E): mean over real tokens
        logits = self.net(pooled.to(self.net[1].weight.dtype)).view(-1, self.num_layers, 1 + self.num_senders)
        keep = torch.tensor([0, *(1 + i for i in available)], device=logits.device)  # self + available senders
        return logits.index_select(-1, keep).softmax(-1)[..., 1:]  # (B, L, len(available))

    def weigh(
        self, receiver_model: PreTrainedModel, batch: FusionBatch, kv_messages: Mapping[str, KVMessage], available: Sequence[int]
    ) -> Tensor:
        """The weights of the senders that sent ``kv_messages`` (slots ``available``), (B, num_layers, len(available)),
        from the batch's receiver prompts (the common call of both gating networks; the messages are not read)."""
        return self(receiver_model, batch.receiver_input_ids, batch.receiver_attention_mask, available)

    # --- persistence -------------------------------------------------------------------------
    @staticmethod
    def _pair_metadata(fusers: Sequence[Fuser]) -> dict[str, Any]:
        return {"receiver": fusers[0].receiver.to_dict(), "senders": [f.sender.to_dict() for f in fusers]}

    def save(self, directory: str | Path, fusers: Sequence[Fuser]) -> Path:
        """Write ``source_gate.safetensors`` and ``source_gate.json`` (format, version, the receiver and senders of
        ``fusers``, one per sender in order, and the sizes)."""
        if len(fusers) != self.num_senders:
            raise ValueError(f"This gating network weighs {self.num_senders} senders, got {len(fusers)} fusers.")
        directory = Path(directory)
        write_weights(directory / WEIGHTS_FILE, self, FORMAT_NAME)
        metadata = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            **self._pair_metadata(fusers),
            "receiver_hidden": self.receiver_hidden,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
        }
        (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, fusers: Sequence[Fuser]) -> SourceGate:
        """A saved gating network, built with the sizes it was saved with, for exactly these fusers' pairs."""
        path = Path(directory) / METADATA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"No gating network at {directory}: {METADATA_FILE} is missing.")
        sizes = json.loads(path.read_text())
        gate = cls(sizes["receiver_hidden"], sizes["num_layers"], len(fusers), sizes["hidden_size"])
        return gate.load_weights(directory, fusers)

    def load_weights(self, directory: str | Path, fusers: Sequence[Fuser]) -> SourceGate:
        """Load weights saved for exactly the receiver and sender list of ``fusers`` (in this order) and these sizes."""
        path = Path(directory) / METADATA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"No gating network at {directory}: {METADATA_FILE} is missing.")
        metadata = json.loads(path.read_text())
        if metadata.get("format") != FORMAT_NAME or metadata.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} is not a FedRefine gating network of format version {FORMAT_VERSION} "
                f"(got format {metadata.get('format')!r}, version {metadata.get('version')!r}); train it again with "
                f"`fedrefine fit`."
            )
        mine = self._pair_metadata(fusers)
        if (metadata["receiver"], metadata["senders"]) != (mine["receiver"], mine["senders"]):
            raise ValueError(
                f"The gating network in {directory} was trained for another receiver or sender list; train one for "
                f"{' + '.join(f.sender.key for f in fusers)} -> {fusers[0].receiver.key}."
            )
        sizes = {key: metadata[key] for key in ("receiver_hidden", "num_layers", "hidden_size")}
        if sizes != {"receiver_hidden": self.receiver_hidden, "num_layers": self.num_layers, "hidden_size": self.hidden_size}:
            raise ValueError(f"The gating network in {directory} has sizes {sizes}; build it with those (gating_hidden_size).")
        self.load_state_dict(read_weights(Path(directory) / WEIGHTS_FILE, self))
        return self
