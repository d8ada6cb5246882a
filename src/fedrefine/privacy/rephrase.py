"""Rephrasing queries: the rephraser (the receiver by default), reproducible seeds, a faithfulness check with
beam-search retries, and a disk cache of rephrasings."""

from __future__ import annotations

import hashlib
import json
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrefine.participants import Participant
from fedrefine.participants.generation import Reply, generate_candidates, generate_replies
from fedrefine.privacy.faithfulness import FAITHFULNESS_CHECKS, FaithfulnessCheck, is_faithful
from fedrefine.settings import documented

DEFAULT_REPHRASE_TEMPLATE = (
    "Rephrase the following question in different words. Keep everything needed to answer it, "
    "and reply with the rephrased question only.\n\n{query}"
)


@documented
@dataclass(frozen=True)
class RephraseConfig:
    """How the rephraser rewrites a query ."""

    template: str = field(
        default=DEFAULT_REPHRASE_TEMPLATE,
        metadata={"help": "The rephraser's user message; {query} is replaced by the user's text."},
    )
    max_new_tokens: int = field(default=96, metadata={"help": "Longest rephrasing, in tokens."})
    do_sample: bool = field(
        default=False, metadata={"help": "Sample (reproducibly, one seed per query and variant) instead of greedy."}
    )
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (do_sample only)."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling threshold (do_sample only)."})
    seed: int = field(
        default=0, metadata={"help": "Base seed; a variant's seed is derived from it and the variant's name."}
    )
    batch_size: int = field(default=16, metadata={"help": "Queries per batched greedy generate call."})
    check: FaithfulnessCheck = field(
        default="names",
        metadata={"help": "Faithfulness check of every rephrasing: names (each name it writes must occur in the query, "
                          "see fedrefine.privacy.faithfulness) or off."},
    )
    candidates: int = field(
        default=8,
        metadata={"help": "A rephrasing that fails the check is written again as this many candidates (beam search with "
                          "as many beams; with do_sample, samples under seeds derived from the query's), and the first "
                          "that passes is kept; when none passes, the first rephrasing is kept, marked unfaithful. "
                          "1: no retry."},
    )

    def __post_init__(self) -> None:
        if "{query}" not in self.template:
            raise ValueError(f"Rephrasing template must contain '{{query}}'; got {self.template!r}.")
        if self.check not in FAITHFULNESS_CHECKS:
            raise ValueError(f"rephrase.check must be one of {FAITHFULNESS_CHECKS}, got {self.check!r}.")
        if self.candidates < 1:
            raise ValueError(f"rephrase.candidates must be at least 1 (1: no retry), got {self.candidates}.")


@dataclass(frozen=True)
class Rephrasing:
    """One rephrased query: the source text, the rephrasing, and how it was made.

    ``seconds`` is the generation time measured when it was made (its share of the batch, retries
    included), also for a rephrasing later read back from the cache (``cached=True``). ``faithful``:
    whether it passed the config's check (see :mod:`fedrefine.privacy.faithfulness`); ``candidate``:
    0 for the first rephrasing, k for the k-th beam-search candidate of a retry.
    """

    query: str
    text: str
    variant: str | None
    seed: int | None
    num_tokens: int
    seconds: float
    cached: bool = False
    faithful: bool = True
    candidate: int = 0


def variant_seed(seed: int, variant: str | None) -> int:
    """Seed of one variant: ``seed`` itself for None, else mixed with a stable hash of the variant's name."""
    return seed if variant is None else (seed + zlib.crc32(variant.encode("utf-8"))) % 2**31


class RephrasingCache:
    """Rephrasings on disk as JSON lines (``rephrasings.jsonl`` under ``cache_dir``), one record per key.

    A record holds the key, the rephraser's identity key, the template, the query, seed, variant
    and the rephrasing. The key is the SHA-256 of the generation's full description
    (see :meth:`Rephraser.cache_key`). Without ``cache_dir`` the cache lives in memory only.
    """

    FILENAME = "rephrasings.jsonl"

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.path = None if cache_dir is None else Path(cache_dir) / self.FILENAME
        self.records: dict[str, dict[str, Any]] = {}
        if self.path is not None and self.path.exists():
            self.read()

    def read(self) -> None:
        """Load the records; a torn last line (a run killed mid-write) is dropped and cut from the file, so that
        later appends start on a fresh line. Damage anywhere else is an error naming the file and line."""
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                self.records[record["key"]] = record
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                if any(rest.strip() for rest in lines[number:]):
                    raise ValueError(
                        f"{self.path} line {number} is not a rephrasing record ({err}); delete that line or the file "
                        f"(it is a cache: rephrasings are regenerated)."
                    ) from None
                warnings.warn(f"{self.path}: dropped a torn last line {number} (an interrupted write).", stacklevel=3)
                kept = "".join(f"{text}\n" for text in lines[: number - 1])
                temporary = self.path.with_suffix(".jsonl.tmp")
                temporary.write_text(kept, encoding="utf-8")
                temporary.replace(self.path)

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def put(self, record: dict[str, Any]) -> None:
        self.records[record["key"]] = record
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")


