"""Pretrain tiny participants of the toy world from random init, cached on disk by a content key.

Each participant knows the public entities and its own private groups. It is trained on
exactly what evaluation reads: statements of its facts, and multiple-choice questions
rendered with its own chat template (user message :func:`question_text`, generation prompt,
:func:`correct_answer` + end of turn). Training is staged: statements first (the facts), then
question-heavy (the multiple-choice skill, which appears abruptly). The loss ignores entity-name
tokens where they are unpredictable and weights what a reply must get right (see
:mod:`fedrefine.toyworld.corpus`). Each batch runs sorted by length in a few chunks, so that short
statements are not padded to the longest question.

The result lives in ``<cache>/<key>/<participant>/`` (``save_pretrained`` model + tokenizer),
where ``<cache>`` is ``$FEDREFINE_CACHE/toyworld`` or ``~/.cache/fedrefine/toyworld`` and the
key hashes the world and every config, so participants are rebuilt only when something changes.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fedrefine.kv.cache import positions_from_mask
from fedrefine.participants import (
    Participant,
    TinySpec,
    build_tiny_participant,
    freeze,
    load_participant,
)
from fedrefine.participants.padding import left_pad
from fedrefine.participants.tokenizers import build_tokenizer
from fedrefine.toyworld.corpus import IGNORE, SKILLS, ParticipantCorpus, TrainingText, build_corpus, tokenizer_corpus
from fedrefine.toyworld.world import ToyWorld, WorldConfig

FORMAT_VERSION = 3  # 3: a hint's entity name is weighted like its value; batches run in length buckets
METADATA_FILE = "toyworld.json"


@dataclass(frozen=True)
class ToyParticipantConfig:
    """A tiny participant of the toy world: its shape/tokenizer, the private groups it knows, and the skills
    it is taught beyond answering (see :mod:`fedrefine.toyworld.corpus`)."""

    spec: TinySpec
    private_groups: tuple[int, ...] = ()
    skills: tuple[str, ...] = ()
    question_steps: int | None = None  # this participant's question-stage steps (None: the recipe's)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.skills) - set(SKILLS))
        if unknown:
            raise ValueError(f"{self.spec.name}: unknown skill(s) {unknown}; choose from {list(SKILLS)}.")
        object.__setattr__(self, "skills", tuple(self.skills))

    @property
    def name(self) -> str:
        return self.spec.name

    def recipe(self, pretrain_config: PretrainConfig) -> PretrainConfig:
        """The shared recipe with this participant's own question steps, if it sets them."""
        if self.question_steps is None:
            return pretrain_config
        return replace(pretrain_config, question_steps=self.question_steps)

    def to_dict(self) -> dict[str, Any]:
        return {"spec": asdict(self.spec), "private_groups": list(self.private_groups), "skills": list(self.skills),
                "question_steps": self.question_steps}


@dataclass(frozen=True)
class PretrainConfig:
    """Optimisation recipe shared by every toy participant (a participant may set its own question steps).

    Facts are stated for ``statement_steps``, then batches mix questions, the participant's skills and
    statements (the ``*_fraction`` fields) for ``question_steps``. On one CPU core, a sender's 2,100-3,300
    steps take 4-9 minutes and the receiver's 4,500 about 15.
    """

    statement_steps: int = 300
    question_steps: int = 2100
    batch_size: int = 64
    length_buckets: int = 3  # each batch runs sorted by length in this many chunks (less padding)
    question_fraction: float = 0.4
    # Shares of each batch after the statement stage, for participants with the skill (statements fill the rest).
    write_hints_fraction: float = 0.45  # a hint restates a fact, so it also keeps the facts in memory
    read_hints_fraction: float = 0.2
    rephrase_fraction: float = 0.35
    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    prompt_weight: float = 0.0  # loss weight of user-turn tokens (the random options are noise)
    answer_weight: float = 5.0
    seed: int = 0

    @property
    def total_steps(self) -> int:
        return self.statement_steps + self.question_steps


