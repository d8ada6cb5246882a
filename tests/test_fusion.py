import pytest
import torch

from fedrefine.fuser import Fuser, FuserConfig
from fedrefine.fusion import FusedReceiver
from fedrefine.kv.cache import positions_from_mask
from fusion_support import fused_cache, fused_logits

PROMPTS = [
    ([{"role": "user", "content": "Which of these would let the most heat travel through? A metal spoon."}], "A metal spoon"),
    ([{"role": "user", "content": "Café 東京 quick fox?"}], "B"),
    ([{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "the lazy dog"}], "ok"),
]


def make_pair(receiver, sender, scale=0.3, **config):
    fuser = Fuser(sender.identity, receiver.identity, FuserConfig(hidden_size=16, dropout=0.0, **config))
    for layer in fuser.layers:  # leave the zero init so that fusion visibly changes outputs
        for stream in (layer.key, layer.value):
            if stream is not None:
                torch.nn.init.normal_(stream.projection.weight, std=scale)
    return FusedReceiver(receiver, [sender], [fuser])


@pytest.mark.parametrize("sender_name", ["llama_sender", "qwen2_sender"])
def test_fused_logits_for_heterogeneous_pair(request, receiver, sender_name):
    pair = make_pair(receiver, request.getfixturevalue(sender_name)).eval()
    batch = pair.encoder.collate([pair.encoder.encode(m, r) for m, r in PROMPTS])
    with torch.no_grad():
        fused, alone = fused_logits(pair, batch), pair(batch).logits
    assert fused.shape == (3, 1 + batch.response_ids.shape[1], len(receiver.tokenizer))
    assert torch.isfinite(fused).all()
    assert not torch.allclose(fused, alone)


def test_padding_is_handled_per_sample(receiver, llama_sender):
    pair = make_pair(receiver, llama_sender).eval()
    examples = [pair.encoder.encode(m, r) for m, r in PROMPTS]
    with torch.no_grad():
        batched = fused_logits(pair, pair.encoder.collate(examples))
        for i, example in enumerate(examples):
            alone = fused_logits(pair, pair.encoder.collate([example]))
            length = alone.shape[1]
            assert torch.allclose(batched[i, :length], alone[0], atol=1e-4), i


def test_closed_gates_give_exactly_the_receiver_alone(receiver, llama_sender):
    pair = make_pair(receiver, llama_sender).eval()
    for layer in pair.fusers[0].layers:
        layer.gate.logit.data.fill_(-2.0)
    batch = pair.encoder.collate([pair.encoder.encode(m, r) for m, r in PROMPTS])
    calls = []
    hook = llama_sender.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            fused = fused_logits(pair, batch)
    finally:
        hook.remove()
    assert calls == []  # no open gate: the sender does not even run
    full_ids = torch.cat((batch.receiver_input_ids, batch.response_ids), 1)
    full_mask = torch.cat((batch.receiver_attention_mask, batch.response_mask), 1)
    with torch.no_grad():
        reference = receiver.model(full_ids, attention_mask=full_mask, position_ids=positions_from_mask(full_mask)).logits
    cut = batch.receiver_input_ids.shape[1] - 1
    assert torch.equal(fused, pair(batch).logits.detach())
    assert torch.allclose(fused, reference[:, cut:], atol=1e-5)


def test_gradients_reach_only_the_fuser(receiver, qwen2_sender):
    pair = make_pair(receiver, qwen2_sender).train()
    batch = pair.encoder.collate([pair.encoder.encode(m, r) for m, r in PROMPTS])
    logits = fused_logits(pair, batch)
    logits.float().pow(2).mean().backward()
    fuser_grads = [p.grad for p in pair.fusers[0].parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in fuser_grads)
    for model in (receiver.model, qwen2_sender.model):
        assert all(p.grad is None for p in model.parameters())
    pair.fusers[0].zero_grad(set_to_none=True)


def test_only_aligned_positions_change(receiver, llama_sender):
    pair = make_pair(receiver, llama_sender).eval()
    batch = pair.encoder.collate([pair.encoder.encode(m, r) for m, r in PROMPTS[:2]])
    mask = batch.receiver_attention_mask[:, :-1]
    with torch.no_grad():
        plain = fused_cache(pair, batch, [])
        fused = fused_cache(pair, batch)
    changed = (fused.layers[0].keys - plain.layers[0].keys).abs().sum(dim=(1, 3)) > 0  # (B, N)
    expected = (batch.senders[llama_sender.name].alignment[:, :-1] >= 0) & mask.bool()
    assert torch.equal(changed, expected)


def test_values_only_fusion_keeps_the_receivers_keys_and_reads_no_sender_keys(receiver, llama_sender, monkeypatch):
    pair = make_pair(receiver, llama_sender, fuse_keys=False).eval()
    batch = pair.encoder.collate([pair.encoder.encode(m, r) for m, r in PROMPTS[:2]])
    unrotated = []
    monkeypatch.setattr("fedrefine.kv.rope.RotaryFrame.unrotate", lambda self, k: unrotated.append(k.shape) or k)
    with torch.no_grad():
        plain = fused_cache(pair, batch, [])
        fused = fused_cache(pair, batch)
    assert unrotated == []  # neither the receiver's keys nor the sender's are taken out of their rotary frame
    for layer in range(receiver.identity.num_layers):
        assert torch.equal(fused.layers[layer].keys, plain.layers[layer].keys)
        assert not torch.equal(fused.layers[layer].values, plain.layers[layer].values)


