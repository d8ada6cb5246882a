"""Toy world v2: question wordings, private preambles, and what each participant is taught (hints, rephrasings)."""

import re
from dataclasses import replace

import pytest
import torch

from fedrefine.participants import TinySpec, build_tiny_participant
from fedrefine.privacy.leakage import private_tokens_found
from fedrefine.privacy.rephrase import DEFAULT_REPHRASE_TEMPLATE
from fedrefine.tasks.multiple_choice import DatasetSchemaError, MultipleChoiceItem
from fedrefine.tasks.t2t import DEFAULT_PROMPT_TEMPLATE, T2TConfig, answer_with_hints
from fedrefine.toyworld import PretrainConfig, ToyParticipantConfig, ToyWorld, WorldConfig
from fedrefine.toyworld.corpus import (
    ANSWER,
    PROMPT,
    TEXT,
    asked_stems,
    build_corpus,
    encode_reply,
    nonce_names,
    rephrasing_target,
)
from fedrefine.toyworld.pretrain import batch_loss, stage_mixture, toy_tokenizer
from fedrefine.toyworld.world import QUESTION_VARIANTS, STATEMENT_TEMPLATES, parse_statements

SMALL = WorldConfig(seed=5, num_entities=24, attributes=("colour", "city"), values_per_attribute=5,
                    num_private_groups=2, public_fraction=1 / 3, held_out_fraction=0.25, num_fictional=4)
RECEIVER = ToyParticipantConfig(
    TinySpec("receiver", "qwen3", num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16,
             intermediate_size=64, tokenizer_kind="syllable", vocab_size=2048),
    skills=("read_hints", "rephrase"),
)
SENDER = ToyParticipantConfig(
    TinySpec("sender", "llama", num_layers=1, hidden_size=24, num_heads=3, num_kv_heads=1, head_dim=8,
             intermediate_size=48, tokenizer_kind="word", chat_style="llama3", vocab_size=4096, seed=1),
    private_groups=(0,), skills=("write_hints",),
)


@pytest.fixture(scope="module")
def world():
    return ToyWorld(SMALL)


def _participant(config, world):
    return build_tiny_participant(config.spec, tokenizer=toy_tokenizer(config, world))


def test_every_wording_of_a_question_parses_back_to_its_entity_and_attribute(world):
    for fact in world.facts(world.names[:6]):
        for variant in range(len(QUESTION_VARIANTS[fact.attribute])):
            assert world.parse_question(fact.question(variant)) == (fact.entity, fact.attribute, variant)
    fact = world.facts(world.names[:1])[0]
    assert world.parse_question(f"{fact.question()} And more.") is None
    assert world.parse_question(fact.question().replace(fact.entity, "Nobody")) is None  # not an entity of the world
    stated = parse_statements(f"{fact.statement()} Something else. {world.fictional[0].facts[1].statement()}")
    assert stated == [(fact.entity, fact.attribute, fact.value), (world.fictional[0].name, "city", world.fictional[0].facts[1].value)]


def test_fictional_entities_and_preamble_people_are_apart_from_the_entities(world):
    assert len(world.fictional_names) == SMALL.num_fictional
    assert set(world.fictional_names).isdisjoint(world.names)
    for name in world.fictional_names:
        with pytest.raises(KeyError):
            world.split_of(name)
    assert set(world.preamble_words).isdisjoint(world.names + world.fictional_names)
    assert ToyWorld(replace(SMALL, num_fictional=0)).names == world.names  # drawn apart: the entities do not move


def test_preambles_are_private_details_no_question_wording_contains(world):
    wordings = " ".join(q for qs in QUESTION_VARIANTS.values() for q in qs).lower()
    preamble = world.preamble("someone")
    assert preamble == world.preamble("someone") != world.preamble("someone else")
    assert re.match(r"I am \w+ \w+, account \d\d-\d{4}, from \w+, and I have \w+\.$", preamble), preamble
    assert set(re.findall(r"\w+", preamble.lower())).isdisjoint(re.findall(r"\w+", wordings))
    assert private_tokens_found(preamble, "Which colour does Zorbix like best?") == (0, len(re.findall(r"\w+", preamble)))
    leaked, total = private_tokens_found(preamble, f"{preamble.split(',')[0]}: which colour?")
    assert leaked == 5 and total == len(re.findall(r"\w+", preamble))  # "I" (twice in the preamble), "am", the name


def test_evaluation_rows_carry_a_seeded_share_of_preambles_as_private_text(world):
    plain = world.eval_rows()
    assert not any("private_text" in row for row in plain)
    rows = world.eval_rows(preamble_fraction=0.5)
    assert rows == world.eval_rows(preamble_fraction=0.5)
    with_preamble = [row for row in rows if "private_text" in row]
    assert 0 < len(with_preamble) < len(rows) and len(with_preamble) % 4 == 0  # a fact's four rows alike
    for row in with_preamble:
        item = MultipleChoiceItem.from_row(row)
        assert item.private_text == row["private_text"] and item.question_stem.startswith(item.private_text)
        assert world.parse_question(item.question_stem[len(item.private_text):].strip()) is not None
    assert all("private_text" in row for row in world.eval_rows(preamble_fraction=1.0))
    with pytest.raises(ValueError, match="preamble_fraction"):
        world.eval_rows(preamble_fraction=1.5)
    broken = dict(with_preamble[0], private_text="not in the stem")
    with pytest.raises(DatasetSchemaError, match="private_text"):
        MultipleChoiceItem.from_row(broken)


