import json

import pytest

from fedrefine.data.conversations import ChatStream, conversation_to_example, prefill_response
from fedrefine.data.loading import open_dataset
from fedrefine.data.question_dataset import (
    QuestionDataset,
    load_questions,
    reorder_options,
)
from fedrefine.multiple_choice import DatasetSchemaError, MultipleChoiceItem


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def conversation(i, system=False):
    turns = [{"from": "system", "value": "sys"}] if system else []
    return {"conversations": [*turns, {"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}


def obqa(i, answer="A", labels="ABCD"):
    return {"id": f"q{i}", "question_stem": f"stem {i}", "choices": {"text": list("wxyz"), "label": list(labels)}, "answerKey": answer}


def test_conversation_drops_system_turns_and_supervises_the_last_answer():
    row = {"conversations": [
        {"from": "system", "value": "be nice"},
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
        {"from": "human", "value": "and?"}, {"from": "gpt", "value": "bye"},
    ]}
    example = conversation_to_example(row)
    assert example.messages == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}
    ]
    assert example.response == "bye"
    assert conversation_to_example({"conversations": [{"from": "human", "value": "no answer"}]}) is None
    with pytest.raises(ValueError, match="'conversations'"):
        conversation_to_example({"text": "wrong schema"})


def test_stream_shards_disjointly_across_ranks_and_counts_skips(tmp_path):
    rows = [conversation(i, system=i % 2 == 0) for i in range(10)] + [{"conversations": [{"from": "human", "value": "x"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    seen = []
    for rank in range(2):
        stream = ChatStream(open_dataset(path, "train"), rank=rank, world_size=2)
        seen.append([e.response for e in stream])
        assert stream.skipped == (1 if rank == 0 else 0)  # the answerless row is row 10 -> rank 0
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"a{i}" for i in range(10))


def test_local_split_placeholder_and_missing_file(tmp_path):
    write_jsonl(tmp_path / "obqa_test.jsonl", [obqa(0), obqa(1, "B")])
    items = load_questions(str(tmp_path / "obqa_{split}.jsonl"), "test", None)
    assert [i.answer_key for i in items] == ["A", "B"]
    with pytest.raises(FileNotFoundError, match="data.eval_path"):
        load_questions(str(tmp_path / "missing_{split}.jsonl"), "test", None, option="data.eval_path")


def test_offline_hub_dataset_names_the_local_option(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="data.train_path"):
        open_dataset("teknium/OpenHermes-2.5", "train", option="data.train_path")


def test_schema_errors_name_the_row_and_the_fix(tmp_path):
    bad = obqa(0)
    del bad["choices"]
    path = write_jsonl(tmp_path / "bad.jsonl", [obqa(1), bad])
    with pytest.raises(DatasetSchemaError, match=r"row 1 is missing field\(s\) \['choices'\]"):
        load_questions(path, "test", None)
    with pytest.raises(DatasetSchemaError, match="answerKey 'E' is not among the option labels"):
        MultipleChoiceItem.from_row(obqa(2, answer="E"))


def test_controls_pair_each_question_with_another_letter_and_reordered_options():
    items = [MultipleChoiceItem.from_row(obqa(i, answer="ABCA"[i])) for i in range(4)]
    dataset = QuestionDataset(items)
    for index in range(4):
        entry = dataset[index]
        assert entry.mismatched.answer_key != entry.item.answer_key
        assert entry.mismatched is items[(index + 2) % 4]  # searched from half the set away
        assert entry.reordered.answer_key != entry.item.answer_key
        assert entry.reordered.choices[entry.reordered.answer_index] == entry.item.choices[entry.item.answer_index]
    assert reorder_options(items[0], 4).choices == items[0].choices


def test_response_prefill_moves_the_answers_fixed_start_into_the_prompt():
    example = conversation_to_example(
        {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "The correct answer is red."}]}
    )
    prefilled = prefill_response(example, "The correct answer is")
    assert prefilled.messages[-1] == {"role": "assistant", "content": "The correct answer is"}
    assert prefilled.messages[:-1] == example.messages and prefilled.response == " red."
    with pytest.raises(ValueError, match="response_prefill"):
        prefill_response(example, "Answer:", where="chat row 7")
