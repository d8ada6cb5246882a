import json

import lightning as L
import pytest
import torch

from conftest import LLAMA_SPEC, RECEIVER_SPEC
from fedrefine.data.conversations import ChatExample
from fedrefine.data.datamodule import C2CDataModule
from fedrefine.evaluation import EvaluationConfig
from fedrefine.fuser import FuserConfig, FuserPairMismatchError
from fedrefine.participants import TinySpec
from fedrefine.participants.sources import TinyParticipant
from fedrefine.recipes import C2CModule
from fedrefine.recipes.base import response_loss
from fedrefine.settings import SettingsError
from fusion_support import fused_logits

FACTS = [("metal spoon", "conducts heat"), ("wool scarf", "keeps you warm"), ("glass cup", "breaks easily"),
         ("rubber band", "stretches"), ("iron nail", "rusts"), ("wooden stick", "floats")]


def make_module(**kwargs):
    kwargs.setdefault("fuser", FuserConfig(hidden_size=32, dropout=0.0))
    return C2CModule(TinyParticipant(RECEIVER_SPEC), TinyParticipant(LLAMA_SPEC), **kwargs)


def chat_examples():
    return [ChatExample([{"role": "user", "content": f"What about the {t}?"}], f"The {t} {fact}.") for t, fact in FACTS]


def write_data(tmp_path, conversations=48, questions=6):
    chat = tmp_path / "chat.jsonl"
    with chat.open("w") as f:
        for i in range(conversations):
            thing, fact = FACTS[i % len(FACTS)]
            f.write(json.dumps({"conversations": [{"from": "human", "value": f"What about the {thing}?"},
                                                  {"from": "gpt", "value": f"The {thing} {fact}."}]}) + "\n")
    for split in ("validation", "test"):
        with (tmp_path / f"obqa_{split}.jsonl").open("w") as f:
            for i in range(questions):
                f.write(json.dumps({"id": f"{split}{i}", "question_stem": f"What is true of the {FACTS[i][0]}?",
                                    "choices": {"text": [FACTS[(i + k) % 6][1] for k in range(4)], "label": list("ABCD")},
                                    "answerKey": "A"}) + "\n")
    return C2CDataModule(str(chat), conversations, str(tmp_path / "obqa_{split}.jsonl"), None, batch_size=4, eval_batch_size=4)


def trainer(tmp_path, **kwargs):
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0)
    return L.Trainer(**(defaults | kwargs))


def test_loss_covers_the_response_tokens_only(tmp_path):
    module = make_module().eval()
    batch = module.encode_chat_batch(chat_examples()[:3])
    full_ids = torch.cat((batch.receiver_input_ids, batch.response_ids), 1)
    full_mask = torch.cat((batch.receiver_attention_mask, batch.response_mask), 1)
    from fedrefine.kv.cache import positions_from_mask
    with torch.no_grad():
        for layer in module.fuser.layers:  # closed gates: the loss is the receiver's own
            layer.gate.logit.fill_(-1.0)
        loss = response_loss(fused_logits(module.fused, batch), batch)
        logits = module.fused.receiver_model(full_ids, attention_mask=full_mask, position_ids=positions_from_mask(full_mask)).logits
    prompt_len = batch.receiver_input_ids.shape[1]
    manual, count = 0.0, 0
    for i in range(3):
        for j in range(batch.response_ids.shape[1]):
            if batch.response_mask[i, j]:
                manual += torch.nn.functional.cross_entropy(logits[i, prompt_len - 1 + j], batch.response_ids[i, j], reduction="sum")
                count += 1
    assert count == int(batch.response_mask.sum()) and count < int(full_mask.sum())
    assert loss.item() == pytest.approx(manual.item() / count, rel=1e-5)


def test_one_training_step_changes_only_the_fuser(tmp_path):
    module = make_module()
    frozen = {n: p.clone() for n, p in [*module.fused.receiver_model.named_parameters(), *module.fused.sender_models[0].named_parameters()]}
    fuser_before = {n: p.clone() for n, p in module.fuser.named_parameters()}
    trainer(tmp_path, max_steps=2).fit(module, write_data(tmp_path))
    after = dict([*module.fused.receiver_model.named_parameters(), *module.fused.sender_models[0].named_parameters()])
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)
    changed = [n for n, p in module.fuser.named_parameters() if not torch.equal(fuser_before[n], p)]
    assert changed and all(not p.requires_grad for p in after.values())
    assert not module.fused.receiver_model.training  # the LLMs never enter train mode
    assert (tmp_path / "fuser" / "fuser.safetensors").is_file()  # exported automatically


def test_short_training_run_lowers_the_loss(tmp_path):
    torch.manual_seed(0)
    module = make_module(learning_rate=3e-3, warmup_fraction=0.0)
    batch = module.encode_chat_batch(chat_examples())
    module.eval()
    with torch.no_grad():
        before = response_loss(fused_logits(module.fused, batch), batch).item()
    trainer(tmp_path, max_steps=40).fit(module, write_data(tmp_path))
    module.eval()
    with torch.no_grad():
        after = response_loss(fused_logits(module.fused, batch), batch).item()
    assert after < before - 0.3, (before, after)


