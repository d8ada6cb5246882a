"""FedRefine as an lm-evaluation-harness model: ``--model fedrefine --model_args config=<yaml>,route=<route>``.

Requests that share a context (the options of one question) are answered from one read of it: the senders send
once, the receiver reads its fused prompt once, and every continuation is scored over copies of that cache.
``batch_size`` counts distinct contexts per batch (``auto``: ``max_batch_size``, default 64).

Model arguments: ``config`` (a FedRefine fit/test config), ``route`` (default ``c2c``), ``prefill_answer`` (senders
read the assistant prefix; default: the config's ``evaluation.prefill_answer``), ``device``, ``precision``
(``32-true``, ``bf16-true``, ``bf16-mixed`` for receiver, senders and fusers; default: the config's
``trainer.precision``, else by the device), ``batch_size``, ``max_batch_size``; any other ``key=value`` overrides the
config's model argument of that name (a dotted key a nested one, e.g. ``gate_path=runs/x/gate``, ``registry=runs/x/registry``, ``gating=false``, ``evaluation.link.codec=int8``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from typing import Any

import lm_eval.models  # noqa: F401 - lm-eval's own models first: its registry adds them only while it is empty
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from fedrefine.harness.contexts import ChatContexts, FormatError, adds_special_tokens, split_trailing_space
from fedrefine.harness.loading import config_precision, load_module
from fedrefine.harness.routes import Alone, Read, build_route
from fedrefine.participants.precision import precision_context
from fedrefine.tasks.scoring import token_log_probs

#: Contexts per batch for ``batch_size=auto`` without ``max_batch_size``.
AUTO_BATCH = 64


def batch_size_of(batch_size: int | str, max_batch_size: int | None) -> int:
    """lm-eval's ``batch_size`` (a number, or ``auto`` / ``auto:N``) as contexts per batch."""
    text = str(batch_size)
    size = (max_batch_size or AUTO_BATCH) if text.startswith("auto") else int(text)
    if size < 1:
        raise ValueError(f"batch_size must be a positive number or 'auto', got {batch_size!r}.")
    return min(size, max_batch_size) if max_batch_size else size


def device_of(device: str | None) -> torch.device:
    """lm-eval's ``device`` (it passes ``cuda`` when none was asked for): the CPU where CUDA is not available."""
    wanted = torch.device(device or "cpu")
    return torch.device("cpu") if wanted.type == "cuda" and not torch.cuda.is_available() else wanted


def under_precision(method: Callable) -> Callable:
    """Run a request method under the adapter's precision (autocast for ``-mixed``)."""

    @functools.wraps(method)
    def run(self: FedRefineLM, *args: Any, **kwargs: Any) -> Any:
        with precision_context(self.precision, self.device):
            return method(self, *args, **kwargs)

    return run


