"""What one request may ask of a served participant, checked field by field before any model runs.

Every field is bounded (:class:`ServeLimits`); a request outside the bounds is a :class:`RequestError`
carrying the status the server answers with (``INVALID_ARGUMENT``, or ``RESOURCE_EXHAUSTED`` for sizes) and
a short detail that never echoes the request back whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
import torch
from torch import Tensor

from fedrefine.participants import Participant
from fedrefine.participants.padding import left_pad
from fedrefine.runtime.admission import RequestError
from fedrefine.runtime.protos import participant_pb2 as pb
from fedrefine.settings import SettingsError, documented
from fedrefine.wire.codecs import CODEC_NAMES, Codec, codec_by_name
from fedrefine.wire.format import MAX_GROUP_SIZE


@documented
@dataclass
class ServeLimits:
    """What one request may ask of a served participant, and how many calls it takes on at once."""

    max_batch: int = field(default=64, metadata={"help": "Most prompts (or queries) per request."})
    max_tokens: int = field(
        default=65536, metadata={"help": "Most tokens per request: prompts x padded width for Prefill, all prompts for Hint."}
    )
    max_prompt_tokens: int = field(
        default=8192, metadata={"help": "Longest prompt, and widest padded batch, in tokens (a model's cost grows "
                                        "with the square of it)."}
    )
    max_text_chars: int = field(
        default=65536, metadata={"help": "Longest text, prompt or query, in characters (checked before tokenizing)."}
    )
    max_new_tokens: int = field(default=512, metadata={"help": "Longest Hint reply a request may ask for."})
    max_calls: int = field(
        default=8, metadata={"help": "Prefill, Hint and Rephrase calls replying (streaming) at once, over all clients; "
                                     "more are refused RESOURCE_EXHAUSTED. Calls waiting for the model take a place in "
                                     "the batching queue instead (batching.max_queue). Health and Identity are never "
                                     "limited."}
    )
    max_calls_per_client: int = field(
        default=4, metadata={"help": "Calls in progress (waiting or replying) per client connection."}
    )
    send_timeout_s: float = field(
        default=10.0, metadata={"help": "A streamed chunk its client does not take within this long cancels the call."}
    )

    def __post_init__(self) -> None:
        counts = {k: v for k, v in vars(self).items() if k != "send_timeout_s"}
        bad = [k for k, v in counts.items() if not isinstance(v, int) or v < 1]
        if bad or not self.send_timeout_s > 0:
            raise SettingsError(f"Serve limits must be positive integers (send_timeout_s a positive number); check "
                             f"{', '.join(bad) or 'send_timeout_s'}.")


def _listed(values: list[int], limit: int = 8) -> str:
    """A few of ``values``: enough to name the problem, never the whole list."""
    return str(values) if len(values) <= limit else f"[{', '.join(map(str, values[:limit]))}, ...] ({len(values)} values)"


@dataclass(frozen=True)
class PrefillPlan:
    """A checked Prefill request: the padded batch (B, width), the layers, the codec and the sent mask (B, width)."""

    input_ids: Tensor
    attention_mask: Tensor
    layers: list[int]
    codec: Codec
    sent: Tensor | None


def check_texts(texts: list[str], limits: ServeLimits, what: str) -> None:
    if len(texts) > limits.max_batch:
        raise RequestError(f"{len(texts)} {what}; at most {limits.max_batch} per request")
    longest = max(map(len, texts), default=0)
    if longest > limits.max_text_chars:
        raise RequestError(f"a {what[:-1]} of {longest:,} characters; at most {limits.max_text_chars:,}",
                           grpc.StatusCode.RESOURCE_EXHAUSTED)


def check_rows(rows: list[list[int]], limits: ServeLimits, vocab: int) -> None:
    """Token rows: a bounded count, none empty, each and all together within the token limits, ids in the vocabulary."""
    if len(rows) > limits.max_batch:
        raise RequestError(f"{len(rows)} prompts; this participant takes at most {limits.max_batch} per request")
    if any(not r for r in rows):
        raise RequestError("an empty prompt")
    longest, total = max(map(len, rows)), sum(map(len, rows))
    if longest > limits.max_prompt_tokens:
        raise RequestError(f"a prompt of {longest} tokens; at most {limits.max_prompt_tokens}",
                           grpc.StatusCode.RESOURCE_EXHAUSTED)
    if total > limits.max_tokens:
        raise RequestError(f"{total} prompt tokens; at most {limits.max_tokens} per request", grpc.StatusCode.RESOURCE_EXHAUSTED)
    if any(not 0 <= t < vocab for r in rows for t in r):
        raise RequestError(f"token ids outside this tokenizer's vocabulary (0..{vocab - 1}): tokenize with the "
                           "participant's own tokenizer")


def check_prefill(request: pb.PrefillRequest, participant: Participant, limits: ServeLimits) -> PrefillPlan:
    """The Prefill ``request`` checked against ``participant`` and ``limits``, as the batch the model runs."""
    if bool(request.prompts) == bool(request.texts):
        raise RequestError("give exactly one of prompts (token ids) or texts")
    if request.texts:
        check_texts(list(request.texts), limits, "texts")
        tokenizer = participant.tokenizer
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in request.texts]
    else:
        if len(request.prompts) > limits.max_batch:
            raise RequestError(f"{len(request.prompts)} prompts; this participant takes at most {limits.max_batch} per request")
        rows = [list(p.ids) for p in request.prompts]
    identity = participant.identity
    check_rows(rows, limits, identity.vocab_size)
    longest = max(len(r) for r in rows)
    width = request.width or longest
    if width < longest:
        raise RequestError(f"width {width} is shorter than the longest prompt ({longest} tokens)")
    if width > limits.max_prompt_tokens or width * len(rows) > limits.max_tokens:
        raise RequestError(f"width {width} for {len(rows)} prompts; at most {limits.max_prompt_tokens} and "
                           f"{limits.max_tokens} padded tokens per request", grpc.StatusCode.RESOURCE_EXHAUSTED)
    if len(request.layers) > identity.num_layers:
        raise RequestError(f"{len(request.layers)} layers asked of a {identity.num_layers}-layer model")
    layers = list(request.layers) or list(range(identity.num_layers))
    if any(not 0 <= j < identity.num_layers for j in layers) or len(set(layers)) != len(layers):
        raise RequestError(f"layers {_listed(layers)} are not distinct layers of a {identity.num_layers}-layer model")
    if request.codec not in CODEC_NAMES:
        raise RequestError(f"unknown codec {request.codec[:20]!r}; use one of {list(CODEC_NAMES)}")
    group_size = request.group_size or 128
    if not 1 <= group_size <= MAX_GROUP_SIZE:
        raise RequestError(f"group_size {group_size} is not in 1..{MAX_GROUP_SIZE}")
    input_ids, attention_mask = left_pad(rows, participant.tokenizer.pad_token_id, width)  # (B, width) each
    return PrefillPlan(input_ids, attention_mask, layers, codec_by_name(request.codec, group_size),
                       sent_mask(request, attention_mask))


def sent_mask(request: pb.PrefillRequest, attention_mask: Tensor) -> Tensor | None:
    """The (B, width) mask of the transmitted columns ``request.sent`` names (None: every real one)."""
    if not request.sent:
        return None
    if len(request.sent) != attention_mask.shape[0]:
        raise RequestError(f"sent has {len(request.sent)} rows for {attention_mask.shape[0]} prompts")
    sent = torch.zeros_like(attention_mask)  # (B, width)
    for i, row in enumerate(request.sent):
        if len(row.ids) > attention_mask.shape[1]:
            raise RequestError(f"sent row {i} names {len(row.ids)} columns of a {attention_mask.shape[1]}-column batch")
        columns = list(row.ids)
        if any(not 0 <= c < attention_mask.shape[1] or not attention_mask[i, c] for c in columns):
            raise RequestError(f"sent row {i} names columns outside its prompt")
        sent[i, columns] = 1
    return sent


def check_hint(request: pb.HintRequest, participant: Participant, limits: ServeLimits) -> tuple[list[str], int, int]:
    """The Hint ``request`` checked: (prompts, max_new_tokens, batch_size)."""
    prompts = list(request.prompts)
    check_texts(prompts, limits, "prompts")
    if not 0 <= request.max_new_tokens <= limits.max_new_tokens:
        raise RequestError(f"max_new_tokens must be in 0..{limits.max_new_tokens}, got {request.max_new_tokens}")
    if not 0 <= request.batch_size <= limits.max_batch:
        raise RequestError(f"batch_size must be in 0..{limits.max_batch} (0: 16), got {request.batch_size}")
    lengths = [len(participant.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    if max(lengths, default=0) > limits.max_prompt_tokens:
        raise RequestError(f"a prompt of {max(lengths)} tokens; at most {limits.max_prompt_tokens}",
                           grpc.StatusCode.RESOURCE_EXHAUSTED)
    tokens = sum(lengths)
    if tokens > limits.max_tokens:
        raise RequestError(f"{tokens} prompt tokens; at most {limits.max_tokens} per request", grpc.StatusCode.RESOURCE_EXHAUSTED)
    return prompts, request.max_new_tokens, request.batch_size or 16


def check_rephrase(request: pb.RephraseRequest, limits: ServeLimits) -> tuple[list[str], str | None]:
    queries = list(request.queries)
    check_texts(queries, limits, "queries")
    if len(request.variant) > 200:
        raise RequestError(f"variant of {len(request.variant)} characters; at most 200")
    return queries, request.variant or None
