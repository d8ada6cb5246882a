"""The C2C reference's fusers in FedRefine: the import, the c2c_reference variant, the reference's token alignment
and every refusal."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import QWEN2_SPEC, RECEIVER_SPEC
from fedrefine.fuser import Fuser, FuserConfig, FuserRegistry
from fedrefine.fuser.c2c_import import C2CImportError, export_c2c, import_c2c
from fedrefine.fuser.c2c_import import main as import_main
from fedrefine.fuser.layers import ConcreteGate
from fedrefine.fusion import FusedReceiver
from fedrefine.kv.stack import KVStack
from fedrefine.participants import ParticipantIdentity, build_tiny_participant
from fedrefine.participants.reference_align import Reencoder, reference_alignment
from fedrefine.tasks.multiple_choice import encode_question

REPO = Path(__file__).parent.parent
SENDER = ParticipantIdentity("tiny:s", "r1", "Qwen2ForCausalLM", 3, 2, 8, 16, 100)
RECEIVER = ParticipantIdentity("tiny:t", "r1", "Qwen3ForCausalLM", 4, 2, 16, 32, 100)


def _benchmark():
    """benchmarks/c2c_import.py: its reference-format writer and its restatement of the reference's forward."""
    spec = importlib.util.spec_from_file_location("c2c_import_benchmark", REPO / "benchmarks" / "c2c_import.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _random_reference_fuser(seed=0, **config):
    torch.manual_seed(seed)
    fuser = Fuser(SENDER, RECEIVER, FuserConfig(variant="c2c_reference", hidden_size=16, layer_map="top_down", **config))
    with torch.no_grad():
        for p in fuser.parameters():
            p.normal_(0, 0.5)
    return fuser.eval()


@pytest.fixture
def checkpoint(tmp_path):
    return export_c2c(_random_reference_fuser(), tmp_path / "final")


def test_export_then_import_keeps_every_tensor_and_records_the_source(tmp_path):
    fuser = _random_reference_fuser()
    for dtype in ("float32", "bfloat16"):
        report = import_c2c(export_c2c(fuser, tmp_path / dtype, dtype), SENDER, RECEIVER)
        for (name, ours), theirs in zip(fuser.named_parameters(), report.fuser.parameters()):
            expected = ours if dtype == "float32" else ours.bfloat16().float()
            assert torch.equal(theirs, expected), name
        assert report.parameters == sum(p.numel() for p in fuser.parameters())
    imported = report.fuser
    assert imported.config.token_alignment == "reference" and imported.config.gate_noise == "gumbel"
    assert imported.layer_map == fuser.layer_map == [0, 0, 1, 2]  # the reference aligns the top layers
    saved = imported.save(tmp_path / "fuser")
    metadata = json.loads((saved / "fuser.json").read_text())
    assert metadata["source"]["class"] == "C2CProjector" and metadata["source"]["path"].endswith("bfloat16")
    loaded = FuserRegistry(tmp_path / "registry").save(imported)
    again = FuserRegistry(tmp_path / "registry").get(SENDER, RECEIVER)
    assert again.source == imported.source and loaded.is_dir()
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), imported.parameters()))


@pytest.mark.parametrize("pair", ["qwen2_same_tokenizer", "llama_other_tokenizer"])
def test_imported_fuser_computes_the_restated_reference_forward(pair, tmp_path, receiver, llama_sender):
    bench = _benchmark()
    sender = build_tiny_participant(QWEN2_SPEC, tokenizer=receiver.tokenizer) if pair.startswith("qwen2") else llama_sender
    result = bench.run_pair(pair, receiver, sender, tmp_path)  # asserts where the reference fuses
    assert result["roundtrip_max_abs_diff"] == 0
    assert result["logits_max_abs_diff"] <= 1e-5
    assert all(q["fusion_changes_logits_by"] > 1e-2 for q in result["questions"])  # the fusion does something
    assert result["open_gates"]["key"][1] is False and result["open_gates"]["value"][1] is True


