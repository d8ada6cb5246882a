"""KV messages on the wire: exact round trips, quantisation error bounds, sizes, and every refusal."""

import struct
from types import SimpleNamespace

import pytest
import torch

from fedrefine.wire import (
    LinkConfig,
    WireFormatError,
    budgeted_layers,
    codec_by_name,
    deserialize_message,
    serialize_message,
)
from fedrefine.wire.codecs import pack, unpack
from fedrefine.wire.message import prefill_message
from fusion_support import fused_logits


def message_of(participant, sent=None, layers=None):
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    return prefill_message(participant, ids, mask, layers, sent)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_packing_round_trips_every_code(bits):
    codes = torch.randint(0, 2**bits, (1001,), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.numel() == -(-1001 * bits // 8)
    assert torch.equal(unpack(packed, bits, 1001), codes)


def test_fp32_round_trip_is_exact_at_the_transmitted_positions_and_the_size_is_the_bytes(llama_sender):
    message = message_of(llama_sender)
    data = serialize_message(message, codec_by_name("fp32"))
    decoded = deserialize_message(data, llama_sender.identity)
    assert decoded.wire_bytes == len(data) == decoded.nbytes
    assert decoded.sender == message.sender and sorted(decoded.layers) == sorted(message.layers)
    assert torch.equal(decoded.positions, message.positions) and torch.equal(decoded.attention_mask, message.attention_mask)
    real = message.attention_mask.bool()
    for j, (keys, values) in message.layers.items():
        assert torch.equal(decoded.layers[j][0].permute(0, 2, 1, 3)[real], keys.permute(0, 2, 1, 3)[real])
        assert torch.equal(decoded.layers[j][1].permute(0, 2, 1, 3)[real], values.permute(0, 2, 1, 3)[real])
    payload = message.nbytes  # in memory: K/V at the real positions only
    assert payload < len(data) < payload + 4096  # header and masks on top of the payload


def test_only_the_sent_positions_travel(llama_sender):
    sent = torch.zeros(2, 6, dtype=torch.long)
    sent[:, -1] = 1
    full, last = (len(serialize_message(message_of(llama_sender, s), codec_by_name("fp32"))) for s in (None, sent))
    decoded = deserialize_message(serialize_message(message_of(llama_sender, sent), codec_by_name("fp32")), llama_sender.identity)
    assert decoded.transmitted_positions == 2 and last < full
    assert torch.equal(decoded.sent, sent)


@pytest.mark.parametrize("name, bound", [("bf16", 2**-8), ("fp16", 2**-11), ("int8", 1 / 127), ("int4", 1 / 7), ("int2", 1.0)])
def test_lossy_codecs_stay_within_their_error_bounds(name, bound):
    torch.manual_seed(0)
    states = torch.randn(4, 300, 16) * torch.linspace(0.1, 5, 16)  # channels of different scales (key outliers)
    for role in ("key", "value"):
        codec = codec_by_name(name, group_size=64)
        back = codec.round_trip(states, role)
        if name.startswith("int"):  # |error| <= scale / 2 = absmax of the group / (2 * qmax)
            group_max = states.abs().max()
            assert (back - states).abs().max() <= bound * group_max / 2 + 1e-3
        else:
            assert ((back - states).abs() <= bound * states.abs() + 1e-6).all()
    assert codec_by_name("int4").round_trip(states, "key").shape == states.shape


def test_int4_is_about_a_quarter_of_bf16_on_the_wire(llama_sender):
    message = message_of(llama_sender)
    sizes = {name: len(serialize_message(message, codec_by_name(name))) for name in ("fp32", "bf16", "int8", "int4")}
    assert sizes["int4"] < sizes["int8"] < sizes["bf16"] < sizes["fp32"]


def test_a_message_for_another_sender_or_an_untrained_pair_is_refused(llama_sender, qwen2_sender):
    data = serialize_message(message_of(llama_sender), codec_by_name("int8"))
    with pytest.raises(WireFormatError, match=r"claims to come from .*llama.* but this link's sender is .*qwen2"):
        deserialize_message(data, qwen2_sender.identity)
    with pytest.raises(WireFormatError, match="No fuser of this receiver was trained for sender"):
        deserialize_message(data, llama_sender.identity, trained_for={qwen2_sender.identity.key})


def test_truncated_oversized_and_tampered_messages_are_refused_naming_the_sender(llama_sender):
    data = serialize_message(message_of(llama_sender), codec_by_name("int4"))
    name = llama_sender.identity.name_or_path
    with pytest.raises(WireFormatError, match=rf"from {name} is truncated"):
        deserialize_message(data[:40], llama_sender.identity)
    with pytest.raises(WireFormatError, match=rf"from {name} is truncated or corrupted"):
        deserialize_message(data[:-10], llama_sender.identity)
    with pytest.raises(WireFormatError, match="over the limit"):
        deserialize_message(data, llama_sender.identity, max_bytes=len(data) - 1)
    (size,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + size].decode()
    bumped = data[: 8 + size].replace(b'"version":"1"', b'"version":"9"') + data[8 + size :]
    assert bumped != data
    with pytest.raises(WireFormatError, match="version '9'; this receiver reads fedrefine.kv_message version 1"):
        deserialize_message(bumped, llama_sender.identity)
    lying = header.replace('\\"transmitted\\": 10', '\\"transmitted\\": 11')
    assert lying != header
    forged = struct.pack("<Q", len(lying.encode())) + lying.encode() + data[8 + size :]
    with pytest.raises(WireFormatError, match="header says 11 transmitted positions"):
        deserialize_message(forged, llama_sender.identity)


def test_the_layer_budget_keeps_the_most_important_layers():
    assert budgeted_layers([0, 1, 2, 3], {0: 0.1, 1: 3.0, 2: -1.0, 3: 2.0}, 0.5) == [1, 3]
    assert budgeted_layers([0, 1, 2], {}, None) == [0, 1, 2]
    assert budgeted_layers([4, 7], {4: 1.0, 7: 0.0}, 0.01) == [4]  # at least one layer
    with pytest.raises(ValueError, match="layer_budget must be in"):
        LinkConfig(layer_budget=1.5)
    with pytest.raises(ValueError, match="Unknown link codec 'int3'"):
        LinkConfig(codec="int3")


# --- links inside a fused receiver ----------------------------------------------------------------


def fused_pair(receiver, sender, **config):
    from test_fusion import PROMPTS, make_pair

    pair = make_pair(receiver, sender, **config).eval()
    return pair, pair.encoder.collate([pair.encoder.encode(m, r) for m, r in PROMPTS])


def test_a_lossless_link_fuses_exactly_what_in_process_messages_fuse(receiver, llama_sender):
    pair, batch = fused_pair(receiver, llama_sender)
    with torch.no_grad():
        in_process = fused_logits(pair, batch)
        over_the_wire = fused_logits(pair, batch, link=LinkConfig(codec="fp32"))
        int8 = fused_logits(pair, batch, link=LinkConfig(codec="int8"))
    assert torch.equal(over_the_wire, in_process)
    assert not torch.equal(int8, in_process) and torch.allclose(int8, in_process, atol=0.05)
    message = pair.sending.send(llama_sender.name, batch.senders[llama_sender.name], LinkConfig(codec="int8"))
    assert message.wire_bytes is not None and message.nbytes == message.wire_bytes


def test_the_layer_budget_sends_fewer_layers_and_the_fuser_skips_the_rest(receiver, llama_sender):
    pair, batch = fused_pair(receiver, llama_sender)
    full = pair.sending.send(llama_sender.name, batch.senders[llama_sender.name])
    budget = LinkConfig(layer_budget=0.5)
    half = pair.sending.send(llama_sender.name, batch.senders[llama_sender.name], budget)
    importance = pair.fuser_for(llama_sender.name).sender_layer_importance()
    assert len(half.layers) == -(-len(full.layers) // 2) and half.nbytes < full.nbytes
    assert min(importance[j] for j in half.layers) >= max(importance[j] for j in full.layers if j not in half.layers)
    with torch.no_grad():
        assert torch.isfinite(fused_logits(pair, batch, link=budget)).all()


def test_links_apply_in_training_only_when_asked(receiver, llama_sender):
    from fedrefine.evaluation import EvaluationConfig
    from fedrefine.recipes import FusionModule

    def training_link(link):  # what a recipe's training step sends over
        return FusionModule.training_link.fget(SimpleNamespace(evaluation=EvaluationConfig(link=link)))

    assert training_link(LinkConfig(codec="int4")) is None
    asked = LinkConfig(codec="int4", in_training=True)
    assert training_link(asked) is asked
    pair, batch = fused_pair(receiver, llama_sender)
    loss = fused_logits(pair.train(), batch, link=asked)[:, :-1].float().mean()
    loss.backward()
    assert all(p.grad is None for p in pair.sender_models.parameters())
    assert any(p.grad is not None for p in pair.fusers.parameters())


@pytest.mark.parametrize("codec", ["fp32", "int4"])
def test_tensors_whose_shapes_contradict_the_sender_identity_are_refused(llama_sender, codec):
    from fedrefine.wire.message import KVMessage

    message = message_of(llama_sender)
    narrow = {j: (k[:, :-1], v[:, :-1]) for j, (k, v) in message.layers.items()}  # one KV head short
    forged = KVMessage(message.sender, narrow, message.positions, message.attention_mask)
    with pytest.raises(WireFormatError, match=rf"from {llama_sender.identity.name_or_path} is malformed: .* do not decode"):
        deserialize_message(serialize_message(forged, codec_by_name(codec)), llama_sender.identity)
    extra = KVMessage(message.sender, {**message.layers, 99: message.layers[0]}, message.positions, message.attention_mask)
    with pytest.raises(WireFormatError, match="are not layers of a"):
        deserialize_message(serialize_message(extra, codec_by_name(codec)), llama_sender.identity)


def test_a_layer_budget_is_refused_for_concat_fusion_before_anything_is_sent(receiver, llama_sender):
    from fedrefine.evaluation import EvaluationConfig, Evaluator
    from fedrefine.tasks.routes import parse_routes

    pair, batch = fused_pair(receiver, llama_sender, mode="concat")
    pair.sending.check(LinkConfig(codec="int8"))  # codecs are fine
    budget = LinkConfig(layer_budget=0.5)
    with pytest.raises(ValueError, match="link.layer_budget applies to residual fusion"):
        Evaluator(pair, parse_routes(["c2c"], pair.sender_names), EvaluationConfig(link=budget))
    with pytest.raises(ValueError, match="link.layer_budget applies to residual fusion"):
        pair.send(batch, link=budget)