class Rephraser:
    """A participant (the receiver by default) that rewrites queries, with a cache of its rephrasings."""

    def __init__(
        self, participant: Participant, config: RephraseConfig | None = None, cache_dir: str | Path | None = None
    ) -> None:
        self.participant = participant
        self.config = config or RephraseConfig()
        self.cache = RephrasingCache(cache_dir)

    def cache_key(self, query: str, seed: int | None) -> str:
        """Key of one rephrasing: model identity, template, query, decoding settings and seed (sampling only)."""
        config = self.config
        description = {
            "model": self.participant.identity.key,
            "template": config.template,
            "query": query,
            "max_new_tokens": config.max_new_tokens,
            "check": {"check": config.check, "candidates": config.candidates},
            "decoding": (
                {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p, "seed": seed}
                if config.do_sample
                else {"do_sample": False}
            ),
        }
        return hashlib.sha256(json.dumps(description, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def rephrase(self, queries: Sequence[str], variant: str | None = None) -> list[Rephrasing]:
        """One rephrasing per query for ``variant`` (e.g. a participant's name), from the cache when there.

        With greedy decoding the variant does not change the text (every variant shares one
        cached rephrasing); with sampling each variant has its own seed (:func:`variant_seed`).
        """
        config = self.config
        seed = variant_seed(config.seed, variant) if config.do_sample else None
        keys = [self.cache_key(q, seed) for q in queries]
        missing = list(dict.fromkeys(q for q, k in zip(queries, keys) if self.cache.get(k) is None))
        fresh = set()
        if missing:
            replies = generate_replies(
                self.participant,
                [config.template.format(query=q) for q in missing],
                max_new_tokens=config.max_new_tokens,
                batch_size=config.batch_size,
                do_sample=config.do_sample,
                temperature=config.temperature,
                top_p=config.top_p,
                seeds=[seed] * len(missing) if config.do_sample else None,
            )
            chosen = self._checked(missing, replies, seed)
            for query, (reply, candidate, seconds) in zip(missing, chosen):
                key = self.cache_key(query, seed)
                fresh.add(key)
                text = reply.text.strip()
                self.cache.put(
                    {
                        "key": key,
                        "model": self.participant.identity.key,
                        "template": config.template,
                        "query": query,
                        "seed": seed,
                        "variant": variant,
                        "text": text,
                        "num_tokens": len(reply.token_ids),
                        "seconds": seconds,
                        "faithful": is_faithful(config.check, query, text),
                        "candidate": candidate,
                    }
                )
        results = []
        for query, key in zip(queries, keys):
            record = self.cache.get(key)
            results.append(
                Rephrasing(
                    query, record["text"], variant, seed, record["num_tokens"], record["seconds"], key not in fresh,
                    record["faithful"] and bool(record["text"].strip()), record["candidate"],  # cached before blanks counted
                )
            )
        return results

    def _checked(self, queries: list[str], replies: list[Reply], seed: int | None) -> list[tuple[Reply, int, float]]:
        """Per query, the reply kept, its candidate index and the seconds spent on it: the first reply when it passes
        the check (or retries are off), else the first retry candidate that passes, else the first reply."""
        config = self.config
        kept = [(reply, 0, reply.seconds) for reply in replies]
        failing = [i for i, (q, r) in enumerate(zip(queries, replies)) if not is_faithful(config.check, q, r.text.strip())]
        if not failing or config.candidates == 1:
            return kept
        for index, (candidates, seconds) in zip(failing, self._retries([queries[i] for i in failing], seed)):
            reply, candidate, spent = kept[index]
            passing = [k for k, c in enumerate(candidates, start=1) if is_faithful(config.check, queries[index], c.text.strip())]
            if passing:
                candidate, reply = passing[0], candidates[passing[0] - 1]
            kept[index] = (reply, candidate, spent + seconds)
        return kept

    def _retries(self, queries: list[str], seed: int | None) -> list[tuple[list[Reply], float]]:
        """``candidates`` replies per query and the seconds they took: beam search for greedy decoding (best score
        first); with sampling, samples under seeds derived from the query's, so that each variant keeps its own."""
        config = self.config
        prompts = [config.template.format(query=q) for q in queries]
        if not config.do_sample:
            found = generate_candidates(
                self.participant, prompts, config.candidates, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size
            )
            return [(candidates, candidates[0].seconds) for candidates in found]
        seeds = [variant_seed(seed, f"retry-{k}") for k in range(1, config.candidates + 1)]
        retries = []
        for prompt in prompts:
            samples = generate_replies(
                self.participant, [prompt] * len(seeds), max_new_tokens=config.max_new_tokens, do_sample=True,
                temperature=config.temperature, top_p=config.top_p, seeds=seeds,
            )
            retries.append((samples, sum(sample.seconds for sample in samples)))
        return retries
