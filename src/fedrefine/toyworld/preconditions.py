"""What the toy world's comparisons need of its participants, measured: each a fraction in [0, 1].

- A sender knows its group (``sender_known_accuracy``: cloze accuracy on its held-out entities' questions)
  and writes hints that state the asked fact (``hint_fact_accuracy``), so T2T has something to carry.
- The receiver does not know the private groups (``receiver_held_out_accuracy``, chance is 0.25), reads a
  hint when given one (``oracle_hint_accuracy``: the world's true statement as the hint), and rewrites a
  query into another wording of the same question (``rephrase_keeps_question``) without the query's private
  preamble (``rephrase_private_tokens``: the preamble's word tokens found in any rewrite), so that private
  mode has a rephrasing worth sending.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedrefine.participants import Participant
from fedrefine.participants.generation import generate_replies
from fedrefine.privacy.leakage import private_tokens_found
from fedrefine.privacy.rephrase import RephraseConfig, Rephraser
from fedrefine.tasks.multiple_choice import MultipleChoiceItem
from fedrefine.tasks.scoring import predict_alone
from fedrefine.tasks.t2t import DEFAULT_PROMPT_TEMPLATE, T2TConfig, answer_with_hints
from fedrefine.toyworld.world import ANSWER_STYLE, Fact, ToyWorld, parse_statements


def accuracy(predictions: Sequence[int], items: Sequence[MultipleChoiceItem]) -> float:
    if not items:
        raise ValueError("No questions to measure an accuracy on.")
    return sum(int(p == item.answer_index) for p, item in zip(predictions, items, strict=True)) / len(items)


def cloze_accuracy(participant: Participant, items: Sequence[MultipleChoiceItem], batch_size: int = 64) -> float:
    """Accuracy answering alone (the toy world's cloze scoring)."""
    return accuracy(predict_alone(participant, items, batch_size=batch_size, style=ANSWER_STYLE), items)


def hint_fact_accuracy(sender: Participant, world: ToyWorld, facts: Sequence[Fact], variant: int = 0) -> float:
    """Share of ``facts`` whose hint, written for the T2T prompt around the question (wording ``variant``),
    states the asked entity's true value of the asked attribute."""
    prompts = [DEFAULT_PROMPT_TEMPLATE.format(question=fact.question(variant)) for fact in facts]
    replies = generate_replies(sender, prompts, max_new_tokens=T2TConfig().budget, batch_size=64)
    stated = [parse_statements(reply.text) for reply in replies]
    return sum((f.entity, f.attribute, f.value) in s for f, s in zip(facts, stated)) / len(facts)


def oracle_hint_accuracy(receiver: Participant, world: ToyWorld, items: Sequence[MultipleChoiceItem]) -> float:
    """Accuracy of the receiver reading the world's true statement of each question's fact as its one hint."""
    hints = [[_fact_of(world, item).statement()] for item in items]
    answers = answer_with_hints(receiver, items, hints, T2TConfig(batch_size=64), style=ANSWER_STYLE, normalization="sum")
    return accuracy([a.prediction for a in answers], items)


@dataclass(frozen=True)
class RephrasingCheck:
    """How the receiver's rewrites of questions read, parsed against the world."""

    keeps_question: float  # same entity and attribute
    changes_wording: float  # ... in another wording than the one asked
    private_tokens: float  # preamble word tokens found in the rewrites, over all preamble tokens
    examples: tuple[tuple[str, str], ...]  # (query, rewrite), a few


def check_rephrasings(receiver: Participant, world: ToyWorld, facts: Sequence[Fact]) -> RephrasingCheck:
    """Rewrite each fact's question twice, plain and after a private preamble, with the default rephrasing
    prompt and greedy decoding; parse the rewrites."""
    queries, asked, preambles = [], [], []
    for fact in facts:
        preamble = world.preamble(f"{fact.entity}-{fact.attribute}")
        for opening in ("", preamble):
            queries.append(f"{opening} {fact.question()}".strip())
            asked.append(fact)
            preambles.append(opening)
    rewrites = [r.text for r in Rephraser(receiver, RephraseConfig(batch_size=64)).rephrase(queries)]
    parsed = [world.parse_question(text) for text in rewrites]
    kept = [p is not None and p[:2] == (f.entity, f.attribute) for p, f in zip(parsed, asked)]
    changed = [k and p[2] != 0 for k, p in zip(kept, parsed)]
    found = [private_tokens_found(preamble, text) for preamble, text in zip(preambles, rewrites) if preamble]
    return RephrasingCheck(
        keeps_question=sum(kept) / len(kept),
        changes_wording=sum(changed) / len(changed),
        private_tokens=sum(leaked for leaked, _ in found) / max(1, sum(total for _, total in found)),
        examples=tuple(zip(queries[:4], rewrites[:4])),
    )


def _fact_of(world: ToyWorld, item: MultipleChoiceItem) -> Fact:
    entity, attribute, _ = item.id.split("-", 2)
    return next(f for f in world.entity(entity).facts if f.attribute == attribute)
