import json
import math

import lightning as L
import pytest
import torch

from conftest import LLAMA_SPEC, QWEN2_SPEC, RECEIVER_SPEC
from fedrefine.data.datamodule import C2CDataModule
from fedrefine.fuser import Fuser, FuserConfig
from fedrefine.fuser.registry import FuserRegistry, MissingFuserError
from fedrefine.fusion import FusedReceiver, SenderKV, SenderStateGate, SourceGate, load_gate
from fedrefine.fusion.sender_gate import read_column
from fedrefine.kv.cache import positions_from_mask
from fedrefine.participants.sources import TinyParticipant
from fedrefine.recipes import CoC2CModule, FederationModule
from fedrefine.recipes.base import response_losses
from fusion_support import fused_logits

QUESTIONS = [
    [{"role": "user", "content": "Which of these would let the most heat travel through? A metal spoon."}],
    [{"role": "user", "content": "the lazy dog"}],
]


def randomize(fuser, std=0.3):
    for layer in fuser.layers:
        for stream in (layer.key, layer.value):
            torch.nn.init.normal_(stream.projection.weight, std=std)
    return fuser


def fused(receiver, senders, mode="residual", combine="parallel", gate=None):
    config = FuserConfig(hidden_size=16, dropout=0.0, mode=mode)
    fusers = [randomize(Fuser(s.identity, receiver.identity, config)) for s in senders]
    return FusedReceiver(receiver, senders, fusers, combine, gate).eval()


def receiver_alone(receiver, batch):
    with torch.no_grad():
        return receiver.model(batch.receiver_input_ids, attention_mask=batch.receiver_attention_mask,
                              position_ids=positions_from_mask(batch.receiver_attention_mask)).logits[:, -1]


def test_registry_lists_loads_lazily_and_refuses_missing_pairs(tmp_path, receiver, llama_sender, qwen2_sender):
    registry = FuserRegistry(tmp_path / "registry")
    registry.save(Fuser(llama_sender.identity, receiver.identity, FuserConfig(hidden_size=8)))
    registry.save(Fuser(receiver.identity, qwen2_sender.identity, FuserConfig(hidden_size=8)))
    fresh = FuserRegistry(tmp_path / "registry")
    assert fresh.pairs() == sorted([(llama_sender.identity.key, receiver.identity.key),
                                    (receiver.identity.key, qwen2_sender.identity.key)])
    assert len(fresh.missing([receiver.identity, llama_sender.identity, qwen2_sender.identity])) == 4
    loaded = fresh.get(llama_sender.identity, receiver.identity)
    assert fresh.get(llama_sender.identity, receiver.identity) is loaded  # loaded once, kept
    with pytest.raises(MissingFuserError, match=f"no fuser for {qwen2_sender.identity.key} -> {receiver.identity.key}"):
        fresh.get(qwen2_sender.identity, receiver.identity)


@pytest.mark.parametrize("mode", ["residual", "concat"])
def test_no_selected_sender_is_exactly_the_receiver_alone(mode, receiver, llama_sender, qwen2_sender):
    model = fused(receiver, [llama_sender, qwen2_sender], mode)
    batch = model.encoder.collate([model.encoder.encode(q) for q in QUESTIONS])
    with torch.no_grad():
        none = model(batch).logits[:, 0]
        some = fused_logits(model, batch)[:, 0]
    assert torch.allclose(none, receiver_alone(receiver, batch), atol=1e-5)
    assert not torch.allclose(some, none, atol=1e-3)


@pytest.mark.parametrize("mode", ["residual", "concat"])
def test_unselected_senders_never_run(mode, receiver, llama_sender, qwen2_sender):
    model = fused(receiver, [llama_sender, qwen2_sender], mode)
    batch = model.encoder.collate([model.encoder.encode(q) for q in QUESTIONS])
    calls = {"llama": 0, "qwen2": 0}
    hooks = [llama_sender.model.register_forward_hook(lambda *a: calls.__setitem__("llama", calls["llama"] + 1)),
             qwen2_sender.model.register_forward_hook(lambda *a: calls.__setitem__("qwen2", calls["qwen2"] + 1))]
    try:
        with torch.no_grad():
            fused_logits(model, batch, [qwen2_sender.name])
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"llama": 0, "qwen2": 1}