def test_stacked_inference_gates_the_key_and_value_streams_apart():
    fuser = _random_reference_fuser()
    with torch.no_grad():
        for layer, (key, value) in enumerate([(1.0, 1.0), (-1.0, 1.0), (-1.0, -1.0), (1.0, -1.0)]):
            fuser.layers[layer].key_gate.logit.fill_(key)
            fuser.layers[layer].value_gate.logit.fill_(value)
    assert fuser.open_layers() == [True, True, False, True]
    sender = KVStack((0, 1, 2), torch.randn(3, 2, 2, 5, 8), torch.randn(3, 2, 2, 5, 8))
    receiver = KVStack((0, 1, 2, 3), torch.randn(4, 2, 2, 5, 16), torch.randn(4, 2, 2, 5, 16))
    with torch.no_grad():
        stacked = fuser(sender, receiver)
    with torch.enable_grad():
        looped = fuser(sender, receiver)
    assert stacked.layers == looped.layers == (0, 1, 3)
    torch.testing.assert_close(stacked.keys, looped.keys.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stacked.values, looped.values.detach(), rtol=1e-5, atol=1e-5)
    assert stacked.keys[1].abs().max() == 0 and stacked.values[1].abs().max() > 0  # layer 1: values only
    assert stacked.values[2].abs().max() == 0 and stacked.keys[2].abs().max() > 0  # layer 3: keys only


def test_the_variant_trains_with_either_gate_noise(receiver, qwen2_sender):
    for noise in ("gumbel", "logistic"):
        sender_identity, receiver_identity = qwen2_sender.identity, receiver.identity
        fuser = Fuser(sender_identity, receiver_identity, FuserConfig(variant="c2c_reference", hidden_size=16, gate_noise=noise))
        model = FusedReceiver(receiver, [qwen2_sender], [fuser]).train()
        example = model.encoder.encode([{"role": "user", "content": "Where is Paris?"}], response="In France.")
        batch = model.encoder.collate([example])
        sent = model.send(batch)
        model(batch, sent.messages).logits.sum().backward()
        layer = fuser.layers[-1]
        assert layer.value.input.weight.grad is not None and layer.value_gate.logit.grad is not None
        assert receiver.model.lm_head.weight.grad is None  # the participants stay frozen


def test_gumbel_gate_noise_opens_more_often_than_its_inference_threshold():
    temperature = torch.tensor(1e-3)
    opened = {}
    for noise in ("logistic", "gumbel"):
        torch.manual_seed(0)
        gate = ConcreteGate(0.0, noise).train()
        opened[noise] = gate(temperature, (20000,)).gt(0.5).float().mean().item()
        assert gate.eval()(temperature).item() == 0.0  # logit 0 is closed at inference
    assert abs(opened["logistic"] - 0.5) < 0.02
    assert abs(opened["gumbel"] - (1 - 1 / torch.e)) < 0.02  # the reference's 0.63


def test_reference_alignment_with_the_same_vocabulary_reads_the_receivers_ids(receiver):
    sender = build_tiny_participant(QWEN2_SPEC, tokenizer=receiver.tokenizer)
    fuser = Fuser(sender.identity, receiver.identity, FuserConfig(token_alignment="reference", hidden_size=8))
    model = FusedReceiver(receiver, [sender], [fuser])
    bench = _benchmark()
    chat = encode_question(receiver, bench.QUESTIONS[0]).chat
    example = model.encoder.encode_chats(chat, {sender.name: encode_question(sender, bench.QUESTIONS[0]).chat})
    read = example.senders[sender.name]
    assert read.input_ids == example.receiver_ids
    suffix = len(receiver.tokenizer("The correct answer is", add_special_tokens=False)["input_ids"])
    assert read.alignment == list(range(len(chat.input_ids) - suffix)) + [-1] * suffix  # the template too, not the prefix


