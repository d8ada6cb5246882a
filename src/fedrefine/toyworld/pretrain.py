"""Pretrain tiny participants of the toy world from random init, cached on disk by a content key.

Each participant knows the public entities and its own private groups. It is trained on
exactly what evaluation reads: statements of its facts, and multiple-choice questions
rendered with its own chat template (user message :func:`question_text`, generation prompt,
:func:`correct_answer` + end of turn). Training is staged: statements first (the facts), then
question-heavy (the multiple-choice skill, which appears abruptly). The loss ignores entity-name
tokens (unpredictable) and weights the answer letter.

The result lives in ``<cache>/<key>/<participant>/`` (``save_pretrained`` model + tokenizer),
where ``<cache>`` is ``$FEDREFINE_CACHE/toyworld`` or ``~/.cache/fedrefine/toyworld`` and the
key hashes the world and every config, so participants are rebuilt only when something changes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fedrefine.cache import positions_from_mask
from fedrefine.chat import encode_chat
from fedrefine.multiple_choice import (
    ANSWER_PREFIX,
    MultipleChoiceItem,
    correct_answer,
    question_messages,
    question_text,
)
from fedrefine.padding import left_pad
from fedrefine.participants import (
    Participant,
    TinySpec,
    build_tiny_participant,
    freeze,
    load_participant,
)
from fedrefine.tokenizer import build_tokenizer
from fedrefine.toyworld.world import ANSWER_STYLE, ToyWorld, WorldConfig

FORMAT_VERSION = 1
METADATA_FILE = "toyworld.json"

# Token kinds: what each target token counts for in the loss (see PretrainConfig weights).
IGNORE, PROMPT, TEXT, ANSWER = 0, 1, 2, 3


@dataclass(frozen=True)
class ToyParticipantConfig:
    """A tiny participant of the toy world: its shape/tokenizer and the private groups it knows."""

    spec: TinySpec
    private_groups: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name

    def to_dict(self) -> dict[str, Any]:
        return {"spec": asdict(self.spec), "private_groups": list(self.private_groups)}


@dataclass(frozen=True)
class PretrainConfig:
    """Optimisation recipe shared by every toy participant.

    Measured on 2 CPU cores: facts stated 300 steps, then question-heavy batches; a sender
    answers ~99% of its questions after 2,400 question steps (~4 minutes), ~90% after 1,300.
    """

    statement_steps: int = 300
    question_steps: int = 2400
    batch_size: int = 64
    question_fraction: float = 0.5
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


#: Receiver (Qwen3, public only) and two senders of other classes, shapes and tokenizers.
DEFAULT_PARTICIPANTS: tuple[ToyParticipantConfig, ...] = (
    ToyParticipantConfig(
        TinySpec("receiver", "qwen3", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                 intermediate_size=192, tokenizer_kind="word", chat_style="chatml", vocab_size=2048, seed=0),
    ),
    ToyParticipantConfig(
        TinySpec("llama-sender", "llama", num_layers=3, hidden_size=96, num_heads=6, num_kv_heads=3, head_dim=16,
                 intermediate_size=256, rope_theta=500000.0, tokenizer_kind="word", chat_style="llama3",
                 vocab_size=2048, seed=1),
        private_groups=(0,),
    ),
    ToyParticipantConfig(
        TinySpec("qwen2-sender", "qwen2", num_layers=5, hidden_size=64, num_heads=8, num_kv_heads=2, head_dim=8,
                 intermediate_size=160, tokenizer_kind="word", chat_style="chatml", vocab_size=2048, seed=2),
        private_groups=(1,),
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
@dataclass
class TrainingText:
    """Token ids of one training text and the loss kind of each token (as a target)."""

    input_ids: list[int]
    kinds: list[int]


@dataclass
class ParticipantCorpus:
    """A participant's pretraining texts, statements and questions apart (they are mixed by stage)."""

    statements: list[TrainingText] = field(default_factory=list)
    questions: list[TrainingText] = field(default_factory=list)


def _name_spans(text: str, names: Sequence[str]) -> list[tuple[int, int]]:
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(n) for n in names) + r")\b")
    return [m.span() for m in pattern.finditer(text)]


def _token_kinds(
    offsets: Sequence[tuple[int, int]], default: list[int], names: list[tuple[int, int]]
) -> list[int]:
    kinds = list(default)
    for i, (start, end) in enumerate(offsets):
        if any(start < n_end and n_start < end for n_start, n_end in names):
            kinds[i] = IGNORE
    return kinds


def encode_statement(participant: Participant, statement: str, entity: str) -> TrainingText:
    """A statement as plain text (after bos, if the tokenizer has one) closed by end of turn."""
    tokenizer = participant.tokenizer
    encoding = tokenizer(statement, add_special_tokens=False, return_offsets_mapping=True)
    kinds = _token_kinds(encoding["offset_mapping"], [TEXT] * len(encoding["input_ids"]), _name_spans(statement, [entity]))
    ids = [*encoding["input_ids"], participant.end_of_turn_token_id]
    kinds = [*kinds, TEXT]
    if tokenizer.bos_token_id is not None:
        ids, kinds = [tokenizer.bos_token_id, *ids], [IGNORE, *kinds]
    return TrainingText(ids, kinds)


