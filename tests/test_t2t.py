"""Text-to-text baseline: hint generation, the receiver's prompt, option scoring, byte accounting."""

import dataclasses

import pytest
import torch

from fedrefine.participants.generation import generate_replies
from fedrefine.tasks.multiple_choice import MultipleChoiceItem, encode_question, question_messages, question_text
from fedrefine.tasks.scoring import predict_alone, score_encoded
from fedrefine.tasks.t2t import (
    DEFAULT_HINT_HEADER,
    Hint,
    T2TConfig,
    T2TResult,
    hint_messages,
    t2t_predict,
)

ITEMS = [
    MultipleChoiceItem(
        "q1", "Which of these would let the most heat travel through?",
        ("a metal spoon", "a wooden stick", "a cloth", "a glass"), tuple("ABCD"), "A",
    ),
    MultipleChoiceItem("q2", "The quick brown fox jumps over what?", ("the lazy dog", "Café 東京"), ("A", "B"), "A"),
    MultipleChoiceItem("q3", "What do fusers map?", ("caches", "answers", "letters", "emoji 🙂"), tuple("ABCD"), "A"),
]


def test_config_is_validated():
    with pytest.raises(ValueError, match="question"):
        T2TConfig(prompt_template="no placeholder")
    with pytest.raises(ValueError, match="placement"):
        T2TConfig(placement="system")
    with pytest.raises(ValueError, match="budget"):
        T2TConfig(budget=-1)


def test_replies_respect_budget_and_batching(llama_chatty):
    prompts = ["Which of these would let the most heat travel through?", "fox", "Café 東京 and the lazy dog, twice?"]
    batched = generate_replies(llama_chatty, prompts, max_new_tokens=6, batch_size=3)
    alone = [generate_replies(llama_chatty, [p], max_new_tokens=6)[0] for p in prompts]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]  # left padding does not change replies
    for reply in batched:
        assert 0 < len(reply.token_ids) <= 6
        assert llama_chatty.end_of_turn_token_id not in reply.token_ids
        assert reply.text == llama_chatty.tokenizer.decode(list(reply.token_ids), skip_special_tokens=True)
        assert reply.seconds > 0
    assert any(r.text.strip() for r in batched)
    assert all(r.token_ids == () and r.text == "" for r in generate_replies(llama_chatty, prompts, 0))


def test_generation_stops_at_end_of_turn(qwen2_chatty):
    eos = qwen2_chatty.end_of_turn_token_id
    calls = []

    def force_eos_on_fourth_step(module, inputs, output):
        calls.append(1)
        if len(calls) == 4:  # prefill + 3 steps: three tokens, then the end of the turn
            output[..., eos] = 1e4
        return output

    hook = qwen2_chatty.model.lm_head.register_forward_hook(force_eos_on_fourth_step)
    try:
        (reply,) = generate_replies(qwen2_chatty, ["What do fusers map?"], max_new_tokens=10)
    finally:
        hook.remove()
    assert len(reply.token_ids) == 3 and eos not in reply.token_ids
    assert len(calls) == 4  # generation stopped at the end-of-turn token


def test_sampling_needs_seeds(llama_chatty):
    with pytest.raises(ValueError, match="seed"):
        generate_replies(llama_chatty, ["fox"], do_sample=True)


def test_bytes_are_hand_computed():
    hint = Hint("tiny:a", "Café 東京!", (5, 6, 7))
    assert (hint.num_tokens, hint.id_bytes, hint.utf8_bytes) == (3, 12, 5 + 1 + 6 + 1)
    narrow = Hint("tiny:b", "ok", (1, 2), bytes_per_id=2)
    assert (narrow.id_bytes, narrow.utf8_bytes) == (4, 2)
    result = T2TResult("q", [hint, narrow], prediction=0, option_scores=[0.0, 1.0])
    assert (result.num_tokens, result.id_bytes, result.utf8_bytes) == (5, 16, 15)
    # the paper's figure: four senders, one token each, 4-byte ids -> 16 bytes
    assert T2TResult("q", [Hint(str(i), "x", (9,)) for i in range(4)], 0, []).id_bytes == 16


