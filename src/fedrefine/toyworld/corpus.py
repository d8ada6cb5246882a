"""What each toy participant is taught: its training texts, rendered exactly as evaluation renders them.

Every participant learns the facts it knows (statements) and to answer multiple-choice questions
about them (any wording of :data:`~fedrefine.toyworld.world.QUESTION_VARIANTS`, a share opened by a
private preamble). On top, by role (:data:`Skill`):

- ``write_hints`` (senders, for T2T): asked with :data:`~fedrefine.tasks.t2t.DEFAULT_PROMPT_TEMPLATE` around a
  question stem, reply with the statement of the asked fact.
- ``read_hints`` (the receiver): answer a question with a hint placed as :func:`~fedrefine.tasks.t2t.hint_messages`
  places it, from the hint: true hints about entities it knows, counterfactual ones that contradict what it
  memorised, and hints about fictional entities nobody knows, so that it reads rather than recalls.
- ``rephrase`` (the receiver): asked with :data:`~fedrefine.privacy.rephrase.DEFAULT_REPHRASE_TEMPLATE` around
  a query, reply with the next wording of the same question and without the query's private preamble.

Every target token has a kind (:data:`IGNORE`, :data:`PROMPT`, :data:`TEXT`, :data:`ANSWER`) that the
loss weighs: an entity's name is ``IGNORE`` where it cannot be predicted (a statement's subject, a question
about it) and ``ANSWER`` where it is copied from the prompt into a reply (hints, rephrasings: a hint about
the wrong entity is worthless, and copying is what tiny senders learn last), like the value a hint or an
answer names.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from fedrefine.participants import Participant
from fedrefine.participants.chat import Message, encode_chat
from fedrefine.privacy.rephrase import DEFAULT_REPHRASE_TEMPLATE
from fedrefine.tasks.multiple_choice import (
    ANSWER_PREFIX,
    MultipleChoiceItem,
    correct_answer,
    question_messages,
    question_text,
)
from fedrefine.tasks.t2t import DEFAULT_HINT_HEADER, DEFAULT_PROMPT_TEMPLATE, hint_messages
from fedrefine.toyworld.world import ANSWER_STYLE, QUESTION_VARIANTS, Fact, ToyWorld, make_names

# Token kinds: what each target token counts for in the loss (see PretrainConfig's weights).
IGNORE, PROMPT, TEXT, ANSWER = 0, 1, 2, 3
Skill = Literal["write_hints", "read_hints", "rephrase"]
SKILLS: tuple[str, ...] = ("write_hints", "read_hints", "rephrase")
#: Share of training questions (and hint / rephrasing prompts) opened by a private preamble.
PREAMBLE_SHARE = 0.25
#: Made-up names a rephraser learns to copy (and nothing else about).
NUM_NONCE_NAMES = 4000


@dataclass
class TrainingText:
    """Token ids of one training text and the loss kind of each token (as a target)."""

    input_ids: list[int]
    kinds: list[int]


@dataclass
class ParticipantCorpus:
    """A participant's pretraining texts by task (the recipe mixes them per stage)."""

    statements: list[TrainingText] = field(default_factory=list)
    questions: list[TrainingText] = field(default_factory=list)
    skills: dict[str, list[TrainingText]] = field(default_factory=dict)


def _name_spans(text: str, names: Sequence[str]) -> list[tuple[int, int]]:
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(n) for n in names) + r")\b")
    return [m.span() for m in pattern.finditer(text)]


def _overlaps(start: int, end: int, spans: Sequence[tuple[int, int]]) -> bool:
    return any(start < span_end and span_start < end for span_start, span_end in spans)


def _token_kinds(offsets: Sequence[tuple[int, int]], default: list[int], names: list[tuple[int, int]]) -> list[int]:
    return [IGNORE if _overlaps(start, end, names) else kind for (start, end), kind in zip(offsets, default)]


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


