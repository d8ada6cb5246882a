"""A gating network that reads what each sender sent: does this sender know the answer?

The receiver cannot tell which sender knows about an entity it has never seen; the senders'
own states can. Per sender, the gate reads the values the sender sent at the column the
receiver's last prompt token reads (with an answer prefix every participant reads, that is
where the sender has worked out its answer), in every sender layer its fuser reads, and
outputs per receiver layer a weight in (0, 1) for that sender's contribution. Senders are
weighed independently (a sigmoid each, not a softmax), so several senders that know can all
keep their full effect and one that does not can be turned off whatever the others do.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fedrefine.fuser import Fuser, read_weights, write_weights
from fedrefine.fusion.batch import FusionBatch
from fedrefine.wire.message import KVMessage

FORMAT_NAME = "fedrefine.sender_state_gate"
FORMAT_VERSION = 1
WEIGHTS_FILE, METADATA_FILE = "sender_state_gate.safetensors", "sender_state_gate.json"


def read_column(alignment: Tensor | None, message: KVMessage) -> Tensor:
    """(B,) the sender column the receiver's last prompt token reads: its aligned column (residual), else
    (unaligned, or concat) the sender's own last column, its prompt's last token (prompts are left-padded)."""
    last = message.attention_mask.shape[1] - 1
    if alignment is None:
        return torch.full((message.attention_mask.shape[0],), last, dtype=torch.long, device=message.attention_mask.device)
    column = alignment[:, -1]  # (B,)
    return torch.where(column >= 0, column, torch.full_like(column, last))


class SenderStateGate(nn.Module):
    """Per-sender, per-receiver-layer weights from each sender's sent values at the column that is read.

    Args:
        fusers: each sender's fuser, in sender order: the sender layers it reads (its layer map) are
            the ones the gate reads, each (H_s * D_s) values wide; a layer not carried (its fuser's
            gate closed) reads as zeros.
        hidden_size: width of each sender's reading MLP.
        open_bias: initial logit of every weight: 2 gives 0.88, so pairwise-trained fusers start with
            most of their effect.
    """

    def __init__(self, fusers: Sequence[Fuser], hidden_size: int = 64, open_bias: float = 2.0) -> None:
        super().__init__()
        if not fusers:
            raise ValueError("A sender-state gate needs at least one sender's fuser.")
        self.num_layers = fusers[0].receiver.num_layers
        self.hidden_size = hidden_size
        self.read_layers = [sorted(set(f.layer_map)) for f in fusers]  # per sender: its layers read, ascending
        self.readers = nn.ModuleList()
        for fuser, layers in zip(fusers, self.read_layers):
            width = len(layers) * fuser.sender.num_kv_heads * fuser.sender.head_dim
            reader = nn.Sequential(nn.RMSNorm(width), nn.Linear(width, hidden_size), nn.GELU(), nn.Linear(hidden_size, self.num_layers))
            nn.init.zeros_(reader[-1].weight)
            nn.init.constant_(reader[-1].bias, open_bias)
            self.readers.append(reader)

    @property
    def num_senders(self) -> int:
        return len(self.readers)

    def state(self, slot: int, message: KVMessage, column: Tensor) -> Tensor:
        """(B, F) the sender's values at ``column`` (B,) in every layer its fuser reads, side by side."""
        batch = column.shape[0]
        rows = torch.arange(batch, device=column.device)
        parts = []
        for layer in self.read_layers[slot]:
            if layer in message.layers:
                values = message.layers[layer][1]  # (B, H_s, N, D_s)
                parts.append(values[rows, :, column].flatten(1).float())  # (B, H_s * D_s)
            else:  # not carried: its fuser's gate is closed
                heads, width = message.layers[next(iter(message.layers))][1].shape[1::2]
                parts.append(torch.zeros(batch, heads * width, device=column.device, dtype=torch.float32))
        return torch.cat(parts, dim=-1)

    def logits(self, messages: Sequence[KVMessage], columns: Sequence[Tensor], available: Sequence[int]) -> Tensor:
        """Logits (B, num_layers, len(available)) of the available senders (slots into the fusers given at
        construction), each sender's from its own message and read column (B,)."""
        logits = []
        for slot, message, column in zip(available, messages, columns, strict=True):
            reader = self.readers[slot]
            logits.append(reader(self.state(slot, message, column).to(reader[1].weight.dtype)))  # (B, L_t)
        return torch.stack(logits, dim=-1)

    def forward(self, messages: Sequence[KVMessage], columns: Sequence[Tensor], available: Sequence[int]) -> Tensor:
        """Weights in (0, 1), (B, num_layers, len(available)): the sigmoid of :meth:`logits`."""
        return torch.sigmoid(self.logits(messages, columns, available))

    def batch_logits(self, batch: FusionBatch, kv_messages: Mapping[str, KVMessage], available: Sequence[int]) -> Tensor:
        """:meth:`logits` of the senders that sent ``kv_messages`` (slots ``available``), each read at the column
        its batch alignment gives the receiver's last prompt token."""
        columns = [read_column(batch.senders[name].alignment, message) for name, message in kv_messages.items()]
        return self.logits(list(kv_messages.values()), columns, available)

    def weigh(
        self, receiver_model: nn.Module, batch: FusionBatch, kv_messages: Mapping[str, KVMessage], available: Sequence[int]
    ) -> Tensor:
        """The weights of the senders that sent ``kv_messages`` (the common call of both gating networks; the
        receiver's model is not read)."""
        return torch.sigmoid(self.batch_logits(batch, kv_messages, available))

    # --- persistence -------------------------------------------------------------------------
    def metadata(self, fusers: Sequence[Fuser]) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "receiver": fusers[0].receiver.to_dict(),
            "senders": [f.sender.to_dict() for f in fusers],
            "read_layers": self.read_layers,
            "hidden_size": self.hidden_size,
        }

    def save(self, directory: str | Path, fusers: Sequence[Fuser]) -> Path:
        """Write ``sender_state_gate.safetensors`` and ``.json`` (format, receiver, senders, layers read, width)."""
        if len(fusers) != self.num_senders:
            raise ValueError(f"This gate reads {self.num_senders} senders, got {len(fusers)} fusers.")
        directory = Path(directory)
        write_weights(directory / WEIGHTS_FILE, self, FORMAT_NAME)
        (directory / METADATA_FILE).write_text(json.dumps(self.metadata(fusers), indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, fusers: Sequence[Fuser]) -> SenderStateGate:
        """A saved sender-state gate, built with the width it was saved with, for exactly these fusers."""
        path = Path(directory) / METADATA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"No sender-state gate at {directory}: {METADATA_FILE} is missing.")
        return cls(fusers, json.loads(path.read_text())["hidden_size"]).load_weights(directory, fusers)

    def load_weights(self, directory: str | Path, fusers: Sequence[Fuser]) -> SenderStateGate:
        """Load weights saved for exactly these senders (in this order), receiver, layers read and width."""
        path = Path(directory) / METADATA_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"No sender-state gate at {directory}: {METADATA_FILE} is missing (a gate that reads the prompt is "
                f"loaded with gate_reads: prompt)."
            )
        saved = json.loads(path.read_text())
        if saved.get("format") != FORMAT_NAME or saved.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} is not a FedRefine sender-state gate of format version {FORMAT_VERSION}.")
        mine = self.metadata(fusers)
        for key in ("receiver", "senders", "read_layers", "hidden_size"):
            if saved[key] != mine[key]:
                raise ValueError(
                    f"The gate in {directory} was trained for other {key.replace('_', ' ')} ({saved[key]!r}, here "
                    f"{mine[key]!r}); train one for these senders and fusers."
                )
        self.load_state_dict(read_weights(Path(directory) / WEIGHTS_FILE, self))
        return self
