"""Training conversations encoded for a fused receiver: prompts for every participant, the response for the
receiver, truncated to ``max_length`` (counted), never silently dropped."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from fedrefine.data.conversations import ChatExample
from fedrefine.fusion import FusedReceiver, FusionBatch, encode_response


class ChatBatchEncoder:
    """Encodes :class:`ChatExample` batches; too-long samples are truncated or dropped, and counted in ``counts``.

    Args:
        max_length: receiver tokens per training sample (prompt + response).
    """

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.counts: dict[str, int] = defaultdict(int)

    def batch(self, model: FusedReceiver, examples: Sequence[ChatExample]) -> FusionBatch | None:
        """The padded batch, or None when every sample's prompt is too long (after the first batch)."""
        encoded, lengths = [], []
        for example in examples:
            fusion_example = model.encoder.encode(example.messages)
            lengths.append(len(fusion_example.receiver_ids))
            response = self.truncate(lengths[-1], encode_response(model.receiver, example.response))
            if response is not None:
                fusion_example.response_ids = response
                encoded.append(fusion_example)
        self.check_not_all_dropped(len(encoded), lengths)
        return model.encoder.collate(encoded) if encoded else None

    def truncate(self, prompt_length: int, response: list[int]) -> list[int] | None:
        """Fit a response after a prompt within ``max_length``: truncate it (counted) or drop the sample (counted)."""
        room = self.max_length - prompt_length
        if room < 1:
            self.counts["dropped_prompt_too_long"] += 1
            return None
        if len(response) > room:
            self.counts["truncated_responses"] += 1
            self.counts["truncated_response_tokens"] += len(response) - room
            return response[:room]
        return response

    def check_not_all_dropped(self, kept: int, prompt_lengths: Sequence[int]) -> None:
        if not kept and not self.counts["encoded_samples"]:
            raise ValueError(
                f"model.max_length={self.max_length} is smaller than the receiver prompt of every sample in the "
                f"first batch (shortest: {min(prompt_lengths)} tokens); raise model.max_length."
            )
        self.counts["encoded_samples"] += kept