def test_hint_placement():
    item = ITEMS[1]
    messages = hint_messages(item, ["  first hint\n", "", " \n", "second"])
    assert messages == [
        {"role": "user", "content": f"{DEFAULT_HINT_HEADER}first hint\n\nsecond\n\n{question_text(item)}"}
    ]
    assert hint_messages(item, ["", "  "]) == question_messages(item)  # no hint: the receiver-alone prompt
    dialogue = hint_messages(item, ["first", "second"], T2TConfig(placement="dialogue"))
    assert [m["role"] for m in dialogue] == ["user", "assistant", "user"]
    assert dialogue[0]["content"].endswith(item.question_stem) and "A." not in dialogue[0]["content"]
    assert dialogue[1]["content"] == "first\n\nsecond"
    assert dialogue[2]["content"] == question_text(item)


def test_t2t_predict_results(receiver, llama_chatty, qwen2_chatty):
    senders = [llama_chatty, qwen2_chatty]
    results = t2t_predict(receiver, senders, ITEMS, T2TConfig(budget=5))
    assert [r.question_id for r in results] == [item.id for item in ITEMS]
    alone = score_encoded(receiver, [encode_question(receiver, item) for item in ITEMS]).total
    assert all(any(h.text.strip() for h in r.hints) for r in results)  # not vacuous: there is text to place
    for result, item, scores_alone in zip(results, ITEMS, alone):
        assert [h.sender for h in result.hints] == [s.name for s in senders]  # the given order
        for hint in result.hints:
            assert 0 < hint.num_tokens <= 5
            assert hint.id_bytes == 4 * hint.num_tokens
            assert hint.utf8_bytes == len(hint.text.encode("utf-8"))
        assert result.id_bytes == 4 * result.num_tokens
        assert len(result.option_scores) == len(item.labels)
        assert result.prediction == int(torch.tensor(result.option_scores).argmax())
        assert set(result.seconds) == {f"sender:{s.name}" for s in senders} | {"receiver"}
        assert not torch.allclose(torch.tensor(result.option_scores), scores_alone[: len(item.labels)])  # hints in context
    # each sender read the stem only, the options never: its hints do not depend on them
    changed = [dataclasses.replace(ITEMS[0], choices=("w", "x", "y", "z"))]
    again = t2t_predict(receiver, senders, changed, T2TConfig(budget=5))
    assert [h.token_ids for h in again[0].hints] == [h.token_ids for h in results[0].hints]
    # reversing the senders reverses the hints, each unchanged
    reversed_results = t2t_predict(receiver, senders[::-1], ITEMS[:1], T2TConfig(budget=5))
    assert reversed_results[0].hints == results[0].hints[::-1]


def test_no_hints_is_the_receiver_alone(receiver, llama_chatty):
    expected = [predict_alone(receiver, [item])[0] for item in ITEMS]  # T2T batches mixed option counts
    assert [r.prediction for r in t2t_predict(receiver, [], ITEMS)] == expected
    silent = t2t_predict(receiver, [llama_chatty], ITEMS, T2TConfig(budget=0))
    assert [r.prediction for r in silent] == expected
    assert all(r.num_tokens == 0 and r.id_bytes == 0 and r.utf8_bytes == 0 for r in silent)


def test_sender_questions_are_checked(receiver, llama_chatty, qwen2_chatty):
    with pytest.raises(ValueError, match="qwen2-sender-chatty"):
        t2t_predict(receiver, [llama_chatty, qwen2_chatty], ITEMS, sender_questions={llama_chatty.name: ["a"] * 3})
    with pytest.raises(ValueError, match="3 questions"):
        t2t_predict(receiver, [llama_chatty], ITEMS, sender_questions={llama_chatty.name: ["a"]})
    with pytest.raises(ValueError, match="distinct"):
        t2t_predict(receiver, [llama_chatty, llama_chatty], ITEMS)
