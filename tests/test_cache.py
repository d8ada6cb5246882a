import pytest
import torch

from fedrefine.fuser.config import layer_map
from fedrefine.kv.cache import (
    WriteHookCache,
    cache_to_layers,
    kv_bytes_per_token,
    kv_nbytes,
    layers_to_cache,
    positions_from_mask,
    returned_cache,
    with_cache,
)
from fedrefine.kv.rope import RotaryFrame, apply_rotary, remove_rotary, rotary_cos_sin


def test_cache_round_trip_continues_like_the_original(receiver):
    ids = torch.randint(10, 200, (2, 9))
    with torch.no_grad():
        full = receiver.model(ids).logits
        prefix = receiver.model(ids[:, :6], use_cache=True)
        layers = [(k.clone(), v.clone()) for k, v in cache_to_layers(returned_cache(prefix))]
        rebuilt = layers_to_cache(layers)
        rest = receiver.model(ids[:, 6:], **with_cache(receiver.model, rebuilt)).logits
    assert len(layers) == 3 and layers[0][0].shape == (2, 2, 6, 16)
    assert torch.allclose(rest, full[:, 6:], atol=1e-5)


def test_bytes_are_exact():
    layers = [(torch.zeros(2, 3, 5, 8), torch.zeros(2, 3, 5, 8, dtype=torch.bfloat16))] * 4
    assert kv_nbytes(layers) == 4 * (2 * 3 * 5 * 8 * 4 + 2 * 3 * 5 * 8 * 2)
    assert kv_bytes_per_token(layers) == 4 * (3 * 8 * 4 + 3 * 8 * 2)


def test_layer_maps_between_depths():
    assert layer_map("bottom_up", 28, 24) == list(range(24)) + [23] * 4
    assert layer_map("top_down", 28, 24) == [0, 0, 0, 0] + list(range(24))
    uniform = layer_map("uniform", 28, 24)
    assert uniform[0] == 0 and uniform[-1] == 23 and uniform == sorted(uniform)
    assert layer_map("bottom_up", 28, 16) == list(range(16)) + [15] * 12
    assert layer_map("top_down", 28, 16) == [0] * 12 + list(range(16))
    assert layer_map("bottom_up", 16, 28) == list(range(16))
    assert layer_map("top_down", 16, 28) == list(range(12, 28))
    assert layer_map("uniform", 16, 28) == [round(t * 27 / 15) for t in range(16)]
    with pytest.raises(ValueError, match="Unknown layer map 'sideways'"):
        layer_map("sideways", 2, 2)


def test_positions_follow_each_samples_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_rotary_removal_inverts_the_models_own_rotation(llama_sender):
    positions = torch.arange(7)[None]
    cos, sin = rotary_cos_sin(llama_sender.rotary_embedding, positions, torch.float32)
    x = torch.randn(1, 3, 7, 8)
    rotated = apply_rotary(x, cos, sin)
    assert not torch.allclose(rotated, x)
    assert torch.allclose(remove_rotary(rotated, cos, sin), x, atol=1e-5)


def test_apply_rotary_is_transformers_rotation_and_computes_in_the_angles_dtype():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x, cos, sin = torch.randn(2, 3, 5, 8), torch.randn(2, 1, 5, 8), torch.randn(2, 1, 5, 8)
    expected, _ = apply_rotary_pos_emb(x, x, cos[:, 0], sin[:, 0], unsqueeze_dim=1)  # it adds the head axis
    assert torch.allclose(apply_rotary(x, cos, sin), expected, atol=1e-6)
    rotated = apply_rotary(x.bfloat16(), cos, sin)  # bf16 states, fp32 angles: an fp32 result
    assert rotated.dtype == torch.float32
    assert torch.allclose(rotated, apply_rotary(x.bfloat16().float(), cos, sin))


def test_removing_rotary_from_cached_keys_makes_them_position_free(receiver):
    """The same token at two positions has different cached keys, but equal unrotated layer-0 keys."""
    ids = torch.tensor([[50, 60, 70, 50]])
    with torch.no_grad():
        keys = cache_to_layers(returned_cache(receiver.model(ids, use_cache=True)))[0][0]
    cos, sin = rotary_cos_sin(receiver.rotary_embedding, torch.arange(4)[None], torch.float32)
    plain = remove_rotary(keys, cos, sin)
    assert not torch.allclose(keys[:, :, 0], keys[:, :, 3], atol=1e-4)
    assert torch.allclose(plain[:, :, 0], plain[:, :, 3], atol=1e-5)