def test_concat_mode_with_different_texts_stacks_senders_ahead_of_the_receiver(receiver, llama_sender, qwen2_sender):
    model = fused(receiver, [llama_sender, qwen2_sender], "concat")
    long_text = [{"role": "user", "content": "A much longer text for the first sender, with many more words in it."}]
    examples = [
        model.encoder.encode(QUESTIONS[0], sender_messages={llama_sender.name: long_text, qwen2_sender.name: QUESTIONS[1]}),
        model.encoder.encode(QUESTIONS[1], sender_messages={llama_sender.name: QUESTIONS[1], qwen2_sender.name: long_text}),
    ]
    batch = model.encoder.collate(examples)
    assert all(s.alignment is None for s in batch.senders.values())  # concat needs no alignment
    messages = model.send(batch, model.sender_names).messages
    context = model.strategy.prepare(
        receiver, batch.receiver_input_ids, batch.receiver_attention_mask, model.fusion_inputs(batch, messages)
    )
    prefix, prefix_mask = context.cache, context.prefix_mask
    assert context.consumed == 0  # the receiver runs its whole prompt over the prefix
    expected_length = sum(s.input_ids.shape[1] for s in batch.senders.values())
    assert prefix.layers[0].keys.shape == (2, 2, expected_length, 16)
    assert prefix_mask.sum(1).tolist() == [sum(len(e.senders[n].input_ids) for n in e.senders) for e in examples]
    # keys carry the receiver's rotary embedding at positions 0..P-1 of each sample's real prefix
    entries = model.fuser_for(llama_sender.name)(SenderKV(llama_sender, messages[llama_sender.name]).unrotated(torch.float32))
    from fedrefine.kv.rope import apply_rotary, rotary_cos_sin
    cos, sin = rotary_cos_sin(receiver.rotary_embedding, positions_from_mask(prefix_mask), torch.float32)
    width = batch.senders[llama_sender.name].input_ids.shape[1]
    rotated = apply_rotary(entries.keys[0], cos[:, :, :width], sin[:, :, :width])
    assert torch.allclose(prefix.layers[0].keys[:, :, :width], rotated, atol=1e-5)
    # padding handled per sample: each sample alone gives the same answer as in the batch
    with torch.no_grad():
        together = fused_logits(model, batch)[:, 0]
        for i, example in enumerate(examples):
            assert torch.allclose(together[i], fused_logits(model, model.encoder.collate([example]))[0, 0], atol=1e-4)


def test_parallel_and_sequential_agree_for_one_sender_and_differ_for_two(receiver, llama_sender, qwen2_sender):
    torch.manual_seed(0)
    parallel = fused(receiver, [llama_sender, qwen2_sender], combine="parallel")
    sequential = FusedReceiver(receiver, [llama_sender, qwen2_sender], list(parallel.fusers), "sequential").eval()
    batch = parallel.encoder.collate([parallel.encoder.encode(q) for q in QUESTIONS])
    with torch.no_grad():
        one = [fused_logits(m, batch, [llama_sender.name])[:, 0] for m in (parallel, sequential)]
        two = [fused_logits(m, batch)[:, 0] for m in (parallel, sequential)]
    assert torch.allclose(one[0], one[1], atol=1e-6)
    assert not torch.allclose(two[0], two[1], atol=1e-5)