def encode_answer(
    participant: Participant, messages: Sequence[Message], item: MultipleChoiceItem, entity: str | None
) -> TrainingText:
    """``messages`` (ending with the question) followed by the correct answer and end of turn.

    Prompt tokens are ``PROMPT``, the answer ``TEXT``, the option named after :data:`ANSWER_PREFIX`
    ``ANSWER``, and ``entity``'s name ``IGNORE`` (it cannot be predicted).
    """
    answer = correct_answer(item, ANSWER_STYLE)
    chat = encode_chat(participant, messages, add_generation_prompt=True, suffix=answer)
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
    kinds = _token_kinds(chat.offsets, default, _name_spans(chat.text, [entity]) if entity else [])
    return TrainingText([*chat.input_ids, participant.end_of_turn_token_id], [*kinds, TEXT])


def encode_question_answer(participant: Participant, item: MultipleChoiceItem, entity: str) -> TrainingText:
    """A question exactly as evaluation renders it, followed by its answer and end of turn."""
    return encode_answer(participant, question_messages(item, ANSWER_STYLE), item, entity)


def encode_reply(participant: Participant, prompt: str, reply: str, answers: Sequence[str] = ()) -> TrainingText:
    """One user message (rendered as :func:`~fedrefine.participants.generation.generate_replies` renders it), then ``reply``
    and end of turn: the reply is ``TEXT``, the words ``answers`` in it (what the reply must get right: a hint's
    entity and value, a rephrasing's entity) ``ANSWER``, the prompt ``PROMPT``."""
    chat = encode_chat(participant, [{"role": "user", "content": prompt}], add_generation_prompt=True, suffix=reply)
    reply_start = len(chat.text) - len(reply)
    answer_spans = [(reply_start + s, reply_start + e) for s, e in _name_spans(reply, answers)] if answers else []
    kinds = [
        PROMPT if start < reply_start else ANSWER if _overlaps(start, end, answer_spans) else TEXT
        for start, end in chat.offsets
    ]
    return TrainingText([*chat.input_ids, participant.end_of_turn_token_id], [*kinds, TEXT])


# --- what is asked ------------------------------------------------------------------------------
def asked_stems(world: ToyWorld, fact: Fact) -> list[str]:
    """Every way a fact is asked in training: each wording, and a seeded share of them after a preamble."""
    stems = []
    for variant in range(len(QUESTION_VARIANTS[fact.attribute])):
        stem = fact.question(variant)
        key = f"train-{fact.entity}-{fact.attribute}-{variant}"
        stems.append(stem)
        if random.Random(key).random() < PREAMBLE_SHARE:
            stems.append(f"{world.preamble(key)} {stem}")
    return stems


def rephrasing_target(fact: Fact, stem: str) -> str:
    """What a rephrasing of ``stem`` (a wording of ``fact``'s question, maybe after a preamble) says: the next
    wording of the same question, without the preamble."""
    variants = [fact.question(v) for v in range(len(QUESTION_VARIANTS[fact.attribute]))]
    asked = next(v for v, wording in enumerate(variants) if stem.endswith(wording))
    return variants[(asked + 1) % len(variants)]


def _question_items(world: ToyWorld, fact: Fact, rng: random.Random) -> list[tuple[MultipleChoiceItem, str]]:
    """Each wording (and preamble) of ``fact``'s question once, the answer at a seeded label."""
    items = []
    for stem in asked_stems(world, fact):
        variant = next(v for v in range(len(QUESTION_VARIANTS[fact.attribute])) if stem.endswith(fact.question(v)))
        preamble = stem[: -len(fact.question(variant))].strip() or None
        rows = fact.question_rows(variant, preamble)
        items.append((MultipleChoiceItem.from_row(rng.choice(rows)), stem))
    return items


def _counterfactual(world: ToyWorld, fact: Fact, rng: random.Random) -> Fact:
    """``fact`` with another value (and distractors around it): a hint that contradicts memory."""
    value = rng.choice([v for v in world.values[fact.attribute] if v != fact.value])
    others = [v for v in world.values[fact.attribute] if v != value]
    return Fact(fact.entity, fact.attribute, value, tuple(rng.sample(others, 3)))