@pytest.mark.parametrize("strategy", ["first", "longest"])
def test_reference_alignment_reencodes_each_content_token_for_another_tokenizer(strategy, receiver, llama_sender):
    bench = _benchmark()
    item = bench.QUESTIONS[1]
    theirs, ours = encode_question(receiver, item).chat, encode_question(llama_sender, item).chat
    ids, alignment = reference_alignment(theirs, ours, Reencoder(receiver.tokenizer, llama_sender.tokenizer, strategy))
    (start, end), (sender_start, sender_end) = theirs.content_spans[0], ours.content_spans[0]
    content = [i for i, (a, b) in enumerate(theirs.offsets) if b > a and start <= b - 1 < end]
    assert [i for i, j in enumerate(alignment) if j >= 0] == content  # template tokens and the prefix are not fused
    tokenizer = llama_sender.tokenizer
    for i in content:
        text = receiver.tokenizer.decode([theirs.input_ids[i]], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        pieces = tokenizer.encode(text, add_special_tokens=False)
        lengths = [len(tokenizer.decode([p], skip_special_tokens=False, clean_up_tokenization_spaces=False)) for p in pieces]
        expected = pieces[0] if strategy == "first" else pieces[lengths.index(max(lengths))]
        assert ids[alignment[i]] == expected
    template = [t for t, (a, b) in zip(ours.input_ids, ours.offsets) if not (b > a and sender_start <= b - 1 < sender_end)]
    assert [t for j, t in enumerate(ids) if j not in set(alignment)] == template  # the sender's own template kept


def test_the_reference_alignment_refuses_different_texts(receiver, llama_sender):
    bench = _benchmark()
    theirs = encode_question(receiver, bench.QUESTIONS[0]).chat
    ours = encode_question(llama_sender, bench.QUESTIONS[1]).chat
    with pytest.raises(ValueError, match="same messages"):
        reference_alignment(theirs, ours, None)


# --- refusals: one line naming the file and the fix ------------------------------------------------------------
def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_checkpoint_for_another_pair_is_refused(checkpoint):
    wider = ParticipantIdentity("tiny:t", "r1", "Qwen3ForCausalLM", 4, 4, 16, 64, 100)
    with pytest.raises(C2CImportError) as err:
        import_c2c(checkpoint, SENDER, wider)
    assert "projector_0.json" in _one_line(err) and "--receiver" in str(err.value)
    deeper = ParticipantIdentity("tiny:t", "r1", "Qwen3ForCausalLM", 6, 2, 16, 32, 100)
    with pytest.raises(C2CImportError, match=r"projector_config\.json maps receiver layers \[0, 1, 2, 3\]"):
        import_c2c(checkpoint, SENDER, deeper)
    narrow = ParticipantIdentity("tiny:s", "r1", "Qwen2ForCausalLM", 3, 1, 8, 16, 100)
    with pytest.raises(C2CImportError, match="sender K/V width 2 x 8"):
        import_c2c(checkpoint, narrow, RECEIVER)


def test_a_layer_map_fedrefine_cannot_hold_or_of_several_senders_is_refused(checkpoint):
    path = checkpoint / "projector_config.json"
    path.write_text(json.dumps({"0": {"1": {"0": [[2, 0]], "1": [[0, 1]], "2": [[1, 2]], "3": [[2, 3]]}}}))
    with pytest.raises(C2CImportError, match=r"layer map \[2, 0, 1, 2\] is none of top_down, bottom_up, uniform"):
        import_c2c(checkpoint, SENDER, RECEIVER)
    path.write_text(json.dumps({"0": {"1": {"0": [[0, 0]]}, "2": {"0": [[0, 0]]}}}))
    with pytest.raises(C2CImportError, match="import one sender's checkpoint at a time") as err:
        import_c2c(checkpoint, SENDER, RECEIVER)
    _one_line(err)


def test_an_unknown_projector_class_is_refused(checkpoint):
    path = checkpoint / "projector_2.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"class": "AllInOneProjector"}))
    with pytest.raises(C2CImportError) as err:
        import_c2c(checkpoint, SENDER, RECEIVER)
    assert "projector_2.json holds a 'AllInOneProjector' projector" in _one_line(err)


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda d: (d / "projector_1.pt").unlink(), r"projector_1\.pt is missing"),
        (lambda d: (d / "projector_config.json").unlink(), r"projector_config\.json is missing"),
        (lambda d: (d / "projector_3.json").write_text('{"class": "C2C'), r"projector_3\.json is not valid JSON"),
        (lambda d: (d / "projector_2.pt").write_bytes((d / "projector_2.pt").read_bytes()[:4000]),
         r"projector_2\.pt is \d+ bytes but its projector's weights take \d+: the file is truncated"),
        (lambda d: (d / "projector_0.pt").write_bytes(b"\0" * (d / "projector_0.pt").stat().st_size),
         r"projector_0\.pt is not a readable torch state dict"),
    ],
    ids=["missing weights", "missing layer map", "truncated json", "truncated weights", "corrupted weights"],
)
def test_a_missing_or_truncated_file_is_refused(checkpoint, damage, expected):
    damage(checkpoint)
    with pytest.raises(C2CImportError, match=expected) as err:
        import_c2c(checkpoint, SENDER, RECEIVER)
    _one_line(err)


