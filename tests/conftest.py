"""Shared tiny participants: different architecture classes, depths, head layouts and tokenizers."""

import pytest
import torch

from fedrefine.participants import TinySpec, build_tiny_participant

RECEIVER_SPEC = TinySpec("qwen3-receiver", "qwen3", num_layers=3, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16)
LLAMA_SPEC = TinySpec(
    "llama-sender", "llama", num_layers=2, hidden_size=48, num_heads=6, num_kv_heads=3, head_dim=8,
    rope_theta=500000.0, tokenizer_kind="metaspace_bpe", chat_style="llama3", seed=1,
)
QWEN2_SPEC = TinySpec(
    "qwen2-sender", "qwen2", num_layers=4, hidden_size=32, num_heads=4, num_kv_heads=1, head_dim=8,
    vocab_size=300, seed=2,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def receiver():
    return build_tiny_participant(RECEIVER_SPEC)


@pytest.fixture(scope="session")
def llama_sender():
    return build_tiny_participant(LLAMA_SPEC)


@pytest.fixture(scope="session")
def qwen2_sender():
    return build_tiny_participant(QWEN2_SPEC)
