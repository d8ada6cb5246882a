import json

import pytest

from fedrefine.data.conversations import (
    ChatStream,
    TrainingDataError,
    UnusableConversation,
    conversation_to_example,
    number_rows,
    prefill_response,
)
from fedrefine.data.datamodule import C2CDataModule
from fedrefine.data.loading import DataFileError, open_dataset
from fedrefine.data.question_dataset import (
    QuestionDataset,
    load_questions,
    reorder_options,
)
from fedrefine.tasks.multiple_choice import DatasetSchemaError, MultipleChoiceItem


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
    with pytest.raises(UnusableConversation, match="no assistant answer"):
        conversation_to_example({"conversations": [{"from": "human", "value": "no answer"}]})
    with pytest.raises(TrainingDataError, match="'conversations'"):
        conversation_to_example({"text": "wrong schema"})


def test_stream_shards_disjointly_across_ranks_and_counts_skips(tmp_path):
    rows = [conversation(i, system=i % 2 == 0) for i in range(10)] + [{"conversations": [{"from": "human", "value": "x"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    seen = []
    for rank in range(2):
        stream = ChatStream(open_dataset(path, "train"), rank=rank, world_size=2)
        seen.append([e.response for e in stream])
        assert stream.complete_pass.skipped_without_answer == (1 if rank == 0 else 0)  # the answerless row 10 -> rank 0
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"a{i}" for i in range(10))


def test_a_pass_without_usable_rows_fails_naming_the_file_the_rows_and_why(tmp_path):
    answerless = {"conversations": [{"from": "human", "value": "no answer"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [answerless] * 7)
    with pytest.raises(TrainingDataError, match=r"chat.jsonl: none of the 7 rows read is usable for training: 7 x no "
                                                r"assistant answer after a user turn .* \(lines 1, 2, 3, 4, 5 and 2 more\)"):
        list(ChatStream(number_rows(open_dataset(path, "train")), source=path))
    empty = write_jsonl(tmp_path / "empty.jsonl", [conversation(0)])
    with pytest.raises(TrainingDataError, match="no training rows were read"):
        list(ChatStream(number_rows(open_dataset(empty, "train").take(0)), source=empty))


def test_zero_train_samples_is_refused_at_setup(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [conversation(0)])
    data = C2CDataModule(train_path=path, train_samples=0, eval_path=path)
    with pytest.raises(TrainingDataError, match="data.train_samples=0"):
        data.setup("fit")


def test_errors_name_the_file_line_before_shuffling_and_the_expected_schema(tmp_path):
    rows = [conversation(i) for i in range(8)]
    rows[5] = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    questions = write_jsonl(tmp_path / "obqa.jsonl", [obqa(0), obqa(1, "B")])
    data = C2CDataModule(train_path=path, train_samples=8, eval_path=questions, eval_config=None, shuffle_buffer=8, seed=3)
    data.setup("fit")
    with pytest.raises(TrainingDataError, match=r"chat.jsonl line 6 has no 'conversations' field \(it has 'messages' "
                                                r"instead\); chat data needs conversations = \[\{'from'"):
        list(data.train_stream)


def test_pass_counts_are_per_pass_and_resume_skips_what_was_trained(tmp_path):
    rows = [conversation(i) for i in range(6)] + [{"conversations": [{"from": "human", "value": "x"}]}] * 2
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    stream = ChatStream(number_rows(open_dataset(path, "train")), source=path)
    first = [e.response for e in stream]
    assert [e.response for e in stream] == first
    assert stream.passes == 2
    assert stream.complete_pass.as_dict() == {"rows_read": 8, "usable": 6, "skipped_without_answer": 2}
    stream.resume_after(4)
    assert [e.response for e in stream] == first[4:]
    assert [e.response for e in stream] == first  # only the pass after the resume skips


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


def test_unreadable_data_files_are_one_error_naming_the_file_and_the_setting(tmp_path):
    latin1 = tmp_path / "obqa.jsonl"
    latin1.write_bytes(json.dumps(obqa(0), ensure_ascii=False).replace("stem 0", "caf\u00e9").encode("latin-1") + b"\n")
    with pytest.raises(DataFileError, match=r"obqa.jsonl cannot be read \(UnicodeDecodeError.*`data.eval_path`"):
        load_questions(str(latin1), "test", None, option="data.eval_path")
    junk = tmp_path / "obqa.parquet"
    junk.write_bytes(b"not parquet at all" * 10)
    with pytest.raises(DataFileError, match=r"obqa.parquet cannot be read"):
        load_questions(str(junk), "test", None)
    chat = tmp_path / "chat.jsonl"
    chat.write_bytes(b'{"conversations": [{"from": "human", "value": "\xff"}]}\n')
    with pytest.raises(DataFileError, match=r"chat.jsonl cannot be read.*data.train_path"):
        list(ChatStream(open_dataset(str(chat), "train"), source=str(chat)))