@pytest.mark.parametrize("mode", ["residual", "concat"])
def test_gating_network_gets_gradients_and_weighs_each_subset(mode, receiver, llama_sender, qwen2_sender):
    gate = SourceGate(receiver.identity.hidden_size, receiver.identity.num_layers, 2, hidden_size=8)
    torch.nn.init.normal_(gate.net[-1].weight, std=0.1)
    model = fused(receiver, [llama_sender, qwen2_sender], mode, gate=gate).train()
    batch = model.encoder.collate([model.encoder.encode(q, response="ok") for q in QUESTIONS])
    fused_logits(model, batch).float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.parameters())
    weights = gate(receiver.model, batch.receiver_input_ids, batch.receiver_attention_mask, [1])
    assert weights.shape == (2, receiver.identity.num_layers, 1) and (weights < 1).all() and (weights > 0).all()


@pytest.mark.parametrize("mode", ["residual", "concat"])
def test_a_sender_state_gate_reads_each_senders_message_at_the_read_column(mode, receiver, llama_sender, qwen2_sender):
    model = fused(receiver, [llama_sender, qwen2_sender], mode)
    gate = SenderStateGate(list(model.fusers), hidden_size=8)
    for reader in gate.readers:
        torch.nn.init.normal_(reader[-1].weight, std=0.5)
    model.source_gate = gate
    batch = model.encoder.collate([model.encoder.encode(q, response="ok") for q in QUESTIONS])
    names = [llama_sender.name, qwen2_sender.name]
    with torch.no_grad():
        messages = model.send(batch, names).messages
    inputs = model.fusion_inputs(batch, messages)
    assert [i.weight.shape for i in inputs] == [(2, receiver.identity.num_layers)] * 2
    assert all(((i.weight > 0) & (i.weight < 1)).all() for i in inputs)
    message = messages[qwen2_sender.name]
    column = read_column(batch.senders[qwen2_sender.name].alignment, message)
    if mode == "concat":  # no alignment: the sender's own last prompt token
        assert column.tolist() == [message.attention_mask.shape[1] - 1] * 2
    weights = gate([message], [column], [1])  # (B, L, 1)
    torch.testing.assert_close(weights[..., 0], inputs[1].weight)
    elsewhere = _changed_values(message, column, at_column=False)
    torch.testing.assert_close(gate([elsewhere], [column], [1]), weights)  # other columns are not read
    assert not torch.allclose(gate([_changed_values(message, column, at_column=True)], [column], [1]), weights)


def _changed_values(message, column, at_column):
    """``message`` with every carried layer's values changed at ``column`` (B,) or everywhere else."""
    import dataclasses

    layers = {}
    for layer, (keys, values) in message.layers.items():
        hit = torch.zeros(values.shape[0], values.shape[2], dtype=torch.bool)
        hit[torch.arange(values.shape[0]), column] = True
        where = (hit if at_column else ~hit)[:, None, :, None]
        layers[layer] = (keys, torch.where(where, values + 1.0, values))
    return dataclasses.replace(message, layers=layers)


def test_a_closed_sender_state_gate_leaves_the_receiver_alone_and_trains_only_itself(receiver, llama_sender, qwen2_sender):
    model = fused(receiver, [llama_sender, qwen2_sender])
    model.fusers.requires_grad_(False)
    model.source_gate = gate = SenderStateGate(list(model.fusers), hidden_size=8)
    for reader in gate.readers:  # the output layer starts at zero, which would stop gradients before it
        torch.nn.init.normal_(reader[-1].weight, std=0.1)
    batch = model.encoder.collate([model.encoder.encode(q, response="ok") for q in QUESTIONS])
    gate.train()
    fused_logits(model, batch).float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.parameters())
    assert all(p.grad is None for p in model.fusers.parameters())
    with torch.no_grad():
        for reader in gate.readers:
            reader[-1].bias.fill_(-60.0)  # every weight 0: nothing is added
        closed = fused_logits(model, batch)
        alone = model(batch).logits
    torch.testing.assert_close(closed, alone, rtol=1e-5, atol=1e-5)


