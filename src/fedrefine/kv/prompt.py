"""A prompt read once, continued many ways: the state a model is in after its prompt, and continuations of that
state run side by side over copies of its cache.

    read the prompt once                          -> PromptState: cache, mask (B, P + N), last logits (B, V)
    copy each continuation's prompt row           -> C rows (a row per continuation that needs a forward)
    run every continuation in one forward         -> logits (C, R, V)

Cloze scoring reads a question's prompt (a fused one included) once and scores all its options
from that state, instead of reading the prompt again for each option.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Cache

from fedrefine.kv.cache import positions_from_mask, returned_cache, select_rows, with_cache


@dataclass(frozen=True)
class PromptState:
    """What a model holds after reading a left-padded batch of prompts.

    ``cache`` holds every entry read (for a fused receiver: any entries placed ahead of the prompt, then the
    prompt); ``attention_mask`` (B, P + N) covers those entries; ``last_logits`` (B, V) are the next-token
    logits after the last prompt token.
    """

    cache: Cache
    attention_mask: Tensor
    last_logits: Tensor

    def __len__(self) -> int:
        return self.attention_mask.shape[0]


@torch.no_grad()
def read_prompt(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> PromptState:
    """A model's state after its left-padded prompts ``input_ids``/``attention_mask`` (B, N), in one forward."""
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask),
        use_cache=True,
        logits_to_keep=1,  # only the last token's logits are read; the cache is what is kept
    )
    return PromptState(returned_cache(output), attention_mask, output.logits[:, -1])


def run_over(
    model: nn.Module,
    cache: Cache,
    cached_mask: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    use_cache: bool,
    logits_to_keep: int,
) -> tuple[Any, Tensor]:
    """One forward of new tokens ``input_ids``/``attention_mask`` (B, T) over ``cache``, which holds entries under
    ``cached_mask`` (B, C): positions continue from the real entries. Returns the model's output and the mask over
    the cache and the new tokens (B, C + T). The cache takes the new tokens' K/V."""
    attention = torch.cat((cached_mask, attention_mask.to(cached_mask.dtype)), dim=1)  # (B, C + T)
    output = model(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=positions_from_mask(attention)[:, cached_mask.shape[1] :],
        **with_cache(model, cache),
        use_cache=use_cache,
        logits_to_keep=logits_to_keep,
    )
    return output, attention


@torch.no_grad()
def continuation_logits(
    model: nn.Module, state: PromptState, prompts: Tensor, input_ids: Tensor, attention_mask: Tensor
) -> Tensor:
    """Logits (C, R, V) of right-padded continuations ``input_ids``/``attention_mask`` (C, R), continuation ``c``
    continuing prompt ``prompts[c]`` of ``state``, all in one forward over copies of those prompts' cache rows
    (the state itself is left as it is)."""
    cached = state.attention_mask.index_select(0, prompts)  # (C, P + N)
    cache = select_rows(state.cache, prompts)
    output, _ = run_over(model, cache, cached, input_ids, attention_mask, use_cache=False, logits_to_keep=input_ids.shape[1])
    return output.logits