#: The receiver (Qwen3-class, public entities only; reads hints, rephrases) and four senders of other
#: classes, depths, head layouts and tokenizers, each knowing one private group and writing hints about it.
DEFAULT_PARTICIPANTS: tuple[ToyParticipantConfig, ...] = (
    ToyParticipantConfig(
        TinySpec("receiver", "qwen3", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                 intermediate_size=192, tokenizer_kind="syllable", chat_style="chatml", vocab_size=1024, seed=0),
        skills=("read_hints", "rephrase"), question_steps=4200,  # copying unseen names takes longest
    ),
    ToyParticipantConfig(
        TinySpec("llama-sender", "llama", num_layers=3, hidden_size=96, num_heads=6, num_kv_heads=3, head_dim=16,
                 intermediate_size=256, rope_theta=500000.0, tokenizer_kind="word", chat_style="llama3",
                 vocab_size=2048, seed=1),
        private_groups=(0,), skills=("write_hints",), question_steps=1800,
    ),
    ToyParticipantConfig(  # 4 K/V heads: with 2 its K/V (16 wide a layer) was the narrowest, and transferred least
        TinySpec("qwen2-sender", "qwen2", num_layers=5, hidden_size=64, num_heads=8, num_kv_heads=4, head_dim=8,
                 intermediate_size=160, tokenizer_kind="word", chat_style="chatml", vocab_size=2048, seed=2),
        private_groups=(1,), skills=("write_hints",),
    ),
    ToyParticipantConfig(  # shallow and wide
        TinySpec("qwen3-sender", "qwen3", num_layers=2, hidden_size=128, num_heads=8, num_kv_heads=4, head_dim=16,
                 intermediate_size=256, rope_theta=1000000.0, tokenizer_kind="word", chat_style="chatml",
                 vocab_size=2048, seed=3),
        private_groups=(2,), skills=("write_hints",), question_steps=1800,
    ),
    ToyParticipantConfig(  # deep and narrow, every head its own K/V
        TinySpec("deep-llama-sender", "llama", num_layers=6, hidden_size=64, num_heads=4, num_kv_heads=4,
                 head_dim=16, intermediate_size=128, tokenizer_kind="word", chat_style="llama3", vocab_size=2048,
                 seed=4),
        private_groups=(3,), skills=("write_hints",), question_steps=3000,  # deep and narrow learns slowest
    ),
)