def test_tensors_that_do_not_fit_the_json_or_are_not_finite_are_refused(checkpoint):
    state = torch.load(checkpoint / "projector_1.pt", weights_only=True)
    state["value_gate_logit"] = torch.tensor(float("nan"))
    torch.save(state, checkpoint / "projector_1.pt")
    with pytest.raises(C2CImportError, match=r"projector_1\.pt does not hold .*value_gate_logit is not finite"):
        import_c2c(checkpoint, SENDER, RECEIVER)
    del state["key_in.bias"]
    state["value_gate_logit"] = torch.tensor(1.0)
    torch.save(state, checkpoint / "projector_1.pt")
    with pytest.raises(C2CImportError, match="missing key_in.bias"):
        import_c2c(checkpoint, SENDER, RECEIVER)


def test_settings_that_the_reference_variant_cannot_compute_are_refused():
    with pytest.raises(ValueError, match="mode='concat'"):
        FuserConfig(variant="c2c_reference", mode="concat")
    with pytest.raises(ValueError, match="fuse_keys=False"):
        FuserConfig(variant="c2c_reference", fuse_keys=False)
    with pytest.raises(ValueError, match="token_alignment 'reference' .* fuse_at 'last'"):
        FuserConfig(token_alignment="reference", fuse_at="last")


def test_sequential_fusion_refuses_fusers_of_two_key_frames(receiver, qwen2_sender, llama_sender):
    fusers = [Fuser(qwen2_sender.identity, receiver.identity, FuserConfig(variant="c2c_reference", hidden_size=8)),
              Fuser(llama_sender.identity, receiver.identity, FuserConfig(hidden_size=8))]
    model = FusedReceiver(receiver, [qwen2_sender, llama_sender], fusers, combine="sequential")
    batch = model.encoder.collate([model.encoder.encode([{"role": "user", "content": "Where is Paris?"}])])
    with pytest.raises(ValueError, match="combine to 'parallel'"):
        model(batch, model.send(batch).messages)


# --- the command ------------------------------------------------------------------------------------------------
def test_the_command_imports_into_a_directory_or_a_registry(tmp_path, capsys):
    receiver, sender = build_tiny_participant(RECEIVER_SPEC), build_tiny_participant(QWEN2_SPEC)
    for participant, name in ((receiver, "receiver"), (sender, "sender")):
        participant.model.config.save_pretrained(tmp_path / name)
    fuser = Fuser(sender.identity, receiver.identity, FuserConfig(variant="c2c_reference", hidden_size=8, layer_map="top_down"))
    source = export_c2c(fuser, tmp_path / "final")
    models = ["--receiver", str(tmp_path / "receiver"), "--sender", str(tmp_path / "sender"), "--sender-name", "qwen2"]
    import_main([str(source), *models, "--registry", str(tmp_path / "registry")])
    assert "Imported" in capsys.readouterr().out
    ((sender_key, receiver_key),) = FuserRegistry(tmp_path / "registry").pairs()
    assert sender_key == "qwen2@local" and receiver_key == f"{tmp_path / 'receiver'}@local"
    import_main([str(source), *models, "--out", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "fuser.json").read_text())["config"]["variant"] == "c2c_reference"