def test_a_sender_state_gate_saves_and_loads_only_for_its_fusers(tmp_path, receiver, llama_sender, qwen2_sender):
    fusers = list(fused(receiver, [llama_sender, qwen2_sender]).fusers)
    gate = SenderStateGate(fusers, hidden_size=8)
    torch.nn.init.normal_(gate.readers[0][-1].weight)
    gate.save(tmp_path / "gate", fusers)
    loaded = SenderStateGate(fusers, hidden_size=8).load_weights(tmp_path / "gate", fusers)
    assert all(torch.equal(a, b) for a, b in zip(gate.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError, match="trained for other senders"):
        SenderStateGate(fusers[::-1], hidden_size=8).load_weights(tmp_path / "gate", fusers[::-1])
    with pytest.raises(ValueError, match="trained for other hidden size"):
        SenderStateGate(fusers, hidden_size=4).load_weights(tmp_path / "gate", fusers)
    with pytest.raises(FileNotFoundError, match="gate_reads: prompt"):
        SenderStateGate(fusers, hidden_size=8).load_weights(tmp_path, fusers)


def test_a_saved_gate_of_either_kind_is_loaded_with_its_own_sizes_from_its_files(tmp_path, receiver, llama_sender, qwen2_sender):
    fusers = list(fused(receiver, [llama_sender, qwen2_sender]).fusers)
    by_senders = SenderStateGate(fusers, hidden_size=6)
    torch.nn.init.normal_(by_senders.readers[1][-1].weight)
    by_prompt = SourceGate(receiver.identity.hidden_size, receiver.identity.num_layers, 2, hidden_size=5)
    torch.nn.init.normal_(by_prompt.net[-1].weight)
    for gate, directory in ((by_senders, tmp_path / "senders"), (by_prompt, tmp_path / "prompt")):
        gate.save(directory, fusers)
        loaded = load_gate(directory, fusers)
        assert type(loaded) is type(gate) and loaded.hidden_size == gate.hidden_size
        assert all(torch.equal(a, b) for a, b in zip(gate.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError, match="trained for other senders"):
        load_gate(tmp_path / "senders", fusers[::-1])
    with pytest.raises(FileNotFoundError, match=r"No gating network at .*fedrefine fit"):
        load_gate(tmp_path, fusers)


def test_the_benefit_objective_teaches_each_sender_whether_it_alone_helped(receiver, llama_sender, qwen2_sender, tmp_path):
    """Targets come from each sender fused alone at full weight (gate bypassed) against the receiver alone; the
    loss is the BCE of every layer's logit against them, so a gate that already says so has a small loss."""
    sources = tiny_federation(tmp_path / "reg")
    module = FederationModule(sources, "receiver", ["llama", "qwen2"], str(tmp_path / "reg"), gating=True,
                              gate_reads="senders", gate_objective="benefit")
    module.train()  # as fit runs it: the frozen fusers stay in eval mode (hard gates)
    fused = module.fused
    batch = fused.encoder.collate([fused.encoder.encode(q, response="ok fine") for q in QUESTIONS])
    with torch.no_grad():
        alone = response_losses(fused(batch).logits, batch)
        messages = fused.send(batch).messages
        helps = torch.stack(
            [response_losses(fused(batch, {n: messages[n]}, gated=False).logits, batch) < alone for n in ("llama", "qwen2")], -1
        )
    module.log = lambda *args, **kwargs: None  # outside a trainer
    for reader in fused.source_gate.readers:
        reader[-1].bias.data.fill_(0.0)
    chance = module.benefit_loss(batch)
    assert chance.item() == pytest.approx(math.log(2), abs=1e-5)  # every logit 0
    for slot, reader in enumerate(fused.source_gate.readers):  # a gate that says the right thing per sender
        reader[-1].bias.data.fill_(8.0 if helps[:, slot].all() else -8.0 if not helps[:, slot].any() else 0.0)
    assert module.benefit_loss(batch) < chance
    with pytest.raises(ValueError, match="gate_reads: senders"):
        FederationModule(sources, "receiver", ["llama", "qwen2"], str(tmp_path / "reg"), gating=True, gate_objective="benefit")


def test_subset_probability_one_fuses_every_sender_and_out_of_range_is_refused(tmp_path):
    sources = tiny_federation(tmp_path / "reg", randomized=False)
    registry = FuserRegistry(tmp_path / "reg")
    everyone = FederationModule(sources, "receiver", ["llama", "qwen2"], str(registry.root), subset_probability=1.0)
    assert all(everyone.random_subset() == ["llama", "qwen2"] for _ in range(20))
    halves = FederationModule(sources, "receiver", ["llama", "qwen2"], str(registry.root))
    assert len({tuple(halves.random_subset()) for _ in range(50)}) == 3  # every non-empty subset comes up
    with pytest.raises(ValueError, match="subset_probability must be in"):
        FederationModule(sources, "receiver", ["llama", "qwen2"], str(registry.root), subset_probability=0.0)


def tiny_federation(registry_dir, randomized=True):
    """Sources of a tiny receiver and two senders, with their fusers (random projections: fusion changes
    outputs) saved in a registry at ``registry_dir``."""
    sources = {"receiver": TinyParticipant(RECEIVER_SPEC), "llama": TinyParticipant(LLAMA_SPEC),
               "qwen2": TinyParticipant(QWEN2_SPEC)}
    registry = FuserRegistry(registry_dir)
    loaded = {name: source.load() for name, source in sources.items()}
    for name in ("llama", "qwen2"):
        fuser = Fuser(loaded[name].identity, loaded["receiver"].identity, FuserConfig(hidden_size=8))
        registry.save(randomize(fuser) if randomized else fuser)
    return sources


def _chat_file(tmp_path, n=16):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"Say {w}"},
                                                         {"from": "gpt", "value": f"{w} {w}"}]}) + "\n"
                            for w in ["fox", "dog", "spoon", "heat"] * (n // 4)))
    for split in ("validation", "test"):
        (tmp_path / f"obqa_{split}.jsonl").write_text("".join(json.dumps({"id": str(i), "question_stem": "Which conducts heat?",
                                         "choices": {"text": ["metal", "wood", "cloth", "glass"], "label": list("ABCD")},
                                         "answerKey": "A"}) + "\n" for i in range(4)))
    return C2CDataModule(str(path), n, str(tmp_path / "obqa_{split}.jsonl"), None, batch_size=4, eval_batch_size=4)


def _trainer(tmp_path, **kwargs):
    return L.Trainer(**({"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                         "enable_model_summary": False, "default_root_dir": tmp_path, "limit_val_batches": 0} | kwargs))


def test_co_c2c_trains_both_directions(tmp_path):
    module = CoC2CModule(TinyParticipant(RECEIVER_SPEC), TinyParticipant(LLAMA_SPEC),
                         FuserConfig(hidden_size=16, dropout=0.0), learning_rate=1e-2, registry=str(tmp_path / "reg"))
    before = {role: [p.clone() for p in m.fusers.parameters()] for role, m in module.directions.items()}
    _trainer(tmp_path, max_steps=2).fit(module, _chat_file(tmp_path))
    for role, model in module.directions.items():
        assert any(not torch.equal(a, b) for a, b in zip(before[role], model.fusers.parameters())), role
    assert len(FuserRegistry(tmp_path / "reg").pairs()) == 2  # both directions exported
    prefixes = ("directions.first.fusers.", "directions.second.fusers.")
    assert set(module.state_dict()) and all(k.startswith(prefixes) for k in module.state_dict())


@pytest.mark.parametrize("gate_reads, objective", [("prompt", "answer"), ("senders", "answer"), ("senders", "benefit")])
def test_federation_module_trains_only_the_gating_network_and_reports_each_sender(tmp_path, gate_reads, objective):
    sources = tiny_federation(tmp_path / "reg")
    with pytest.raises(MissingFuserError):
        FederationModule(sources, "llama", ["receiver"], str(tmp_path / "reg"))
    module = FederationModule(sources, "receiver", ["llama", "qwen2"], str(tmp_path / "reg"), gating=True,
                              gate_reads=gate_reads, gate_objective=objective, export_dir=str(tmp_path / "gate"))
    if objective == "benefit":  # the output layer starts at zero; give the earlier layers a gradient
        for reader in module.fused.source_gate.readers:
            torch.nn.init.normal_(reader[-1].weight, std=0.1)
    module.train()  # frozen fusers stay as at test time (hard gates); only the gate trains
    assert module.fused.source_gate.training and not any(m.training for m in module.fused.fusers.modules())
    fusers_before = [p.clone() for p in module.fused.fusers.parameters()]
    gate_before = [p.clone() for p in module.fused.source_gate.parameters()]
    _trainer(tmp_path, max_steps=3).fit(module, _chat_file(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(fusers_before, module.fused.fusers.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(gate_before, module.fused.source_gate.parameters()))
    saved = {"prompt": "source_gate", "senders": "sender_state_gate"}[gate_reads]
    assert (tmp_path / "gate" / f"{saved}.safetensors").is_file()
    reloaded = FederationModule(sources, "receiver", ["llama", "qwen2"], str(tmp_path / "reg"), gate_reads=gate_reads,
                                gate_path=str(tmp_path / "gate"))
    assert all(torch.equal(a, b) for a, b in zip(module.fused.source_gate.state_dict().values(),
                                                 reloaded.fused.source_gate.state_dict().values()))
    _trainer(tmp_path).test(module, _chat_file(tmp_path))
    assert [r["route"] for r in module.results()] == ["receiver", "c2c:llama", "c2c:qwen2", "c2c"]
    assert all(r["questions"] == 4 for r in module.results())


def test_prior_and_measured_sender_selection():
    from fedrefine.federation.selection import MeasuredSelection, PriorSelection
    from fedrefine.tasks.multiple_choice import MultipleChoiceItem

    def item(i, category):
        return MultipleChoiceItem(str(i), "q", ("a", "b"), ("A", "B"), "A", category)

    prior = PriorSelection({"colour": ["llama"]}, default=["qwen2"])
    assert prior.select(item(0, "colour")) == ["llama"] and prior.select(item(1, None)) == ["qwen2"]
    items = [item(i, "colour" if i < 4 else "city") for i in range(8)]
    receiver = [False, False, True, False, True, True, False, False]
    senders = {"llama": [True, True, True, False, False, True, False, False],   # colour 3/4, city 1/4
               "qwen2": [False, True, True, False, True, True, True, True]}    # colour 2/4, city 4/4
    measured = MeasuredSelection.from_results(items, receiver, senders)
    assert measured.ranking == {"colour": ["llama", "qwen2"], "city": ["qwen2"]}  # city: llama does not beat 2/4
    assert MeasuredSelection.from_results(items, receiver, senders, max_senders=1).select(items[0]) == ["llama"]


def test_auto_route_uses_the_selection_and_reports_choices(tmp_path):
    from fedrefine.federation.selection import PriorSelection

    sources = tiny_federation(tmp_path / "reg")
    datamodule = _chat_file(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "obqa_test.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["category"] = "heat" if i % 2 else "other"
    (tmp_path / "obqa_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    module = FederationModule(sources, "receiver", ["llama", "qwen2"], str(tmp_path / "reg"),
                              selection=PriorSelection({"heat": ["llama"]}, default=[]))
    _trainer(tmp_path).test(module, datamodule)
    results = {r["route"]: r for r in module.results()}
    assert "c2c:auto" in results
    saved = json.loads((tmp_path / "test_results.json").read_text())["selected_senders"]
    assert saved == {"0": [], "1": ["llama"], "2": [], "3": ["llama"]}
    # the auto route answers "heat" questions like c2c:llama and the others like the receiver alone
    per_q = {route: dict(rows) for route, rows in module.report.per_question.items()}
    for question, senders in saved.items():
        reference = "c2c:llama" if senders else "receiver"
        assert per_q["c2c:auto"][question] == per_q[reference][question]


def test_a_gating_network_saves_with_its_format_and_loads_only_for_its_pair(tmp_path, receiver, llama_sender, qwen2_sender):
    gate = SourceGate(receiver.identity.hidden_size, receiver.identity.num_layers, 2, hidden_size=8)
    torch.nn.init.normal_(gate.net[-1].weight, std=0.1)
    fusers = list(fused(receiver, [llama_sender, qwen2_sender]).fusers)  # the pairs it weighs, in order
    gate.save(tmp_path / "gate", fusers)
    metadata = json.loads((tmp_path / "gate" / "source_gate.json").read_text())
    assert (metadata["format"], metadata["version"], metadata["hidden_size"]) == ("fedrefine.source_gate", 1, 8)
    assert metadata["senders"] == [llama_sender.identity.to_dict(), qwen2_sender.identity.to_dict()]
    loaded = SourceGate(receiver.identity.hidden_size, receiver.identity.num_layers, 2, hidden_size=8)
    loaded.load_weights(tmp_path / "gate", fusers)
    assert all(torch.equal(a, b) for a, b in zip(gate.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError, match="another receiver or sender list"):
        loaded.load_weights(tmp_path / "gate", fusers[::-1])
    with pytest.raises(ValueError, match="sizes"):
        SourceGate(receiver.identity.hidden_size, receiver.identity.num_layers, 2, hidden_size=4).load_weights(
            tmp_path / "gate", fusers)
    metadata.pop("format")
    (tmp_path / "gate" / "source_gate.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="not a FedRefine gating network"):
        loaded.load_weights(tmp_path / "gate", fusers)


@pytest.mark.parametrize("mode, strategy", [("residual", "ResidualFusion"), ("concat", "ConcatFusion")])
def test_a_receiver_chooses_its_fusion_strategy_once_from_its_fusers(mode, strategy, receiver, llama_sender, qwen2_sender):
    model = fused(receiver, [llama_sender, qwen2_sender], mode)
    assert type(model.strategy).__name__ == strategy and model.mode == mode
    assert model.encoder.aligns == (mode == "residual")
    mixed = [Fuser(s.identity, receiver.identity, FuserConfig(hidden_size=8, mode=m))
             for s, m in ((llama_sender, "residual"), (qwen2_sender, "concat"))]
    with pytest.raises(ValueError, match="one fusion mode"):
        FusedReceiver(receiver, [llama_sender, qwen2_sender], mixed)


@pytest.mark.parametrize("mode", ["residual", "concat"])
def test_concurrent_sender_prefills_give_the_serial_logits(mode, receiver, llama_sender, qwen2_sender):
    serial = fused(receiver, [llama_sender, qwen2_sender], mode=mode)
    concurrent = FusedReceiver(receiver, [llama_sender, qwen2_sender], list(serial.fusers),
                               concurrent_senders=True).eval()
    encoded = [serial.encoder.encode(q) for q in QUESTIONS]
    batch = serial.encoder.collate(encoded)
    with torch.no_grad():
        expected = fused_logits(serial, batch)
        assert torch.equal(fused_logits(concurrent, batch), expected)
        one = [llama_sender.name]
        assert torch.equal(fused_logits(concurrent, batch, one), fused_logits(serial, batch, one))
    outcome, own = concurrent.sending.send_all(batch, [llama_sender.name, qwen2_sender.name], meanwhile=lambda: "receiver ran")
    assert own == "receiver ran" and list(outcome.messages) == [llama_sender.name, qwen2_sender.name]