def test_a_cache_built_from_layers_holds_them_and_never_writes_into_them(receiver):
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        layers = cache_to_layers(returned_cache(receiver.model(input_ids=ids[:, :3], use_cache=True)))
        kept = [(k.clone(), v.clone()) for k, v in layers]
        cache = layers_to_cache(layers)
        assert all(a.keys is k and a.values is v for a, (k, v) in zip(cache.layers, layers))  # no copy
        assert cache.get_seq_length() == 3
        step = receiver.model(input_ids=ids[:, 3:], **with_cache(receiver.model, cache), use_cache=True)
        whole = receiver.model(input_ids=ids, use_cache=True)
    assert cache.get_seq_length() == 4
    torch.testing.assert_close(step.logits[:, -1], whole.logits[:, -1], rtol=1e-4, atol=1e-5)
    for (k, v), (k0, v0) in zip(layers, kept):
        assert torch.equal(k, k0) and torch.equal(v, v0)


def test_write_hook_cache_changes_only_the_first_write_of_each_layer(receiver):
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        prefix = returned_cache(receiver.model(input_ids=ids[:, :2], use_cache=True))
        hooked = []

        def hook(layer, keys, values):
            hooked.append(layer)
            return keys, values * 0

        cache = WriteHookCache(cache_to_layers(prefix), hook)
        receiver.model(input_ids=ids[:, 2:3], **with_cache(receiver.model, cache), use_cache=True)
        receiver.model(input_ids=ids[:, 3:], **with_cache(receiver.model, cache), use_cache=True)
    assert hooked == list(range(receiver.identity.num_layers))
    for layer in cache.layers:
        assert layer.values[:, :, 2].abs().sum() == 0  # the hooked write
        assert layer.values[:, :, 3].abs().sum() > 0  # a later (decoding) write is stored as computed


def test_rotary_frame_is_the_one_home_of_rotation(llama_sender):
    positions = torch.tensor([[0, 1, 2, 5], [3, 3, 4, 9]])
    frame = RotaryFrame(llama_sender.rotary_embedding, positions)
    x = torch.randn(2, 3, 4, 8)
    cos, sin = rotary_cos_sin(llama_sender.rotary_embedding, positions, torch.float32)
    assert torch.equal(frame.rotate(x), apply_rotary(x, cos, sin))
    assert torch.equal(frame.unrotate(x), remove_rotary(x, cos, sin))
    assert torch.allclose(frame.unrotate(frame.rotate(x)), x, atol=1e-5)
    rotated = frame.rotate(x)  # the same states at the same position rotate alike, at other positions not
    assert torch.allclose(rotated[1, :, 0], RotaryFrame(llama_sender.rotary_embedding, positions[1:, 1:2]).rotate(x[1:, :, :1])[0, :, 0])
    assert not torch.allclose(rotated[0, :, 3], frame.rotate(x)[1, :, 3])


def test_rotating_into_a_target_equals_adding_the_rotation_and_keeps_a_heads_last_layout():
    from fedrefine.kv.rope import add_rotary

    cos, sin = torch.randn(2, 1, 5, 8), torch.randn(2, 1, 5, 8)
    heads_last = torch.randn(3, 2, 5, 4, 8).transpose(2, 3)  # (L, B, H, N, D) held heads-last
    rotated = apply_rotary(heads_last, cos, sin)
    assert rotated.stride() == heads_last.stride()  # no layout copy
    torch.testing.assert_close(rotated, apply_rotary(heads_last.contiguous(), cos, sin))
    target, x = torch.randn(3, 2, 4, 5, 8), torch.randn(3, 2, 4, 5, 8)
    expected = target + apply_rotary(x, cos, sin)
    with torch.no_grad():
        written = add_rotary(target, x, cos, sin)
    assert written is target  # in place
    torch.testing.assert_close(written, expected)
    low = target.bfloat16()  # a bf16 cache: rotated in fp32, added once
    expected = (low.float() + apply_rotary(x, cos, sin).bfloat16().float()).bfloat16()
    torch.testing.assert_close(add_rotary(low, x, cos, sin), expected)
    leaf = x.clone().requires_grad_(True)  # autograd: out of place, the target untouched
    kept = target.clone()
    summed = add_rotary(target, leaf, cos, sin)
    assert summed.requires_grad and torch.equal(target, kept)


def test_rotation_matrices_at_one_position_rotate_and_unrotate_like_the_frame(llama_sender):
    from fedrefine.kv.rope import RotaryFrame

    frame = RotaryFrame(llama_sender.rotary_embedding, torch.tensor([[3], [11]]))  # one position per sample
    keys = torch.randn(2, 4, 1, llama_sender.identity.head_dim)
    rotation, unrotation = frame.matrices()
    torch.testing.assert_close(keys @ rotation, frame.rotate(keys), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(keys @ unrotation, frame.unrotate(keys), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="one position per sample"):
        RotaryFrame(llama_sender.rotary_embedding, torch.arange(3)[None]).matrices()
