import pytest
import torch

from fedrefine.kv.stack import KVStack, layer_chunks


def stack(layers=(0, 2, 5)):
    values = torch.arange(len(layers), dtype=torch.float32).view(-1, 1, 1, 1, 1).expand(-1, 1, 2, 3, 4).clone()
    return KVStack(tuple(layers), -values, values)


def test_select_follows_the_order_asked_and_repeats_a_layer_read_twice():
    picked = stack().select([5, 0, 5])
    assert picked.layers == (5, 0, 5)
    assert picked.values[:, 0, 0, 0, 0].tolist() == [2.0, 0.0, 2.0]
    assert picked.keys[:, 0, 0, 0, 0].tolist() == [-2.0, 0.0, -2.0]


def test_a_missing_layer_is_named():
    with pytest.raises(KeyError, match=r"Layers \[3\] are not in this KVStack \(it holds \[0, 2, 5\]\)"):
        stack().select([0, 3])


def test_slots_and_values_must_agree():
    with pytest.raises(ValueError, match="A KVStack of 2 layers needs that many slots"):
        KVStack((0, 1), None, torch.zeros(3, 1, 1, 1, 1))


def test_stacking_per_layer_kv_round_trips_and_values_only_cannot_be_unbound():
    per_layer = {3: (torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)), 1: (torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))}
    stacked = KVStack.of(per_layer)
    assert stacked.layers == (1, 3) and stacked.keys.shape == (2, 1, 2, 4, 8)
    for layer, (keys, values) in stacked.unbind().items():
        assert torch.equal(keys, per_layer[layer][0]) and torch.equal(values, per_layer[layer][1])
    values_only = KVStack.of(per_layer, keys=False)
    assert values_only.keys is None
    with pytest.raises(ValueError, match="values only"):
        values_only.unbind()


def test_layer_chunks_keep_each_stack_under_the_budget_in_layer_order():
    layer = (torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8))  # 64 floats: 256 bytes of values per layer
    kv = {i: layer for i in (4, 0, 3, 1, 2)}
    assert [list(c) for c in layer_chunks(kv, 600)] == [[0, 1], [2, 3], [4]]
    assert [list(c) for c in layer_chunks(kv, 1)] == [[0], [1], [2], [3], [4]]  # at least one layer each
    assert [list(c) for c in layer_chunks(kv, 10**9)] == [[0, 1, 2, 3, 4]]


def test_a_heads_last_stack_holds_the_same_states_and_its_rows_are_a_view():
    from fedrefine.fuser.stacked import rows

    per_layer = {i: (torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)) for i in (0, 1)}
    plain, heads_last = KVStack.of(per_layer), KVStack.of(per_layer, heads_last=True)
    assert torch.equal(plain.keys, heads_last.keys) and torch.equal(plain.values, heads_last.values)
    assert heads_last.values.transpose(2, 3).is_contiguous()  # (L, B, N, H, D) in memory
    assert rows(heads_last.values).data_ptr() == heads_last.values.data_ptr()  # no copy
    assert torch.equal(rows(heads_last.values), rows(plain.values))