def test_checkpoint_holds_only_the_fuser_and_resumes(tmp_path):
    data = write_data(tmp_path)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    first = make_module()
    trainer(tmp_path, max_steps=3, enable_checkpointing=True, callbacks=[checkpoint]).fit(first, data)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 3
    assert saved["state_dict"] and all(k.startswith("fused.fusers.0.") for k in saved["state_dict"])
    assert saved["optimizer_states"] and saved["lr_schedulers"]
    resumed = make_module()
    trainer(tmp_path, max_steps=5).fit(resumed, write_data(tmp_path), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.global_step == 5
    # loading into another pair is refused with both pairs named
    other = C2CModule(TinyParticipant(RECEIVER_SPEC), TinyParticipant(TinySpec("other", "qwen2", seed=5)),
                      fuser=FuserConfig(hidden_size=32))
    with pytest.raises(FuserPairMismatchError, match="tiny:llama-sender.*tiny:other"):
        other.on_load_checkpoint(saved)


def test_max_length_below_every_prompt_is_a_clear_error():
    module = make_module(max_length=4)
    with pytest.raises(ValueError, match="model.max_length=4 is smaller than the receiver prompt"):
        module.encode_chat_batch(chat_examples())


def test_long_responses_are_truncated_and_counted():
    module = make_module()
    prompt_len = len(module.fused.encoder.encode(chat_examples()[0].messages).receiver_ids)
    module.chat_batches.max_length = prompt_len + 2
    batch = module.encode_chat_batch(chat_examples()[:1])
    assert batch.response_ids.shape[1] == 2
    assert module.chat_batches.counts["truncated_responses"] == 1 and module.chat_batches.counts["truncated_response_tokens"] > 0


def test_evaluation_never_skips_a_question(tmp_path, monkeypatch):
    import fedrefine.evaluation.question_batch as question_batch

    real = question_batch.encode_question

    def flaky(participant, item, *args, **kwargs):
        if item.id == "test2":
            raise ValueError("cannot encode this one")
        return real(participant, item, *args, **kwargs)

    monkeypatch.setattr(question_batch, "encode_question", flaky)
    module = make_module(evaluation=EvaluationConfig(
        test_routes=["receiver", "sender", "c2c", "c2c_mismatched", "c2c_random_kv", "c2c_reordered"]))
    trainer(tmp_path).test(module, write_data(tmp_path))
    rows = {r["route"]: r for r in module.results()}
    assert set(rows) == {"receiver", "sender", "c2c", "c2c_mismatched", "c2c_random_kv", "c2c_reordered"}
    for row in rows.values():
        assert row["questions"] == 6 and row["failed"] == 1
        assert row["accuracy"] <= 5 / 6  # the failed question counts as wrong
    assert module.report.failures == [("test2", "ValueError: cannot encode this one")]
    saved = json.loads((tmp_path / "test_results.json").read_text())
    assert saved["failures"] and len(saved["rows"]) == 6


def test_checkpoints_follow_the_declared_trainable_parts_not_attribute_names():
    module = make_module()
    keys = set(module.state_dict())
    assert keys == {f"fused.fusers.0.{k}" for k in module.fuser.state_dict()}

    class Renamed(C2CModule):  # the fused receiver under another attribute name
        def __init__(self, **kwargs):
            super().__init__(TinyParticipant(RECEIVER_SPEC), TinyParticipant(LLAMA_SPEC), **kwargs)
            self.pair = self.__dict__["_modules"].pop("fused")

        @property
        def fused(self):
            return self.pair

    renamed = Renamed(fuser=FuserConfig(hidden_size=32, dropout=0.0))
    assert set(renamed.state_dict()) == {f"pair.fusers.0.{k}" for k in renamed.fuser.state_dict()}

    class Undeclared(C2CModule):  # a trainable part outside the module tree cannot be checkpointed
        def trainable_modules(self):
            return [torch.nn.Linear(2, 2)]

    with pytest.raises(ValueError, match="not its submodules"):
        Undeclared(TinyParticipant(RECEIVER_SPEC), TinyParticipant(LLAMA_SPEC), fuser=FuserConfig(hidden_size=8)).state_dict()


def test_a_saved_fuser_refuses_fuser_settings_that_differ_from_its_own(tmp_path):
    make_module().fuser.save(tmp_path / "fuser")
    reloaded = make_module(fuser=None, fuser_path=str(tmp_path / "fuser"))  # no fuser settings: the saved ones
    assert reloaded.fuser.config == FuserConfig(hidden_size=32, dropout=0.0)
    assert reloaded.hparams["fuser"]["hidden_size"] == 32
    with pytest.raises(SettingsError, match=r"model.fuser.hidden_size=64 \(saved: 32\).*drop those model.fuser"):
        make_module(fuser=FuserConfig(hidden_size=64, dropout=0.0), fuser_path=str(tmp_path / "fuser"))


def test_last_token_fusion_without_the_answer_prefix_is_refused_naming_both_settings(tmp_path):
    last = FuserConfig(hidden_size=32, dropout=0.0, fuse_at="last")
    with pytest.raises(SettingsError, match="fuse_at=last.*model.evaluation.prefill_answer=true"):
        make_module(fuser=last).setup("test")
    module = make_module(fuser=last, evaluation=EvaluationConfig(prefill_answer=True))
    module.setup("test")  # evaluation alone is fine; training also needs the data's response prefix
    with pytest.raises(SettingsError, match="data.response_prefill"):
        trainer(tmp_path, max_steps=1).fit(module, write_data(tmp_path))