def test_a_rephrasing_target_is_the_next_wording_without_the_preamble(world):
    fact = world.facts(world.public[:1])[0]
    stems = asked_stems(world, fact)
    assert {fact.question(v) for v in range(3)} <= set(stems)
    for variant in range(3):
        target = rephrasing_target(fact, f"{world.preamble('x')} {fact.question(variant)}")
        assert target == fact.question((variant + 1) % 3)


def test_reply_encoding_marks_the_prompt_the_reply_and_what_it_must_get_right(world):
    sender = _participant(SENDER, world)
    fact = world.facts(world.known_by([0])[:1])[0]
    text = encode_reply(sender, DEFAULT_PROMPT_TEMPLATE.format(question=fact.question()), fact.statement(), (fact.entity, fact.value))
    tokens = [sender.tokenizer.decode([i]) for i in text.input_ids]
    answer = [t.strip() for t, k in zip(tokens, text.kinds) if k == ANSWER]
    assert sorted(answer) == sorted([fact.entity, fact.value])  # the name to copy and the value to recall
    reply = "".join(t for t, k in zip(tokens[:-1], text.kinds[:-1]) if k in (TEXT, ANSWER))
    assert reply.strip() == fact.statement()
    assert text.kinds[0] == PROMPT and text.kinds[-1] == TEXT  # end of turn is learned


def test_corpora_hold_the_skills_each_participant_is_taught(world):
    sender, receiver = _participant(SENDER, world), _participant(RECEIVER, world)
    sender_corpus = build_corpus(sender, world, SENDER.private_groups, SENDER.skills)
    assert set(sender_corpus.skills) == {"write_hints"}
    receiver_corpus = build_corpus(receiver, world, (), RECEIVER.skills)
    assert set(receiver_corpus.skills) == {"read_hints", "rephrase"}
    read = receiver.tokenizer.decode(receiver_corpus.skills["read_hints"][0].input_ids)
    assert "Background from other models:" in read and "The correct answer is" in read
    # counterfactual hints: the hinted value is the answer even where it contradicts the world
    contradicting = 0
    for text in receiver_corpus.skills["read_hints"]:
        decoded = receiver.tokenizer.decode(text.input_ids)
        stated = parse_statements(decoded.split("Background from other models:\n")[1].split("\n")[0])
        (entity, attribute, value), = stated
        assert decoded.rstrip().removesuffix("<|im_end|>").endswith(f"The correct answer is {value}.")
        truth = next((f.value for f in world.entity(entity).facts if f.attribute == attribute), None)
        contradicting += truth != value
    assert contradicting > 0
    rephrase = receiver.tokenizer.decode(receiver_corpus.skills["rephrase"][0].input_ids)
    assert rephrase.startswith("<|im_start|>user\n" + DEFAULT_REPHRASE_TEMPLATE.split("\n")[0])
    with pytest.raises(ValueError, match="unknown skill"):
        ToyParticipantConfig(SENDER.spec, skills=("juggling",))
    mixture = stage_mixture(receiver_corpus, PretrainConfig(batch_size=20))
    assert sum(count for _, count in mixture) == 20
    with pytest.raises(ValueError, match="fill more than a batch"):
        stage_mixture(receiver_corpus, PretrainConfig(question_fraction=0.9))


def test_length_bucketed_batches_give_the_padded_batch_loss_and_gradients(world):
    sender = _participant(SENDER, world)
    corpus = build_corpus(sender, world, SENDER.private_groups, SENDER.skills)
    texts = [*corpus.statements[:5], *corpus.questions[:6], *corpus.skills["write_hints"][:5]]  # 10 to 70 tokens
    assert len({len(t.input_ids) for t in texts}) > 3
    weights = torch.tensor([0.0, 0.0, 1.0, 5.0])
    sender.model.requires_grad_(True)
    results = []
    for buckets in (1, 3, len(texts)):
        sender.model.zero_grad()
        loss = batch_loss(sender, texts, weights, buckets)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in sender.model.parameters()]))
    (padded, padded_grads), *bucketed = results
    for loss, grads in bucketed:
        torch.testing.assert_close(loss, padded, rtol=1e-5, atol=1e-6)
        for grad, reference in zip(grads, padded_grads, strict=True):
            torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-6)


def test_a_syllable_receiver_reads_held_out_names_in_pieces_its_training_names_have(world):
    tokenizer = _participant(RECEIVER, world).tokenizer

    def pieces(names):
        return {i for n in names for i in tokenizer(" " + n, add_special_tokens=False)["input_ids"]}

    assert all(len(tokenizer(" " + n)["input_ids"]) >= 2 for n in world.names)  # no name is one token
    assert tokenizer.unk_token_id not in pieces(world.held_out())
    assert pieces(world.held_out()) <= pieces([*world.public, *world.fictional_names, *nonce_names(world)])


def test_reading_oracle_hints_scores_like_t2t_with_the_same_hints(world):
    receiver = _participant(RECEIVER, world)
    items = world.questions(world.held_out(0)[:2])
    hints = [[f"{STATEMENT_TEMPLATES['colour'].format(name=item.id.split('-')[0], value=item.choices[0])}"] for item in items]
    answers = answer_with_hints(receiver, items, hints, T2TConfig(batch_size=3), style="text")
    again = answer_with_hints(receiver, items, hints, T2TConfig(batch_size=8), style="text")
    assert [a.prediction for a in answers] == [a.prediction for a in again]
    torch.testing.assert_close(torch.tensor([a.option_scores for a in answers]), torch.tensor([a.option_scores for a in again]))
    with pytest.raises(ValueError, match="one list per question"):
        answer_with_hints(receiver, items, hints[:1])