def test_fusing_layer_by_layer_gives_the_cache_of_fusing_them_all_at_once(receiver, qwen2_sender, monkeypatch):
    pair = make_pair(receiver, qwen2_sender).eval()
    batch = pair.encoder.collate([pair.encoder.encode(m, r) for m, r in PROMPTS])
    with torch.no_grad():
        together = fused_cache(pair, batch)
        monkeypatch.setattr("fedrefine.fusion.residual.FUSE_CHUNK_BYTES", 1)  # one layer per chunk
        chunked = fused_cache(pair, batch)
        plain = fused_cache(pair, batch, [])
    for layer in range(receiver.identity.num_layers):
        assert not torch.equal(together.layers[layer].values, plain.layers[layer].values)
        torch.testing.assert_close(chunked.layers[layer].keys, together.layers[layer].keys, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(chunked.layers[layer].values, together.layers[layer].values, rtol=1e-5, atol=1e-6)


def test_fusion_leaves_the_receivers_own_prefill_as_it_was(receiver, qwen2_sender):
    """The fused cache is written into a copy: a prefill handed to ``prepare`` (made while remote senders
    worked, or reused across calls) is not changed, and fusing from it twice gives the same cache."""
    from fedrefine.fusion.strategy import prefill_all_but_last

    pair = make_pair(receiver, qwen2_sender).eval()
    batch = pair.encoder.collate([pair.encoder.encode(m, r) for m, r in PROMPTS])
    ids, mask = batch.receiver_input_ids, batch.receiver_attention_mask
    with torch.no_grad():
        messages = pair.send(batch).messages
        inputs = pair.fusion_inputs(batch, messages)
        own = prefill_all_but_last(receiver, ids, mask)
        before = [(layer.keys.clone(), layer.values.clone()) for layer in own.cache.layers]
        first = pair.strategy.prepare(receiver, ids, mask, inputs, own).cache
        second = pair.strategy.prepare(receiver, ids, mask, inputs, own).cache
    for layer, (keys, values) in zip(own.cache.layers, before):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    for a, b, (keys, _) in zip(first.layers, second.layers, before):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert not torch.equal(a.keys, keys)


def test_fuser_for_other_pair_is_refused(receiver, llama_sender, qwen2_sender):
    fuser = Fuser(llama_sender.identity, receiver.identity)
    with pytest.raises(ValueError, match="participants are"):
        FusedReceiver(receiver, [qwen2_sender], [fuser])


def prefilled(pair):
    """PROMPTS with the answer prefix as an assistant prefill that the sender reads too."""
    messages = [[*m, {"role": "assistant", "content": "The correct answer is"}] for m, _ in PROMPTS]
    batch = pair.encoder.collate([pair.encoder.encode(m, " B.") for m in messages])
    for sender in batch.senders.values():  # fuse nothing but the last prompt token
        sender.alignment[:, :-1] = -1
    return batch


def test_last_prompt_token_is_fused_only_when_asked(receiver, llama_sender):
    pair = make_pair(receiver, llama_sender, fuse_at="all").eval()
    batch = prefilled(pair)
    assert (batch.senders[llama_sender.name].alignment[:, -1] >= 0).all()  # the prefill is aligned content
    with torch.no_grad():
        alone, fused = pair(batch).logits, fused_logits(pair, batch)
        pair.strategy.fuse_at = "prompt"
        reference_fusion = fused_logits(pair, batch)  # the C2C reference leaves the last prompt token unfused
        pair.strategy.fuse_at = "last"
        last_only = fused_logits(pair, batch)
    assert torch.equal(reference_fusion, alone)
    assert torch.allclose(last_only, fused)  # nothing else is aligned in this batch
    assert not torch.allclose(fused[:, 0], alone[:, 0])  # every sample's answer token is steered
    for row in range(len(PROMPTS)):
        assert not torch.allclose(fused[row, 0], alone[row, 0])


def test_last_token_fusion_trains_only_the_fuser_and_generates(receiver, qwen2_sender):
    pair = make_pair(receiver, qwen2_sender, fuse_at="last").train()
    batch = prefilled(pair)
    fused_logits(pair, batch).float().pow(2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pair.fusers[0].parameters())
    for model in (receiver.model, qwen2_sender.model):
        assert all(p.grad is None for p in model.parameters())
    pair.fusers[0].zero_grad(set_to_none=True)
    generated = pair.eval().generate(batch, pair.send(batch).messages, max_new_tokens=3)
    assert len(generated) == len(PROMPTS) and all(len(ids) <= 3 for ids in generated)


def test_fused_positions_are_checked(receiver, llama_sender, qwen2_sender):
    with pytest.raises(ValueError, match="residual"):
        FuserConfig(mode="concat", fuse_at="last")
    with pytest.raises(ValueError, match="'prompt', 'all' or 'last'"):
        FuserConfig(fuse_at="first")
    fusers = [
        Fuser(s.identity, receiver.identity, FuserConfig(hidden_size=8, fuse_at=p))
        for s, p in ((llama_sender, "last"), (qwen2_sender, "prompt"))
    ]
    with pytest.raises(ValueError, match="same positions"):
        FusedReceiver(receiver, [llama_sender, qwen2_sender], fusers)


def test_last_only_leaves_the_prompt_cache_unfused(receiver, llama_sender):
    pair = make_pair(receiver, llama_sender, fuse_at="last").eval()
    batch = pair.encoder.collate([pair.encoder.encode(m, r) for m, r in PROMPTS[:2]])
    with torch.no_grad():
        plain = fused_cache(pair, batch, [])
        last_only = fused_cache(pair, batch)
    for before, after in zip(plain.layers, last_only.layers):
        assert torch.equal(before.keys, after.keys) and torch.equal(before.values, after.values)


def test_last_only_sends_one_position_per_prompt(receiver, llama_sender):
    pair = make_pair(receiver, llama_sender, fuse_at="last").eval()
    batch = prefilled(pair)
    message = pair.sending.send(llama_sender.name, batch.senders[llama_sender.name])
    assert message.nbytes == message.bytes_per_token * len(PROMPTS)
    pair.strategy.fuse_at = "prompt"
    everything = pair.sending.send(llama_sender.name, batch.senders[llama_sender.name])
    assert everything.nbytes == everything.bytes_per_token * int(batch.senders[llama_sender.name].attention_mask.sum())


def _last_token_pair(receiver, llama_sender, qwen2_sender, case, fuse_at="last"):
    if case in ("parallel", "sequential", "mixed"):  # mixed: the second fuser fuses values only, in sequence
        keys = [True, case != "mixed"]
        fusers = [make_pair(receiver, s, fuse_at=fuse_at, fuse_keys=k).fusers[0] for s, k in zip((llama_sender, qwen2_sender), keys)]
        return FusedReceiver(receiver, [llama_sender, qwen2_sender], fusers, combine="parallel" if case == "parallel" else "sequential").eval()
    config = {"keys": {}, "values_only": {"fuse_keys": False}, "reference": {"variant": "c2c_reference"},
              "kv_together": {"reads_kv_together": True}}[case]
    pair = make_pair(receiver, llama_sender, fuse_at=fuse_at, **config).eval()
    for name, parameter in pair.fusers[0].named_parameters():  # the reference's blocks start at zero too
        if "projection" in name or "gate" in name:
            torch.nn.init.normal_(parameter, std=0.3) if parameter.dim() > 1 else parameter.data.fill_(1.0)
    return pair


@pytest.mark.parametrize("case", ["keys", "values_only", "reference", "kv_together", "parallel", "sequential", "mixed"])
def test_last_token_inference_fusion_equals_the_general_fusion(receiver, llama_sender, qwen2_sender, case):
    from fedrefine.fusion.last_token import LastTokenFusion

    pair = _last_token_pair(receiver, llama_sender, qwen2_sender, case)
    batch = prefilled(pair)
    messages = pair.send(batch).messages
    with torch.no_grad():
        alone = pair(batch).logits
        fast = pair(batch, messages).logits
        read = pair.read_prompt(batch, messages)  # the whole prompt in one forward, its last token fused as written
        assert isinstance(pair.fuse(batch, messages).context.cache.hook, LastTokenFusion)
    with torch.enable_grad():  # autograd: the general per-layer fusion
        general = pair(batch, messages).logits.detach()
    assert not torch.allclose(fast[:, 0], alone[:, 0], atol=1e-3)
    torch.testing.assert_close(fast, general, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(read.last_logits, general[:, 0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["keys", "values_only", "reference", "kv_together", "parallel", "sequential", "mixed"])
def test_prompt_fusion_in_inference_equals_the_general_fusion(receiver, llama_sender, qwen2_sender, case):
    """The inference path (stacked fusers, heads-last receiver stack, key deltas rotated into it in place) against
    autograd's (the per-layer fusers, every sum out of place), at every aligned prompt position."""
    pair = _last_token_pair(receiver, llama_sender, qwen2_sender, case, fuse_at="prompt")
    batch = pair.encoder.collate([pair.encoder.encode(m, r) for m, r in PROMPTS])
    messages = pair.send(batch).messages
    with torch.no_grad():
        alone = fused_cache(pair, batch, [])
        fast = pair.fuse(batch, messages).context.cache
    with torch.enable_grad():
        general = pair.fuse(batch, messages).context.cache
    assert pair.fusers[0]._stacks.stack is not None  # the stacked inference path ran
    changed = False
    for before, quick, slow in zip(alone.layers, fast.layers, general.layers):
        torch.testing.assert_close(quick.keys, slow.keys.detach(), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(quick.values, slow.values.detach(), atol=2e-5, rtol=1e-4)
        changed |= not torch.allclose(quick.values, before.values, atol=1e-4)
    assert changed
