"""Shared tiny participants: different architecture classes, depths, head layouts and tokenizers."""

import dataclasses

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


def chatty(spec, seed=5):
    """A tiny participant with an untied random output layer: greedy decoding then writes varied text
    (tied tiny models repeat the prompt's last token, which decodes to whitespace)."""
    participant = build_tiny_participant(dataclasses.replace(spec, name=f"{spec.name}-chatty", seed=seed))
    head = participant.model.lm_head
    generator = torch.Generator().manual_seed(seed)
    head.weight = torch.nn.Parameter(torch.randn(head.weight.shape, generator=generator), requires_grad=False)
    return participant


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


@pytest.fixture(scope="session")
def chatty_receiver():
    """The user's own model (receiver and rephraser) that writes varied text."""
    return chatty(RECEIVER_SPEC)


@pytest.fixture(scope="session")
def llama_chatty():
    return chatty(LLAMA_SPEC)


@pytest.fixture(scope="session")
def qwen2_chatty():
    return chatty(QWEN2_SPEC)