def encode_question_answer(participant: Participant, item: MultipleChoiceItem, entity: str) -> TrainingText:
    """A question exactly as evaluation renders it, followed by its answer and end of turn.

    Prompt tokens are ``PROMPT``, the answer ``TEXT``, the option named after
    :data:`ANSWER_PREFIX` ``ANSWER``, and the entity's name ``IGNORE``.
    """
    answer = correct_answer(item, ANSWER_STYLE)
    chat = encode_chat(participant, question_messages(item, ANSWER_STYLE), add_generation_prompt=True, suffix=answer)
    answer_start = len(chat.text) - len(answer)
    named_at = answer_start + len(ANSWER_PREFIX) + 1
    named_end = len(chat.text) - 1  # the closing "."
    default = []
    for start, end in chat.offsets:
        if start < named_end and named_at < end:
            default.append(ANSWER)
        elif start >= answer_start:
            default.append(TEXT)
        else:
            default.append(PROMPT)
    if ANSWER not in default:
        raise ValueError(f"Tokenizer of {participant.name} has no token for the answer letter in {chat.text!r}.")
    kinds = _token_kinds(chat.offsets, default, _name_spans(chat.text, [entity]))
    return TrainingText([*chat.input_ids, participant.end_of_turn_token_id], [*kinds, TEXT])


def participant_texts(world: ToyWorld, private_groups: Sequence[int]) -> tuple[list[str], list[MultipleChoiceItem]]:
    """Statements and questions about every entity a participant knowing ``private_groups`` knows."""
    names = world.known_by(private_groups)
    return world.statements(names), world.questions(names)


def build_corpus(participant: Participant, world: ToyWorld, private_groups: Sequence[int]) -> ParticipantCorpus:
    """Tokenize a participant's statements and questions for pretraining."""
    corpus = ParticipantCorpus()
    for fact in world.facts(world.known_by(private_groups)):
        corpus.statements.append(encode_statement(participant, fact.statement(), fact.entity))
        for row in fact.question_rows():
            corpus.questions.append(encode_question_answer(participant, MultipleChoiceItem.from_row(row), fact.entity))
    return corpus


def toy_tokenizer(config: ToyParticipantConfig, world: ToyWorld):
    """The participant's own tokenizer, trained on its own texts plus the register of all names.

    Every participant can read every name; only its facts are private.
    """
    statements, questions = participant_texts(world, config.private_groups)
    texts = [*statements, *(question_text(q, ANSWER_STYLE) for q in questions)]
    texts += [correct_answer(q, ANSWER_STYLE) for q in questions[:64]]
    texts.append(" ".join(world.names) + "\n" + "\n".join(world.names))
    return build_tokenizer(config.spec.tokenizer_kind, config.spec.chat_style, corpus=texts, vocab_size=config.spec.vocab_size)


# --- training -----------------------------------------------------------------------------------
def _learning_rate(step: int, config: PretrainConfig) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.total_steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.learning_rate * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def batch_loss(participant: Participant, texts: Sequence[TrainingText], weights: torch.Tensor) -> torch.Tensor:
    """Weighted next-token loss of a batch; ``weights[kind]`` is each token kind's weight."""
    ids, mask = left_pad([t.input_ids for t in texts], participant.tokenizer.pad_token_id)
    kinds, _ = left_pad([t.kinds for t in texts], IGNORE)
    ids, mask, kinds = ids.to(participant.device), mask.to(participant.device), kinds.to(participant.device)
    logits = participant.model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    token_weights = weights.to(logits.device)[kinds[:, 1:]]
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    return (losses * token_weights.flatten()).sum() / token_weights.sum().clamp(min=1e-8)


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
    num_questions = round(config.question_fraction * config.batch_size)
    losses: list[float] = []
    bar = tqdm(range(config.total_steps), desc=f"pretrain {participant.name}", disable=not progress, leave=False)
    for step in bar:
        in_question_stage = step >= config.statement_steps
        questions = num_questions if in_question_stage else 0
        picks = []
        for texts, count in zip((corpus.statements, corpus.questions), (config.batch_size - questions, questions)):
            if count:
                picks += [texts[i] for i in torch.randint(len(texts), (count,), generator=generator).tolist()]
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, config)
        loss = batch_loss(participant, picks, weights)
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
        corpus = build_corpus(participant, world, config.private_groups)
        losses = pretrain(participant, corpus, pretrain_config, progress)
    tail = losses[-20:]
    summary = {
        "num_parameters": sum(p.numel() for p in participant.model.parameters()),
        "num_statements": len(corpus.statements),
        "num_questions": len(corpus.questions),
        "first_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return participant, summary


def _is_complete(directory: Path, names: Sequence[str]) -> bool:
    return (directory / METADATA_FILE).is_file() and all((directory / n / "config.json").is_file() for n in names)


def build_toy_world(
    world_config: WorldConfig | None = None,
    participants: Sequence[ToyParticipantConfig] = DEFAULT_PARTICIPANTS,
    pretrain_config: PretrainConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    rebuild: bool = False,
) -> Path:
    """Pretrain every participant unless the package ships them or the cache holds them; returns their directory.

    Looks in :func:`shipped_dir` first, then ``<cache>/<key>``; builds into the cache otherwise.
    """
    world = ToyWorld(world_config)
    pretrain_config = pretrain_config or PretrainConfig()
    names = [p.name for p in participants]
    if len(set(names)) != len(names):
        raise ValueError(f"Participant names must be unique, got {names}.")
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
    summaries = {}
    for config in tqdm(participants, desc=f"toy world {key}", disable=not progress):
        participant, summaries[config.name] = build_toy_participant(config, world, pretrain_config, progress)
        participant.model.save_pretrained(staging / config.name)
        participant.tokenizer.save_pretrained(staging / config.name)
    metadata = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "world": world.config.to_dict(),
        "world_fingerprint": world.fingerprint,
        "participants": [p.to_dict() for p in participants],
        "pretrain": asdict(pretrain_config),
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
