import pytest

from fedrefine.participants.align import UNALIGNED, align_tokens
from fedrefine.participants.chat import EncodedChat, encode_chat


def chat(text, offsets, spans, contents):
    return EncodedChat(text=text, input_ids=list(range(len(offsets))), offsets=offsets, content_spans=spans, contents=contents)


def test_receiver_token_reads_the_sender_token_covering_its_last_character():
    # receiver: "[T]" + "hello world"; sender: "<<" + "hello world" with other boundaries
    receiver = chat("[T]hello world", [(0, 3), (3, 8), (8, 14)], [(3, 14)], ["hello world"])
    sender = chat("<<hello world", [(0, 2), (2, 4), (4, 7), (7, 13)], [(2, 13)], ["hello world"])
    # "hello" ends at 'o' -> sender token 2 ("llo"); " world" ends at 'd' -> sender token 3
    assert align_tokens(receiver, sender) == [UNALIGNED, 2, 3]


def test_one_receiver_token_spanning_many_sender_tokens_and_vice_versa():
    receiver = chat("abcdef", [(0, 1), (1, 2), (2, 6)], [(0, 6)], ["abcdef"])
    sender = chat("abcdef", [(0, 3), (3, 4), (4, 5), (5, 6)], [(0, 6)], ["abcdef"])
    # 'a' and 'b' both sit inside sender token 0; "cdef" ends in sender token 3
    assert align_tokens(receiver, sender) == [0, 0, 3]


def test_multibyte_character_split_over_byte_tokens_maps_to_the_last_fragment():
    # sender splits "東京" into byte fragments whose offsets overlap (as byte-level BPE reports)
    receiver = chat("東京", [(0, 2)], [(0, 2)], ["東京"])
    sender = chat("東京", [(0, 1), (0, 2), (1, 2)], [(0, 2)], ["東京"])
    assert align_tokens(receiver, sender) == [2]


def test_empty_message_and_template_tokens_are_not_fused():
    receiver = chat("<s>|<s>hi", [(0, 3), (3, 4), (4, 7), (7, 9)], [(3, 3), (7, 9)], ["", "hi"])
    sender = chat("##hi", [(0, 2), (2, 4)], [(2, 2), (2, 4)], ["", "hi"])
    assert align_tokens(receiver, sender) == [UNALIGNED, UNALIGNED, UNALIGNED, 1]


def test_different_contents_are_refused():
    a = chat("x", [(0, 1)], [(0, 1)], ["x"])
    b = chat("y", [(0, 1)], [(0, 1)], ["y"])
    with pytest.raises(ValueError, match="same messages"):
        align_tokens(a, b)


def test_aligning_the_last_message_only_lets_earlier_messages_differ():
    # the question differs (each sender read its own rephrasing); the answer prefix is the same text
    receiver = chat("[U]the question[A]ans is", [(0, 3), (3, 6), (6, 15), (15, 18), (18, 21), (21, 24)],
                    [(3, 15), (18, 24)], ["the question", "ans is"])
    sender = chat("<u>reworded<a>ans is", [(0, 3), (3, 11), (11, 14), (14, 17), (17, 20)],
                  [(3, 11), (14, 20)], ["reworded", "ans is"])
    with pytest.raises(ValueError, match="same messages"):
        align_tokens(receiver, sender)  # every message aligned: refused
    assert align_tokens(receiver, sender, messages="last") == [UNALIGNED, UNALIGNED, UNALIGNED, UNALIGNED, 3, 4]
    same_question = chat("[U]the question[A]ans is", receiver.offsets, receiver.content_spans, receiver.contents)
    assert align_tokens(receiver, same_question, messages="last") == [UNALIGNED] * 4 + [4, 5]  # earlier tokens left out
    other_prefix = chat("<u>reworded<a>ans was", [(0, 3), (3, 11), (11, 14), (14, 17), (17, 21)],
                        [(3, 11), (14, 21)], ["reworded", "ans was"])
    with pytest.raises(ValueError, match="in the last message"):
        align_tokens(receiver, other_prefix, messages="last")


def test_real_tokenizers_align_content_only(receiver, llama_sender):
    messages = [
        {"role": "system", "content": "user"},  # content equal to a template word
        {"role": "user", "content": "Café 東京 naïve quick fox?"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "déjà vu 🙂"},
    ]
    r = encode_chat(receiver, messages)
    s = encode_chat(llama_sender, messages)
    assert r.text != s.text  # different templates
    for (start, end), content in zip(r.content_spans, r.contents):
        assert r.text[start:end] == content
    for (start, end), content in zip(s.content_spans, s.contents):
        assert s.text[start:end] == content
    alignment = align_tokens(r, s)
    assert len(alignment) == len(r.input_ids)
    for token, target in enumerate(alignment):
        start, end = r.offsets[token]
        in_content = [k for k, (a, b) in enumerate(r.content_spans) if a <= end - 1 < b and end > start]
        if not in_content:
            assert target == UNALIGNED  # template tokens never fused
            continue
        k = in_content[0]
        char_in_message = end - 1 - r.content_spans[k][0]
        sender_char = s.content_spans[k][0] + char_in_message
        s_start, s_end = s.offsets[target]
        # the chosen sender token covers the same character of the same message
        assert s_start <= sender_char < s_end
    # template-level receiver tokens exist and the "user" system message is aligned
    assert UNALIGNED in alignment
    assert sum(a != UNALIGNED for a in alignment) >= 10