def test_the_command_shows_a_refusal_as_one_line(tmp_path, monkeypatch, capsys):
    from fedrefine import cli

    missing = tmp_path / "nothing"
    monkeypatch.setattr(sys, "argv", ["fedrefine", "import-c2c", str(missing), "--receiver", "Qwen/Qwen3-0.6B",
                                      "--sender", "Qwen/Qwen2.5-0.5B-Instruct", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("fedrefine: error:") and "\n" not in error


# --- the reference's multiple-choice protocol ---------------------------------------------------------------------
def test_the_reference_prompt_letters_options_by_position_and_reads_letter_logits(receiver):
    from fedrefine.tasks.multiple_choice import MultipleChoiceItem, question_text

    item = MultipleChoiceItem("q", "What is 1 + 1?", ("one", "two", "three"), ("1", "2", "3"), "2")
    text = question_text(item, prompt_style="c2c_reference")
    assert text.startswith("Accurately answer the following question:\n\nWhat is 1 + 1?\n\nChoices:\nA. one\nB. two\n")
    assert text.endswith('"The correct answer is A/B/C/D".\n- Do not include any explanations, additional text, or '
                         "punctuation besides the answer.\n\nThe correct answer is")
    encoded = encode_question(receiver, item, prompt_style="c2c_reference")
    letters = [receiver.tokenizer.encode(f" {letter}", add_special_tokens=False)[0] for letter in "ABC"]
    assert list(encoded.option_token_ids) == letters  # the reference's option ids: the first token of " A", " B", ...
    assert encoded.chat.text.endswith("<|im_start|>assistant\nThe correct answer is A")
    assert receiver.tokenizer.decode(encoded.chat.input_ids).endswith("assistant\nThe correct answer is")


@pytest.mark.parametrize("mode", ["logits", "generate"])
def test_an_imported_fuser_is_evaluated_with_the_reference_protocol(mode, tmp_path, receiver):
    from fedrefine.data.question_dataset import QuestionDataset
    from fedrefine.evaluation import EvaluationConfig, Evaluator
    from fedrefine.tasks.routes import parse_routes

    bench = _benchmark()
    sender = build_tiny_participant(QWEN2_SPEC, tokenizer=receiver.tokenizer)
    bench.write_reference_checkpoint(tmp_path, sender.identity, receiver.identity, 16, 16, 3, torch.float32, 0, {})
    model = FusedReceiver(receiver, [sender], [import_c2c(tmp_path, sender.identity, receiver.identity).fuser]).eval()
    config = EvaluationConfig(answer_mode=mode, prompt_style="c2c_reference", max_new_tokens=4)
    routes = parse_routes(["receiver", "c2c"], model.sender_names)
    rows = {r["route"]: r for r in Evaluator(model, routes, config).run(QuestionDataset(bench.QUESTIONS), batch_size=2).rows()}
    assert set(rows) == {"receiver", "c2c"}
    assert all(r["questions"] == 2 and r["failed"] == 0 and 0 <= r["accuracy"] <= 1 for r in rows.values())


def test_the_reference_protocol_refuses_what_the_reference_does_not_do(receiver, qwen2_sender):
    from fedrefine.evaluation import EvaluationConfig
    from fedrefine.evaluation.question_batch import QuestionEncoder
    from fedrefine.tasks.routes import RouteError, parse_routes

    with pytest.raises(ValueError, match="answer_mode logits or generate"):
        EvaluationConfig(answer_mode="cloze", prompt_style="c2c_reference")
    model = FusedReceiver(receiver, [qwen2_sender], [Fuser(qwen2_sender.identity, receiver.identity, FuserConfig(hidden_size=8))])
    with pytest.raises(RouteError, match="drop \\['t2t'\\]"):
        QuestionEncoder(model, parse_routes(["c2c", "t2t"], model.sender_names), prompt_style="c2c_reference")