def nonce_names(world: ToyWorld, count: int = NUM_NONCE_NAMES) -> tuple[str, ...]:
    """Names of no entity at all, for a rephraser to copy: many names, each asked about once, teach it to copy
    any name (piece by piece, see the ``syllable`` tokenizer) rather than the few it knows."""
    reserved = {n.lower() for n in (*world.names, *world.fictional_names, *world.preamble_words)}
    return tuple(make_names(random.Random(f"fedrefine-toyworld-{world.config.seed}-nonce"), count, reserved))


# --- corpora ------------------------------------------------------------------------------------
def build_corpus(
    participant: Participant, world: ToyWorld, private_groups: Sequence[int], skills: Sequence[str] = ()
) -> ParticipantCorpus:
    """Tokenize a participant's statements, questions and skill texts for pretraining."""
    unknown = sorted(set(skills) - set(SKILLS))
    if unknown:
        raise ValueError(f"Unknown skill(s) {unknown}; choose from {list(SKILLS)}.")
    rng = random.Random(f"corpus-{participant.name}")
    corpus = ParticipantCorpus()
    known = world.facts(world.known_by(private_groups))
    for fact in known:
        corpus.statements.append(encode_statement(participant, fact.statement(), fact.entity))
        for row in fact.question_rows():
            corpus.questions.append(encode_question_answer(participant, MultipleChoiceItem.from_row(row), fact.entity))
        for item, _ in _question_items(world, fact, rng)[1:]:  # the other wordings and the preambles
            corpus.questions.append(encode_question_answer(participant, item, fact.entity))
    if "write_hints" in skills:
        corpus.skills["write_hints"] = [
            encode_reply(participant, DEFAULT_PROMPT_TEMPLATE.format(question=stem), fact.statement(), (fact.entity, fact.value))
            for fact in known
            for stem in asked_stems(world, fact)
        ]
    public, fictional = world.facts(world.public), world.facts(world.fictional_names)
    if "read_hints" in skills:
        texts = corpus.skills["read_hints"] = []
        hinted = [*public, *(_counterfactual(world, f, rng) for f in public for _ in range(2)), *fictional, *fictional]
        for fact in hinted:
            for item, _ in _question_items(world, fact, rng):
                texts.append(encode_answer(participant, hint_messages(item, [fact.statement()], style=ANSWER_STYLE), item, None))
    if "rephrase" in skills:
        attributes = world.config.attributes
        nonce = [Fact(name, rng.choice(attributes), "", ("", "", "")) for name in nonce_names(world)]
        corpus.skills["rephrase"] = [
            encode_reply(participant, DEFAULT_REPHRASE_TEMPLATE.format(query=stem), rephrasing_target(fact, stem), (fact.entity,))
            for fact in [*public, *fictional, *nonce]
            for stem in (asked_stems(world, fact) if fact.value else [rng.choice(asked_stems(world, fact))])
        ]
    return corpus


def tokenizer_corpus(world: ToyWorld, private_groups: Sequence[int], skills: Sequence[str] = ()) -> list[str]:
    """The texts a participant's tokenizer is trained on: the prompts and answers it trains on, the words of
    preambles, and the register of every name (repeated, so that no name loses its token to a rare word such
    as an account number's digits)."""
    names = world.known_by(private_groups)
    known = world.facts(names)
    texts = [f.statement() for f in known]
    texts += [question_text(q, ANSWER_STYLE) for q in world.questions(names)]
    texts += [stem for f in known for stem in asked_stems(world, f)]
    texts += [correct_answer(q, ANSWER_STYLE) for q in world.questions(names[:16])]
    texts += [DEFAULT_PROMPT_TEMPLATE, DEFAULT_REPHRASE_TEMPLATE, DEFAULT_HINT_HEADER, "user\nassistant\n"] * 4
    texts += [" ".join(world.preamble_words)] * 4
    if skills:
        texts += [f.statement() for f in world.facts(world.fictional_names)]
    register = [*world.names, *world.fictional_names, *(nonce_names(world) if "rephrase" in skills else ())]
    texts += [" ".join(register) + "\n" + "\n".join(register)] * 4
    return texts