@register_model("fedrefine")
class FedRefineLM(LM):
    """Any FedRefine route answering lm-eval's ``loglikelihood``, ``loglikelihood_rolling`` and ``generate_until``
    (see the module docstring for the model arguments)."""

    def __init__(
        self,
        config: str,
        route: str = "c2c",
        batch_size: int | str = 16,
        max_batch_size: int | None = None,
        device: str | None = None,
        prefill_answer: bool | None = None,
        precision: str | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        self._device = device_of(device)
        self.precision = config_precision(config, precision, self.device)
        self.module = load_module(config, overrides, self.precision).to(self.device)
        self.fused = self.module.fused
        self.route, self.answering = build_route(str(route), self.fused, self.module.evaluation, prefill_answer)
        self.batch_size = batch_size_of(batch_size, max_batch_size)
        self.contexts = ChatContexts(self.fused.receiver)

    # --- chat prompts -----------------------------------------------------------------------------
    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """lm-eval's conversation (system instruction, few-shot turns, question, ``gen_prefix`` as an assistant
        prefill) in the receiver's chat template, remembered so that senders can render it in theirs."""
        return self.contexts.render(chat_history, add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return f"fedrefine-{self.fused.receiver.name}-{self.route.label}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.fused.receiver.tokenizer, "chat_template", None)

    # --- loglikelihood ----------------------------------------------------------------------------
    @under_precision
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Each (context, continuation)'s summed log-probability and whether it is the greedy continuation; the
        requests of one context are scored from one read of it."""
        pairs = [tuple(request.args) for request in requests]
        by_context: dict[str, list[int]] = {}
        for index, (context, _) in enumerate(pairs):
            by_context.setdefault(context, []).append(index)
        contexts = sorted(by_context, key=len, reverse=True)  # similar lengths pad together
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        with tqdm(total=len(pairs), desc=f"fedrefine {self.route.label} loglikelihood", disable=disable_tqdm) as bar:
            for start in range(0, len(contexts), self.batch_size):
                chunk = contexts[start : start + self.batch_size]
                read = self.answering.read([self.contexts.context(text) for text in chunk])
                rows, continuations, indices = [], [], []
                for row, text in enumerate(chunk):
                    for index in by_context[text]:
                        rows.append(row)
                        continuations.append(self.continuation_ids(read, row, text, pairs[index][1]))
                        indices.append(index)
                for index, result in zip(indices, self.score(read, rows, continuations)):
                    results[index] = result
                    self.cache_hook.add_partial("loglikelihood", pairs[index], result)
                bar.update(len(indices))
        return results

    def continuation_ids(self, read: Read, row: int, context: str, continuation: str) -> list[int]:
        """The continuation's tokens after the prompt ``read`` holds for ``row``, split as lm-eval's ``hf`` model
        splits them: the prompt text plus the context's trailing whitespace plus the continuation, tokenized whole,
        after the prompt's own tokens."""
        prompt, tokenizer = read.prompts[row], self.answering.answering.tokenizer
        text = prompt.text + split_trailing_space(context)[1] + continuation
        if not prompt.text:  # an empty context: lm-eval conditions on the prefix token alone
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        special = not self.contexts.context(context).chat and adds_special_tokens(self.answering.answering, context)
        ids = tokenizer(text, add_special_tokens=special)["input_ids"][len(prompt.input_ids) :]
        if not ids:
            raise FormatError(f"The continuation {continuation!r} adds no token after its context; lm-eval scores none.")
        return ids

    def score(self, read: Read, rows: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[tuple[float, bool]]:
        """(summed log-probability, greedy) of each continuation of row ``rows[i]``: one-token continuations from the
        read's last logits, longer ones in one forward over copies of their prompts' cache rows."""
        first = read.state.last_logits.float().log_softmax(-1)  # (B, V)
        pad = self.answering.answering.tokenizer.pad_token_id
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        singles = [i for i, c in enumerate(continuations) if len(c) == 1]
        for group in (singles, [i for i, c in enumerate(continuations) if len(c) > 1]):
            if not group:
                continue
            prompts = torch.tensor([rows[i] for i in group])
            log_probs, greedy, mask = token_log_probs(read.model, read.state, first, prompts, [continuations[i] for i in group], pad)
            totals = (log_probs * mask).sum(1).tolist()
            all_greedy = (greedy | ~mask.bool()).all(1).tolist()
            for i, total, best in zip(group, totals, all_greedy):
                out[i] = (float(total), bool(best))
        return out

    @under_precision
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood in disjoint windows of the model's context (perplexity tasks), as lm-eval's
        ``hf`` model computes it; a participant alone only (a whole text has no prompt to fuse or hint)."""
        if not isinstance(self.answering, Alone):
            raise FormatError(
                f"Route {self.route.label!r} fuses or hints a prompt, but loglikelihood_rolling (perplexity tasks) scores "
                f"a whole text with no prompt: use route=receiver or route=sender:<name>."
            )
        participant = self.answering.answering
        tokenizer, model = participant.tokenizer, participant.model
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        max_length = int(getattr(model.config, "max_position_embeddings", 2048))
        results = []
        for request in tqdm(requests, desc=f"fedrefine {self.route.label} loglikelihood_rolling", disable=disable_tqdm):
            ids = tokenizer(request.args[0], add_special_tokens=False)["input_ids"]
            total = 0.0
            for window in map(make_disjoint_window, get_rolling_token_windows(ids, prefix, max_length, 1)):
                context, continuation = window
                whole = torch.tensor([(context + continuation)[-(max_length + 1) :][:-1]], device=participant.device)
                with torch.no_grad():
                    logits = model(input_ids=whole).logits[0, -len(continuation) :].float().log_softmax(-1)  # (R, V)
                target = torch.tensor(continuation, device=logits.device)
                total += float(logits.gather(1, target[:, None]).sum())
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", tuple(request.args), total)
        return results

    # --- generation -------------------------------------------------------------------------------
    @under_precision
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy answers up to the first of the request's ``until`` strings (or ``max_gen_toks`` tokens, or the end of
        the answering model's turn); the same context and settings are answered once."""
        keyed: dict[tuple[str, str], list[int]] = {}
        for index, request in enumerate(requests):
            context, settings = request.args
            keyed.setdefault((context, json.dumps(settings, sort_keys=True, default=str)), []).append(index)
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[str]] = {}
        for context, settings in keyed:
            groups.setdefault(settings, []).append(context)
        with tqdm(total=len(requests), desc=f"fedrefine {self.route.label} generate_until", disable=disable_tqdm) as bar:
            for settings, contexts in groups.items():
                until, budget = self.generation_settings(json.loads(settings))
                for start in range(0, len(contexts), self.batch_size):
                    chunk = contexts[start : start + self.batch_size]
                    generated = self.answering.generate([self.contexts.context(text) for text in chunk], budget)
                    for text, ids in zip(chunk, generated):
                        answer = cut_at(self.answering.answering.tokenizer.decode(ids, skip_special_tokens=True), until)
                        for index in keyed[(text, settings)]:
                            results[index] = answer
                            self.cache_hook.add_partial("generate_until", tuple(requests[index].args), answer)
                        bar.update(len(keyed[(text, settings)]))
        return results

    @staticmethod
    def generation_settings(settings: dict[str, Any]) -> tuple[list[str], int]:
        """``until`` strings and the token budget of a request's ``gen_kwargs``; sampling is refused."""
        if settings.get("do_sample") or float(settings.get("temperature", 0.0) or 0.0) > 0.0:
            raise FormatError("FedRefine routes answer greedily: set do_sample=false and temperature=0 in the task's "
                              "generation_kwargs (or --gen_kwargs).")
        until = settings.get("until") or []
        return ([until] if isinstance(until, str) else list(until)), int(settings.get("max_gen_toks", 256))


def cut_at(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any ``until`` string."""
    for stop in until:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text
