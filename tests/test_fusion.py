import pytest
import torch

from fedrefine.cache import positions_from_mask
from fedrefine.fuser import Fuser, FuserConfig
from fedrefine.fusion import FusedReceiver

PROMPTS = [
    ([{"role": "user", "content": "Which of these would let the most heat travel through? A metal spoon."}], "A metal spoon"),
    ([{"role": "user", "content": "Café 東京 quick fox?"}], "B"),
    ([{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "the lazy dog"}], "ok"),
]


def make_pair(receiver, sender, scale=0.3, **config):
    fuser = Fuser(sender.identity, receiver.identity, FuserConfig(hidden_size=16, dropout=0.0, **config))
    for layer in fuser.layers:  # leave the zero init so that fusion visibly changes outputs
        for stream in (layer.key, layer.value):
            torch.nn.init.normal_(stream.projection.weight, std=scale)
    return FusedReceiver(receiver, [sender], [fuser])


@pytest.mark.parametrize("sender_name", ["llama_sender", "qwen2_sender"])
def test_fused_logits_for_heterogeneous_pair(request, receiver, sender_name):
    pair = make_pair(receiver, request.getfixturevalue(sender_name)).eval()
    batch = pair.collate([pair.encode(m, r) for m, r in PROMPTS])
    with torch.no_grad():
        fused, alone = pair(batch), pair(batch, fuse=False)
    assert fused.shape == (3, 1 + batch.response_ids.shape[1], len(receiver.tokenizer))
    assert torch.isfinite(fused).all()
    assert not torch.allclose(fused, alone)


def test_padding_is_handled_per_sample(receiver, llama_sender):
    pair = make_pair(receiver, llama_sender).eval()
    examples = [pair.encode(m, r) for m, r in PROMPTS]
    with torch.no_grad():
        batched = pair(pair.collate(examples))
        for i, example in enumerate(examples):
            alone = pair(pair.collate([example]))
            length = alone.shape[1]
            assert torch.allclose(batched[i, :length], alone[0], atol=1e-4), i


def test_closed_gates_give_exactly_the_receiver_alone(receiver, llama_sender):
    pair = make_pair(receiver, llama_sender).eval()
    for layer in pair.fusers[0].layers:
        layer.gate.logit.data.fill_(-2.0)
    batch = pair.collate([pair.encode(m, r) for m, r in PROMPTS])
    calls = []
    hook = llama_sender.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            fused = pair(batch)
    finally:
        hook.remove()
    assert calls == []  # no open gate: the sender does not even run
    full_ids = torch.cat((batch.receiver_input_ids, batch.response_ids), 1)
    full_mask = torch.cat((batch.receiver_attention_mask, batch.response_mask), 1)
    with torch.no_grad():
        reference = receiver.model(full_ids, attention_mask=full_mask, position_ids=positions_from_mask(full_mask)).logits
    cut = batch.receiver_input_ids.shape[1] - 1
    assert torch.equal(fused, pair(batch, fuse=False).detach())
    assert torch.allclose(fused, reference[:, cut:], atol=1e-5)


def test_gradients_reach_only_the_fuser(receiver, qwen2_sender):
    pair = make_pair(receiver, qwen2_sender).train()
    batch = pair.collate([pair.encode(m, r) for m, r in PROMPTS])
    logits = pair(batch)
    logits.float().pow(2).mean().backward()
    fuser_grads = [p.grad for p in pair.fusers[0].parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in fuser_grads)
    for model in (receiver.model, qwen2_sender.model):
        assert all(p.grad is None for p in model.parameters())
    pair.fusers[0].zero_grad(set_to_none=True)


def test_only_aligned_positions_change(receiver, llama_sender):
    pair = make_pair(receiver, llama_sender).eval()
    batch = pair.collate([pair.encode(m, r) for m, r in PROMPTS[:2]])
    ids, mask = batch.receiver_input_ids[:, :-1], batch.receiver_attention_mask[:, :-1]
    positions = positions_from_mask(mask)
    with torch.no_grad():
        plain = pair.prefill_receiver(ids, mask, positions, batch, senders=[])
        fused = pair.prefill_receiver(ids, mask, positions, batch, senders=pair.sender_names)
    changed = (fused.layers[0].keys - plain.layers[0].keys).abs().sum(dim=(1, 3)) > 0  # (B, N)
    expected = (batch.senders[llama_sender.name].alignment[:, :-1] >= 0) & mask.bool()
    assert torch.equal(changed, expected)


def test_fuser_for_other_pair_is_refused(receiver, llama_sender, qwen2_sender):
    fuser = Fuser(llama_sender.identity, receiver.identity)
    with pytest.raises(ValueError, match="participants are"):
        FusedReceiver(receiver, [qwen2_sender], [fuser])
