import pytest
import torch

from fedrefine.participants import TinySpec, build_tiny_participant
from fedrefine.tasks.multiple_choice import (
    ANSWER_PREFIX,
    MultipleChoiceItem,
    encode_options_prompt,
    encode_question,
    extract_choice,
    question_messages,
)
from fedrefine.tasks.scoring import option_logits

ITEM = MultipleChoiceItem("q1", "What colour is Zorb?", ("red", "blue", "green", "pink"), tuple("ABCD"), "C")


@pytest.mark.parametrize("kind, style", [("byte_bpe", "chatml"), ("metaspace_bpe", "llama3"), ("word", "chatml")])
def test_option_tokens_name_each_letter_after_the_answer_prefix(kind, style):
    participant = build_tiny_participant(TinySpec("t", tokenizer_kind=kind, chat_style=style, vocab_size=400))
    encoded = encode_question(participant, ITEM)
    tokenizer = participant.tokenizer
    assert len(set(encoded.option_token_ids)) == 4
    for label, token in zip(ITEM.labels, encoded.option_token_ids):
        # the context plus the option token is exactly the prompt ending in "<prefix> <label>"
        full = encode_options_prompt(participant, question_messages(ITEM), [label, "A" if label != "A" else "B"])
        assert tokenizer.decode([*encoded.chat.input_ids, token]).endswith(label)
        assert full.chat.input_ids == encoded.chat.input_ids
    assert tokenizer.decode(encoded.chat.input_ids).rstrip().endswith(ANSWER_PREFIX.split()[-1])


def test_option_logits_handle_ragged_option_counts():
    logits = torch.arange(10.0).repeat(2, 1)
    scores = option_logits(logits, [(1, 2, 9, 3), (4, 5)])
    assert scores.shape == (2, 4)
    assert scores.argmax(-1).tolist() == [2, 1]
    assert torch.isinf(scores[1, 2:]).all()


@pytest.mark.parametrize(
    "text, expected",
    [("The correct answer is B.", "B"), ("Answer: c", "C"), ("(D) because it is pink", "D"), ("no idea", None),
     ("A or B", None), ("I pick E", None)],
)
def test_answer_extraction(text, expected):
    assert extract_choice(text, ITEM.labels) == expected


def test_cloze_scores_are_each_options_summed_log_probability_with_its_lengths():
    from fedrefine.tasks.scoring import predict_alone, score_encoded

    participant = build_tiny_participant(TinySpec("c", tokenizer_kind="byte_bpe", vocab_size=400, seed=3))
    item = MultipleChoiceItem("q", "Which is hot?", ("fire", "ice cube", "snow"), tuple("ABC"), "A")
    encoded = encode_question(participant, item, "text")
    scores = score_encoded(participant, [encoded], "text")
    for k, continuation in enumerate(encoded.continuations):
        ids = torch.tensor([[*encoded.chat.input_ids, *continuation]])
        with torch.no_grad():
            log_probs = participant.model(ids).logits[0].log_softmax(-1)
        start = len(encoded.chat.input_ids)
        expected = sum(log_probs[start - 1 + j, t] for j, t in enumerate(continuation))
        assert scores.total[0, k].item() == pytest.approx(expected.item(), abs=1e-4)
        assert scores.tokens[0, k] == len(continuation) and scores.chars[0, k] == len(item.choices[k])
    for normalization in ("sum", "chars", "token_mean"):
        expected = int(scores.normalized(normalization)[0].argmax())
        assert predict_alone(participant, [item], style="text", normalization=normalization) == [expected]
    # the continuations spell " " + each option, after the prompt's own tokens (lm-eval's split)
    texts = [participant.tokenizer.decode(c) for c in encoded.continuations]
    assert texts == [f" {choice}" for choice in item.choices]
    assert participant.tokenizer.decode(encoded.chat.input_ids).endswith(ANSWER_PREFIX)


@pytest.mark.parametrize("kind, style", [("byte_bpe", "chatml"), ("metaspace_bpe", "llama3"), ("word", "chatml")])
def test_answer_prefill_renders_the_same_prompt_as_message_content(kind, style):
    participant = build_tiny_participant(TinySpec("t", tokenizer_kind=kind, chat_style=style, vocab_size=400))
    for answer_style in ("letter", "text") if kind != "word" else ("letter",):  # option words are <unk> here
        plain = encode_question(participant, ITEM, answer_style)
        prefilled = encode_question(participant, ITEM, answer_style, prefill=True)
        assert prefilled.chat.input_ids == plain.chat.input_ids
        assert prefilled.option_token_ids == plain.option_token_ids and prefilled.continuations == plain.continuations
        start, end = prefilled.chat.content_spans[-1]
        assert prefilled.chat.text[start:end] == ANSWER_PREFIX and prefilled.chat.contents[-1] == ANSWER_PREFIX
    assert question_messages(ITEM, prefill=True)[-1] == {"role": "assistant", "content": ANSWER_PREFIX}
