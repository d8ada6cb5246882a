"""Hostile KV messages on purpose: how a served participant (``drill.tamper``), the tests and
``benchmarks/serve_abuse.py`` play a sender that lies, to check that its receiver drops it and answers
with the others.

Each tampering takes a well-formed message's bytes (:func:`~fedrefine.wire.format.serialize_message`)
and returns the bytes of one kind of hostile message, re-saved as valid safetensors so that it reaches
the wire format's own checks.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from fedrefine.wire.codecs import codec_by_name
from fedrefine.wire.format import read_metadata

Parts = dict[str, Tensor]


def split(data: bytes) -> tuple[Parts, dict, dict[str, str]]:
    """A message's tensors, its decoded header and its safetensors metadata."""
    metadata = read_metadata(data, "drill")
    return dict(load_tensors(data)), json.loads(metadata["header"]), metadata


def join(tensors: Parts, header: object, metadata: dict[str, str]) -> bytes:
    return save_tensors({k: t.contiguous() for k, t in tensors.items()}, metadata={**metadata, "header": json.dumps(header)})


def _layer_keys(tensors: Parts, layer: int) -> list[str]:
    return [key for key in tensors if key.split(".")[0] in (f"k{layer}", f"v{layer}")]


def non_finite(data: bytes) -> bytes:
    """NaN in the first layer's keys (in a float part: the data, or a quantised codec's scales)."""
    tensors, header, metadata = split(data)
    key = next(k for k, t in sorted(tensors.items()) if k.startswith("k") and t.is_floating_point() and t.numel())
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    return join(tensors, header, metadata)


def missing_layers(data: bytes) -> bytes:
    """A consistent message that carries one layer fewer than asked."""
    tensors, header, metadata = split(data)
    last = header["layers"].pop()
    for key in _layer_keys(tensors, last):
        del tensors[key]
    return join(tensors, header, metadata)


def no_layers(data: bytes) -> bytes:
    """A consistent message that carries no layer at all."""
    tensors, header, metadata = split(data)
    for layer in header["layers"]:
        for key in _layer_keys(tensors, layer):
            del tensors[key]
    header["layers"] = []
    return join(tensors, header, metadata)


_RELABEL = {"int8": "int4", "int4": "int2", "int2": "int8", "fp32": "fp16", "bf16": "fp16", "fp16": "bf16"}


def relabel_codec(data: bytes) -> bytes:
    """The same payload under another codec's name (e.g. int8 codes read as int4: surplus bytes)."""
    tensors, header, metadata = split(data)
    header["codec"]["name"] = _RELABEL[header["codec"]["name"]]
    return join(tensors, header, metadata)


def header_not_object(data: bytes) -> bytes:
    tensors, header, metadata = split(data)
    return join(tensors, [header], metadata)


def layers_wrong_type(data: bytes) -> bytes:
    tensors, header, metadata = split(data)
    header["layers"] = ",".join(map(str, header["layers"]))
    return join(tensors, header, metadata)


def counts_wrong_type(data: bytes) -> bytes:
    tensors, header, metadata = split(data)
    header["batch"] = str(header["batch"])
    return join(tensors, header, metadata)


def group_size_not_integer(data: bytes) -> bytes:
    tensors, header, metadata = split(data)
    header["codec"]["group_size"] = 2.5
    return join(tensors, header, metadata)


def wrong_rank(data: bytes) -> bytes:
    """The first layer's scales (or data) flattened to one dimension."""
    tensors, header, metadata = split(data)
    key = next(k for k in sorted(tensors) if k.startswith("k") and (k.endswith(".scale") or k.endswith(".data")))
    tensors[key] = tensors[key].reshape(-1)
    return join(tensors, header, metadata)


def amplify(data: bytes, positions: int = 280_000) -> bytes:
    """Masks declaring ``positions`` real positions of which none is transmitted: a few KB that would decode to
    gigabytes of K/V if the declared sizes were believed."""
    tensors, header, metadata = split(data)
    codec = codec_by_name(header["codec"]["name"], header["codec"].get("group_size", 128))
    heads, dim = header["sender"]["num_kv_heads"], header["sender"]["head_dim"]
    bits = np.packbits(np.ones(positions, dtype=bool))
    tensors = {"attention_mask": torch.from_numpy(bits), "sent": torch.zeros(len(bits), dtype=torch.uint8)}
    for layer in header["layers"]:
        for prefix, role in (("k", "key"), ("v", "value")):
            for part, (shape, dtype) in codec.part_shapes((heads, 0, dim), role).items():
                tensors[f"{prefix}{layer}.{part}"] = torch.zeros(shape, dtype=dtype)
    header.update(batch=1, length=positions, transmitted=0)
    return join(tensors, header, metadata)


#: Every tampering by name (``FaultDrill.tamper`` names one).
TAMPERINGS: dict[str, Callable[[bytes], bytes]] = {
    "non_finite": non_finite,
    "missing_layers": missing_layers,
    "no_layers": no_layers,
    "relabel_codec": relabel_codec,
    "header_not_object": header_not_object,
    "layers_wrong_type": layers_wrong_type,
    "counts_wrong_type": counts_wrong_type,
    "group_size_not_integer": group_size_not_integer,
    "wrong_rank": wrong_rank,
    "amplify": amplify,
}
