"""Rephrasing queries: the rephraser (the receiver by default), reproducible seeds, and a disk cache of rephrasings."""

from __future__ import annotations

import hashlib
import json
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrefine.field_help import documented
from fedrefine.generation import generate_replies
from fedrefine.participants import Participant

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

    def __post_init__(self) -> None:
        if "{query}" not in self.template:
            raise ValueError(f"Rephrasing template must contain '{{query}}'; got {self.template!r}.")


@dataclass(frozen=True)
class Rephrasing:
    """One rephrased query: the source text, the rephrasing, and how it was made.

    ``seconds`` is the generation time measured when it was made (its share of the batch),
    also for a rephrasing later read back from the cache (``cached=True``).
    """

    query: str
    text: str
    variant: str | None
    seed: int | None
    num_tokens: int
    seconds: float
    cached: bool = False


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
            for query, reply in zip(missing, replies):
                key = self.cache_key(query, seed)
                fresh.add(key)
                self.cache.put(
                    {
                        "key": key,
                        "model": self.participant.identity.key,
                        "template": config.template,
                        "query": query,
                        "seed": seed,
                        "variant": variant,
                        "text": reply.text.strip(),
                        "num_tokens": len(reply.token_ids),
                        "seconds": reply.seconds,
                    }
                )
        results = []
        for query, key in zip(queries, keys):
            record = self.cache.get(key)
            results.append(
                Rephrasing(
                    query, record["text"], variant, seed, record["num_tokens"], record["seconds"], key not in fresh
                )
            )
        return results
