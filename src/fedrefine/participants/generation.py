"""Greedy, seeded or beam-search generation of chat replies with a participant's own template (batched, left-padded)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedrefine.participants.chat import encode_chat
from fedrefine.participants.padding import left_pad
from fedrefine.participants.participant import Participant
from fedrefine.timing import stopwatch


@dataclass(frozen=True)
class Reply:
    """One generated reply: its text (decoded without special tokens, not stripped), ids up to end-of-turn, seconds."""

    text: str
    token_ids: tuple[int, ...]
    seconds: float


def trim_at_eos(token_ids: list[int], eos_token_id: int) -> list[int]:
    """Generated ids up to (not including) the first end-of-turn token."""
    return token_ids[: token_ids.index(eos_token_id)] if eos_token_id in token_ids else token_ids


@torch.no_grad()
def _generate_batch(
    participant: Participant, prompts: Sequence[str], max_new_tokens: int, sampling: dict
) -> tuple[list[list[int]], float]:
    tokenizer = participant.tokenizer
    rows = [encode_chat(participant, [{"role": "user", "content": p}]).input_ids for p in prompts]
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    ids, mask = ids.to(participant.device), mask.to(participant.device)
    with stopwatch(participant.device) as elapsed:
        output = participant.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=participant.end_of_turn_token_id,
            **sampling,
        )
    eos = participant.end_of_turn_token_id
    return [trim_at_eos(row[ids.shape[1] :].tolist(), eos) for row in output], elapsed.seconds


def generate_replies(
    participant: Participant,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seeds: Sequence[int] | None = None,
) -> list[Reply]:
    """The participant's reply to each prompt (one user message each), with its own chat template.

    Greedy decoding runs batched with left padding (positions follow the attention mask). With
    ``do_sample=True`` every prompt is sampled alone under its own seed from ``seeds``, so a
    reply depends only on (prompt, seed), never on the rest of the batch. ``seconds`` is each
    prompt's share of its batch's wall time.
    """
    if do_sample and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError("Sampling needs one seed per prompt (`seeds`), so that replies are reproducible.")
    if max_new_tokens == 0 or not prompts:
        return [Reply("", (), 0.0) for _ in prompts]
    tokenizer = participant.tokenizer
    token_ids: list[list[int]] = []
    seconds: list[float] = []
    if do_sample:
        device = participant.device
        for prompt, seed in zip(prompts, seeds):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
                rows, spent = _generate_batch(participant, [prompt], max_new_tokens, sampling)
            token_ids.extend(rows)
            seconds.append(spent)
    else:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            rows, spent = _generate_batch(participant, chunk, max_new_tokens, {"do_sample": False})
            token_ids.extend(rows)
            seconds.extend([spent / len(chunk)] * len(chunk))
    return [
        Reply(tokenizer.decode(ids, skip_special_tokens=True), tuple(ids), spent)
        for ids, spent in zip(token_ids, seconds)
    ]


def generate_candidates(
    participant: Participant, prompts: Sequence[str], num_candidates: int, max_new_tokens: int = 64, batch_size: int = 16
) -> list[list[Reply]]:
    """``num_candidates`` replies per prompt from beam search with as many beams, best-scoring first.

    Batched like greedy decoding; ``seconds`` is each prompt's share of its batch's wall time (every
    candidate of a prompt carries that share).
    """
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be at least 1, got {num_candidates}.")
    if max_new_tokens == 0 or not prompts:
        return [[Reply("", (), 0.0)] * num_candidates for _ in prompts]
    tokenizer = participant.tokenizer
    beams = {"do_sample": False, "num_beams": num_candidates, "num_return_sequences": num_candidates}
    candidates: list[list[Reply]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        rows, spent = _generate_batch(participant, chunk, max_new_tokens, beams)  # prompt-major: K rows per prompt
        share = spent / len(chunk)
        for index in range(len(chunk)):
            group = rows[index * num_candidates : (index + 1) * num_candidates]
            candidates.append([Reply(tokenizer.decode(ids, skip_special_tokens=True), tuple(ids), share) for ids in group])
    return candidates