# --- cache location and key -------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$FEDREFINE_CACHE/toyworld`` if set, else ``~/.cache/fedrefine/toyworld``."""
    root = os.environ.get("FEDREFINE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "fedrefine") / "toyworld"


def shipped_dir() -> Path:
    """Where the package ships pretrained toy worlds (made by ``benchmarks/toyworld_pretrain.py --ship``)."""
    return Path(__file__).parent / "pretrained"


def toyworld_key(
    world: ToyWorld, participants: Sequence[ToyParticipantConfig], pretrain: PretrainConfig
) -> str:
    """Content key of a pretrained toy world: the world, every participant config and the recipe."""
    payload = json.dumps(
        {
            "format": FORMAT_VERSION,
            "world": world.fingerprint,
            "participants": [p.to_dict() for p in participants],
            "pretrain": asdict(pretrain),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --- data ---------------------------------------------------------------------------------------
def toy_tokenizer(config: ToyParticipantConfig, world: ToyWorld):
    """The participant's own tokenizer, trained on its own texts plus the register of all names.

    Every participant can read every name; only its facts are private.
    """
    texts = tokenizer_corpus(world, config.private_groups, config.skills)
    return build_tokenizer(config.spec.tokenizer_kind, config.spec.chat_style, corpus=texts, vocab_size=config.spec.vocab_size)


# --- training -----------------------------------------------------------------------------------
def _learning_rate(step: int, config: PretrainConfig) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.total_steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.learning_rate * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def batch_loss(
    participant: Participant, texts: Sequence[TrainingText], weights: torch.Tensor, length_buckets: int = 1
) -> torch.Tensor:
    """Weighted next-token loss of a batch; ``weights[kind]`` is each token kind's weight.

    The batch is sorted by length and run in ``length_buckets`` chunks, each padded to its own longest
    text (a 10-token statement padded to a 70-token question costs as much as the question); the loss is
    the same as one padded batch's, up to float rounding.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i].input_ids))
    size = math.ceil(len(order) / max(1, length_buckets))
    sums, totals = zip(*(
        _weighted_losses(participant, [texts[i] for i in order[start : start + size]], weights)
        for start in range(0, len(order), size)
    ))
    return torch.stack(sums).sum() / torch.stack(totals).sum().clamp(min=1e-8)


def _weighted_losses(
    participant: Participant, texts: Sequence[TrainingText], weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of weighted next-token losses of one padded chunk, and the sum of its weights."""
    ids, mask = left_pad([t.input_ids for t in texts], participant.tokenizer.pad_token_id)
    kinds, _ = left_pad([t.kinds for t in texts], IGNORE)
    ids, mask, kinds = ids.to(participant.device), mask.to(participant.device), kinds.to(participant.device)
    model = participant.model
    hidden = model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).last_hidden_state
    token_weights = weights.to(hidden.device)[kinds[:, 1:]].flatten()  # (B * (N - 1),)
    scored = token_weights.nonzero().squeeze(1)  # only targets that count need logits (most are prompt tokens)
    logits = model.get_output_embeddings()(hidden[:, :-1].flatten(0, 1)[scored])  # (T, V)
    losses = F.cross_entropy(logits.float(), ids[:, 1:].flatten()[scored], reduction="none")
    return (losses * token_weights[scored]).sum(), token_weights.sum()


def stage_mixture(corpus: ParticipantCorpus, config: PretrainConfig) -> list[tuple[list[TrainingText], int]]:
    """How the question stage fills a batch: ``(texts, count)`` for questions, each skill, and statements
    (the rest)."""
    mixture = [(corpus.questions, round(config.question_fraction * config.batch_size))]
    fractions = {skill: getattr(config, f"{skill}_fraction") for skill in corpus.skills}
    mixture += [(corpus.skills[skill], round(fraction * config.batch_size)) for skill, fraction in sorted(fractions.items())]
    rest = config.batch_size - sum(count for _, count in mixture)
    if rest < 0:
        raise ValueError(
            f"question_fraction {config.question_fraction} and the skills' fractions {fractions} fill more than a "
            f"batch; lower them."
        )
    return [(texts, count) for texts, count in [*mixture, (corpus.statements, rest)] if count and texts]


def pretrain(
    participant: Participant,
    corpus: ParticipantCorpus,
    config: PretrainConfig,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train the participant's model in place (staged recipe); returns the loss of every step.

    ``on_step(step, loss)`` is called after every step (e.g. to evaluate now and then). The
    model is left frozen again (eval mode, no gradients) afterwards.
    """
    model = participant.model
    model.train()
    model.requires_grad_(True)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, betas=(0.9, 0.98), weight_decay=config.weight_decay
    )
    weights = torch.tensor([0.0, config.prompt_weight, 1.0, config.answer_weight])
    generator = torch.Generator().manual_seed(config.seed)
    mixture = stage_mixture(corpus, config)
    losses: list[float] = []
    bar = tqdm(range(config.total_steps), desc=f"pretrain {participant.name}", disable=not progress, leave=False)
    for step in bar:
        in_question_stage = step >= config.statement_steps
        picks = []
        for texts, count in mixture if in_question_stage else [(corpus.statements, config.batch_size)]:
            picks += [texts[i] for i in torch.randint(len(texts), (count,), generator=generator).tolist()]
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, config)
        loss = batch_loss(participant, picks, weights, config.length_buckets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
            model.train()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", stage="questions" if in_question_stage else "statements")
    freeze(model)
    return losses


# --- build or load ------------------------------------------------------------------------------
def _participant_identity_name(name: str) -> str:
    return f"toyworld/{name}"


def build_toy_participant(
    config: ToyParticipantConfig, world: ToyWorld, pretrain_config: PretrainConfig, progress: bool = True
) -> tuple[Participant, dict[str, Any]]:
    """Build one participant from random init and pretrain it; returns it and a training summary."""
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        participant = build_tiny_participant(config.spec, tokenizer=toy_tokenizer(config, world))
        corpus = build_corpus(participant, world, config.private_groups, config.skills)
        losses = pretrain(participant, corpus, config.recipe(pretrain_config), progress)
    tail = losses[-20:]
    summary = {
        "num_parameters": sum(p.numel() for p in participant.model.parameters()),
        "num_statements": len(corpus.statements),
        "num_questions": len(corpus.questions),
        **{f"num_{skill}": len(texts) for skill, texts in corpus.skills.items()},
        "first_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return participant, summary


def _is_complete(directory: Path, names: Sequence[str]) -> bool:
    return (directory / METADATA_FILE).is_file() and all((directory / n / "config.json").is_file() for n in names)


def _build_and_save(
    config: ToyParticipantConfig, world_config: WorldConfig, pretrain_config: PretrainConfig, staging: Path,
    progress: bool, threads: int | None,
) -> dict[str, Any]:
    """Pretrain one participant and save it under ``staging``; its training summary (also run in a worker)."""
    if threads:
        torch.set_num_threads(threads)
    participant, summary = build_toy_participant(config, ToyWorld(world_config), pretrain_config, progress)
    participant.model.save_pretrained(staging / config.name)
    participant.tokenizer.save_pretrained(staging / config.name)
    return summary


def build_toy_world(
    world_config: WorldConfig | None = None,
    participants: Sequence[ToyParticipantConfig] = DEFAULT_PARTICIPANTS,
    pretrain_config: PretrainConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    rebuild: bool = False,
    workers: int = 1,
) -> Path:
    """Pretrain every participant unless the package ships them or the cache holds them; returns their directory.

    Looks in :func:`shipped_dir` first, then ``<cache>/<key>``; builds into the cache otherwise. With
    ``workers`` > 1, that many participants train at once, each in its own process with an equal share of
    torch's threads (tiny models use one core each better than two cores one).
    """
    world = ToyWorld(world_config)
    pretrain_config = pretrain_config or PretrainConfig()
    names = [p.name for p in participants]
    if len(set(names)) != len(names):
        raise ValueError(f"Participant names must be unique, got {names}.")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}.")
    key = toyworld_key(world, participants, pretrain_config)
    shipped = shipped_dir() / key
    if _is_complete(shipped, names) and not rebuild:  # built by this project's script, shipped with the package
        return shipped
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = directory / key
    if _is_complete(target, names) and not rebuild:
        return target
    staging = directory / f".{key}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started = time.perf_counter()
    # Longest first, so that the workers finish together.
    by_steps = sorted(participants, key=lambda c: -c.recipe(pretrain_config).total_steps)
    jobs = [(config, world.config, pretrain_config, staging) for config in by_steps]
    if workers == 1:
        done = {job[0].name: _build_and_save(*job, progress, None) for job in tqdm(jobs, desc=f"toy world {key}", disable=not progress)}
    else:
        threads = max(1, torch.get_num_threads() // workers)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_build_and_save, *job, False, threads): job[0].name for job in jobs}
            done = {futures[f]: f.result() for f in tqdm(as_completed(futures), total=len(futures), desc=f"toy world {key}", disable=not progress)}
    summaries = {name: done[name] for name in names}
    metadata = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "world": world.config.to_dict(),
        "world_fingerprint": world.fingerprint,
        "participants": [p.to_dict() for p in participants],
        "pretrain": asdict(pretrain_config),
        "pretraining_seconds": round(time.perf_counter() - started, 1),
        "workers": workers,
        "training": summaries,
    }
    (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def load_toy_participants(
    world_config: WorldConfig | None = None,
    participants: Sequence[ToyParticipantConfig] = DEFAULT_PARTICIPANTS,
    pretrain_config: PretrainConfig | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Participant]:
    """The toy world's pretrained participants by name, built on first use and loaded from the cache after.

    Each participant's identity is ``toyworld/<name>`` at revision ``<key>``, so fusers are tied to
    the exact pretrained weights.
    """
    directory = build_toy_world(world_config, participants, pretrain_config, cache_dir, progress)
    key = directory.name
    return {
        p.name: load_participant(str(directory / p.name), revision=key, device=device, name=_participant_identity_name(p.name))
        for p in participants
    }


def read_toy_metadata(directory: str | Path) -> dict[str, Any]:
    """The metadata (configs and training summary) of a built toy world directory."""
    return json.loads((Path(directory) / METADATA_FILE).read_text())
