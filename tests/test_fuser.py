import pytest
import torch

from fedrefine.fuser import (
    ConcreteGate,
    Fuser,
    FuserConfig,
    FuserFileError,
    FuserPairMismatchError,
    fuser_parameter_count,
)
from fedrefine.kv.stack import KVStack
from fedrefine.participants import ParticipantIdentity, real_model_config


def identity(hub_id):
    return ParticipantIdentity.from_config(real_model_config(hub_id), hub_id, "main")


def random_layers(ident, length=5, batch=2):
    shape = (ident.num_layers, batch, ident.num_kv_heads, length, ident.head_dim)
    return KVStack(tuple(range(ident.num_layers)), torch.randn(shape), torch.randn(shape))


@pytest.mark.parametrize("sender_name", ["llama_sender", "qwen2_sender"])
def test_fuser_outputs_receiver_shapes_for_heterogeneous_pairs(request, receiver, sender_name):
    sender = request.getfixturevalue(sender_name)
    fuser = Fuser(sender.identity, receiver.identity, FuserConfig(hidden_size=16))
    deltas = fuser(random_layers(sender.identity), random_layers(receiver.identity))
    assert deltas.layers == tuple(range(receiver.identity.num_layers))
    assert deltas.keys.shape == deltas.values.shape == (receiver.identity.num_layers, 2, 2, 5, 16)


def test_a_fuser_that_does_not_read_the_receiver_ignores_its_states(receiver, llama_sender):
    torch.manual_seed(0)
    fuser = Fuser(llama_sender.identity, receiver.identity, FuserConfig(hidden_size=16, reads_receiver=False)).eval()
    for parameter in fuser.parameters():  # the projection starts at zero: make the deltas visible
        torch.nn.init.normal_(parameter, std=0.1)
    for layer in fuser.layers:
        layer.gate.logit.data.fill_(1.0)  # open
    sender_layers = random_layers(llama_sender.identity)
    first = fuser(sender_layers, random_layers(receiver.identity))
    second = fuser(sender_layers, random_layers(receiver.identity))
    assert first.keys.abs().sum() > 0 and first.values.abs().sum() > 0
    torch.testing.assert_close(first.keys, second.keys)
    torch.testing.assert_close(first.values, second.values)
    sender_only = fuser_parameter_count(llama_sender.identity, receiver.identity, fuser.config)
    assert sender_only < fuser_parameter_count(llama_sender.identity, receiver.identity, FuserConfig(hidden_size=16))


def test_reference_size_matches_c2c_and_default_is_slimmer():
    receiver, sender = identity("Qwen/Qwen3-0.6B"), identity("Qwen/Qwen2.5-0.5B-Instruct")
    reference = fuser_parameter_count(sender, receiver, FuserConfig(hidden_size=1024, num_blocks=3))
    default = fuser_parameter_count(sender, receiver, FuserConfig())
    per_layer = reference / receiver.num_layers
    assert 16e6 < per_layer < 18e6  # "~17M parameters per layer" for this pair
    assert default < reference / 5


def test_gate_uses_logistic_noise_so_training_matches_the_eval_threshold():
    gate = ConcreteGate(0.0).train()
    samples = torch.stack([gate(torch.tensor(0.01)) for _ in range(4000)])
    # logistic noise: P(open at logit 0) = 0.5 (Gumbel noise would give 0.63)
    assert abs((samples > 0.5).float().mean().item() - 0.5) < 0.04
    gate.eval()
    assert gate(torch.tensor(1.0)).item() == 0.0
    gate.logit.data.fill_(0.3)
    assert gate(torch.tensor(1.0)).item() == 1.0


def test_temperature_anneals_geometrically(receiver, llama_sender):
    fuser = Fuser(llama_sender.identity, receiver.identity, FuserConfig(temperature_start=1.0, temperature_end=0.01))
    fuser.anneal(0.0)
    assert fuser.temperature.item() == pytest.approx(1.0)
    fuser.anneal(0.5)
    assert fuser.temperature.item() == pytest.approx(0.1)
    fuser.anneal(1.0)
    assert fuser.temperature.item() == pytest.approx(0.01)


def test_closed_gates_skip_layers_and_their_sender_layers(receiver, qwen2_sender):
    fuser = Fuser(qwen2_sender.identity, receiver.identity, FuserConfig(hidden_size=8, layer_map="top_down")).eval()
    fuser.layers[0].gate.logit.data.fill_(-1.0)
    assert fuser.layer_map == [1, 2, 3]
    assert fuser.sender_layers_needed() == [2, 3]
    deltas = fuser(random_layers(qwen2_sender.identity), random_layers(receiver.identity))
    assert deltas.layers == (1, 2)  # layer 0 is skipped
    sent = random_layers(qwen2_sender.identity)
    only_needed = KVStack((2, 3), sent.keys[2:], sent.values[2:])  # what a message carrying only those holds
    again = fuser(only_needed, random_layers(receiver.identity))
    assert again.layers == (1, 2)


def test_save_load_round_trip_and_mismatched_pair_is_refused(receiver, llama_sender, qwen2_sender, tmp_path):
    fuser = Fuser(llama_sender.identity, receiver.identity, FuserConfig(hidden_size=16, dropout=0.0))
    for p in fuser.parameters():
        torch.nn.init.normal_(p, std=0.1)
    for layer in fuser.layers:
        layer.gate.logit.data.fill_(1.0)
    fuser.eval().save(tmp_path / "f")
    assert (tmp_path / "f" / "fuser.safetensors").is_file() and (tmp_path / "f" / "fuser.json").is_file()
    loaded = Fuser.load(tmp_path / "f", llama_sender.identity, receiver.identity).eval()
    s, r = random_layers(llama_sender.identity), random_layers(receiver.identity)
    before, after = fuser(s, r), loaded(s, r)
    assert before.layers == after.layers
    assert torch.equal(before.keys, after.keys) and torch.equal(before.values, after.values)
    with pytest.raises(FuserPairMismatchError) as err:
        Fuser.load(tmp_path / "f", qwen2_sender.identity, receiver.identity)
    message = str(err.value)
    assert llama_sender.identity.key in message and qwen2_sender.identity.key in message
    assert receiver.identity.key in message


def test_load_refuses_tampered_weights(receiver, llama_sender, tmp_path):
    from safetensors.torch import load_file, save_file

    fuser = Fuser(llama_sender.identity, receiver.identity, FuserConfig(hidden_size=16))
    fuser.save(tmp_path)
    tensors = load_file(tmp_path / "fuser.safetensors")
    tensors.pop(next(iter(tensors)))
    save_file(tensors, tmp_path / "fuser.safetensors")
    with pytest.raises(FuserFileError, match=r"fuser.safetensors does not hold the weights .*\(missing "):
        Fuser.load(tmp_path, llama_sender.identity, receiver.identity)


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "other size", "bad json"])
def test_damaged_fuser_files_are_one_error_naming_the_file(receiver, llama_sender, tmp_path, damage):
    Fuser(llama_sender.identity, receiver.identity, FuserConfig(hidden_size=16)).save(tmp_path / "small")
    Fuser(llama_sender.identity, receiver.identity, FuserConfig(hidden_size=24)).save(tmp_path / "large")
    weights, metadata = tmp_path / "small" / "fuser.safetensors", tmp_path / "small" / "fuser.json"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "random bytes":
        weights.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    elif damage == "other size":
        weights.write_bytes((tmp_path / "large" / "fuser.safetensors").read_bytes())
    else:
        metadata.write_text(metadata.read_text()[:40])
    expected = {"truncated": "not a readable safetensors file", "random bytes": "not a readable safetensors file",
                "other size": r"is \(.*\), expected \(", "bad json": "fuser.json is not valid JSON"}[damage]
    with pytest.raises(FuserFileError, match=expected) as error:
        Fuser.load(tmp_path / "small", llama_sender.identity, receiver.identity)
    assert str(tmp_path / "small") in str(error.value) and "\n" not in str(error.value)


def test_a_version_1_fuser_reads_its_positions_as_fuse_at(receiver, llama_sender, tmp_path):
    import json

    fuser = Fuser(llama_sender.identity, receiver.identity, FuserConfig(hidden_size=8, fuse_at="last"))
    fuser.save(tmp_path)
    metadata = json.loads((tmp_path / "fuser.json").read_text())
    assert metadata["version"] == 2 and metadata["config"]["fuse_at"] == "last"
    metadata["version"] = 1  # as written before fuse_at had its name
    metadata["config"]["positions"] = metadata["config"].pop("fuse_at")
    (tmp_path / "fuser.json").write_text(json.dumps(metadata))
    assert Fuser.load(tmp_path, llama_sender.identity, receiver.identity).config.fuse_at == "last"
    metadata["version"] = 7
    (tmp_path / "fuser.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="format version 1 or 2.*version 7"):
        Fuser.load(tmp_path, llama_sender.identity, receiver.identity)


@pytest.mark.parametrize("mode, layer_class", [("residual", "ResidualLayerFuser"), ("concat", "ConcatLayerFuser")])
def test_the_fusion_mode_picks_the_layer_fusers_once(receiver, llama_sender, mode, layer_class):
    fuser = Fuser(llama_sender.identity, receiver.identity, FuserConfig(hidden_size=8, mode=mode))
    assert {type(layer).__name__ for layer in fuser.layers} == {layer_class}


@pytest.mark.parametrize("mode, fuse_keys", [("residual", True), ("residual", False), ("concat", True)])
def test_inference_over_stacked_layers_equals_the_per_layer_loop(receiver, qwen2_sender, mode, fuse_keys):
    torch.manual_seed(3)
    fuser = Fuser(qwen2_sender.identity, receiver.identity, FuserConfig(mode=mode, fuse_keys=fuse_keys, hidden_size=16)).eval()
    for layer in fuser.layers:
        for stream in (layer.key, layer.value):
            if stream is not None:
                torch.nn.init.normal_(stream.projection.weight, std=0.5)
    with torch.no_grad():
        fuser.layers[1].gate.logit.fill_(-1.0)  # a closed gate: skipped (residual) or zeroed values (concat)
    sender = random_layers(qwen2_sender.identity)
    theirs = random_layers(receiver.identity) if mode == "residual" else None
    looped = fuser(sender, theirs)  # gradients on: the per-layer loop
    with torch.no_grad():
        stacked = fuser(sender, theirs)
        assert fuser._stacks.stack is not None and len(fuser._stacks.stack.indices) > 1  # the stacked path ran
    assert stacked.layers == looped.layers == ((0, 1, 2) if mode == "concat" else (0, 2))
    assert (stacked.keys is None) == (looped.keys is None) == (not fuse_keys)
    if fuse_keys:
        torch.testing.assert_close(stacked.keys, looped.keys.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stacked.values, looped.values.detach(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # weights that change (an optimizer step, a load) are re-stacked
        fuser.layers[0].value.projection.bias.add_(1.0)
        again = fuser(sender, theirs)
    assert not torch.allclose(again.values[0], stacked.values[0])


@pytest.mark.parametrize("given", [(1, 2), (0, 2)])  # a consecutive chunk (weight views) and a gap (copies)
def test_inference_over_some_layers_reuses_the_stack_of_every_open_layer(receiver, qwen2_sender, given):
    torch.manual_seed(4)
    fuser = Fuser(qwen2_sender.identity, receiver.identity, FuserConfig(hidden_size=16)).eval()
    for layer in fuser.layers:
        torch.nn.init.normal_(layer.value.projection.weight, std=0.5)
    sender, theirs = random_layers(qwen2_sender.identity), random_layers(receiver.identity).select(given)
    looped = fuser(sender, theirs)  # gradients on: the per-layer loop
    with torch.no_grad():
        fuser(sender, random_layers(receiver.identity))  # stacks every open layer
        whole = fuser._stacks.stack
        stacked = fuser(sender, theirs)
    assert fuser._stacks.stack is whole and whole.indices == (0, 1, 2)  # not re-stacked for the subset
    assert stacked.layers == looped.layers == given
    torch.testing.assert_close(stacked.values, looped.values.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stacked.keys, looped.keys.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stacked", [False, True])
def test_scale_multiplies_each_layers_sample_and_token_deltas(receiver, qwen2_sender, stacked):
    """Residual fusion masks unaligned tokens and weighs a sender by the gate's share through ``scale``, which
    the fuser applies to its per-head weights: the same deltas as scaling them afterwards."""
    torch.manual_seed(5)
    fuser = Fuser(qwen2_sender.identity, receiver.identity, FuserConfig(hidden_size=16)).eval()
    for layer in fuser.layers:
        for stream in (layer.key, layer.value):
            torch.nn.init.normal_(stream.projection.weight, std=0.5)
    sender, theirs = random_layers(qwen2_sender.identity), random_layers(receiver.identity)
    scale = torch.rand(receiver.identity.num_layers, theirs.values.shape[1], theirs.values.shape[3])  # (L_t, B, N)
    scale[:, 0, 1] = 0.0  # a token that reads no sender column
    with torch.set_grad_enabled(not stacked):
        plain, scaled = fuser(sender, theirs), fuser(sender, theirs, scale)
    factor = scale[list(plain.layers)][:, :, None, :, None]  # (R, B, 1, N, 1)
    torch.testing.assert_close(scaled.values, plain.values * factor, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scaled.keys, plain.keys * factor, rtol=1e-5, atol=1e-6)
    assert scaled.values[:, 0, :, 1].abs().sum() == 0
    concat = Fuser(qwen2_sender.identity, receiver.identity, FuserConfig(hidden_size=16, mode="concat")).eval()
    with pytest.raises(ValueError, match="scale is for residual fusion"):
        concat(sender, None, scale)


def test_a_registry_refuses_a_fuser_in_a_misnamed_folder_naming_the_expected_one(receiver, llama_sender, tmp_path):
    from fedrefine.fuser import FuserFileError
    from fedrefine.fuser.registry import FuserRegistry

    registry = FuserRegistry(tmp_path / "registry")
    saved = registry.save(Fuser(llama_sender.identity, receiver.identity, FuserConfig(hidden_size=8)))
    assert FuserRegistry(tmp_path / "registry").has(llama_sender.identity, receiver.identity)
    saved.rename(saved.parent / "llama__to__qwen3")
    with pytest.raises(FuserFileError, match=f"rename the folder to {saved.name}"):
        FuserRegistry(tmp_path / "registry").has(llama_sender.identity, receiver.identity)


def test_a_fuser_reading_keys_and_values_together_feeds_the_senders_keys_into_the_value_deltas(receiver, llama_sender):
    torch.manual_seed(0)
    config = FuserConfig(hidden_size=16, reads_kv_together=True)
    fuser = Fuser(llama_sender.identity, receiver.identity, config).eval()
    for parameter in fuser.parameters():  # the projection starts at zero: make the deltas visible
        torch.nn.init.normal_(parameter, std=0.1)
    sender_dim = llama_sender.identity.num_kv_heads * llama_sender.identity.head_dim
    assert fuser.layers[0].value.input.in_features == 2 * sender_dim + receiver.identity.num_kv_heads * receiver.identity.head_dim
    sender_layers, theirs = random_layers(llama_sender.identity), random_layers(receiver.identity)
    other_keys = KVStack(sender_layers.layers, torch.randn_like(sender_layers.keys), sender_layers.values)
    first, second = fuser(sender_layers, theirs), fuser(other_keys, theirs)
    assert not torch.allclose(first.values, second.values)  # only the sender's keys changed
    separate = Fuser(llama_sender.identity, receiver.identity, FuserConfig(hidden_size=16)).eval()
    torch.testing.assert_close(separate(sender_layers, theirs).values, separate(other_keys, theirs).values)
    assert fuser_parameter_count(llama_sender.identity, receiver.identity, config) > fuser_parameter_count(
        llama_sender.identity, receiver.identity, FuserConfig(hidden_size=16))
    with pytest.raises(ValueError, match="reads_kv_together reads the sender's keys.*fuse_keys true"):
        FuserConfig(reads_kv_together=True, fuse_keys=False)
    with pytest.raises(ValueError, match="reads_kv_together=True"):
        FuserConfig(reads_kv_together=True, variant="c2c_reference")


@pytest.mark.parametrize("num_blocks", [2, 3, 4])
@pytest.mark.parametrize("batch, length", [(1, 1), (2, 5)])  # a few rows (bias by its own product) and many (bias as a weight row)
@pytest.mark.parametrize("together", [False, True])  # each stream reading the sender's [K ; V]
def test_stacked_streams_equal_the_per_layer_loop_at_every_depth(receiver, qwen2_sender, num_blocks, batch, length, together):
    torch.manual_seed(5)
    config = FuserConfig(hidden_size=16, num_blocks=num_blocks, reads_kv_together=together)
    fuser = Fuser(qwen2_sender.identity, receiver.identity, config).eval()
    for layer in fuser.layers:
        for stream in (layer.key, layer.value):
            torch.nn.init.normal_(stream.projection.weight, std=0.5)
            torch.nn.init.normal_(stream.projection.bias, std=0.5)
    sender, theirs = random_layers(qwen2_sender.identity, length, batch), random_layers(receiver.identity, length, batch)
    looped = fuser(sender, theirs)
    with torch.no_grad():
        stacked = fuser(sender, theirs)
    # with a projection block, it and the weight block share one norm, up product and GELU (their up Linears side by side)
    assert (fuser.inference_stack().value.branches_up is not None) == (num_blocks > 2)
    torch.testing.assert_close(stacked.keys, looped.keys.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stacked.values, looped.values.detach(), rtol=1e-5, atol=1e-6)
