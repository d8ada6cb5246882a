"""The one ``precision`` setting, in Lightning's vocabulary, and what it makes of the participants and fusers.

    precision     participants (frozen LLMs)   fusers and gates           forward
    32-true       float32                      float32                    as is
    bf16-true     bfloat16                     bfloat16 (cast at load)    as is
    bf16-mixed    bfloat16                     float32 (as trained)       under ``torch.autocast(bfloat16)``
    16-true / 16-mixed: the same with float16
    null / auto   ``bf16-mixed`` on a GPU with bf16 (``16-mixed`` without), ``32-true`` on CPU

``fedrefine fit/validate/test/predict`` read it from ``trainer.precision`` (Lightning casts or autocasts the module;
participants with ``dtype: auto`` load in the weight dtype); ``fedrefine bench``, ``fedrefine serve participant``,
the lm-eval adapter and :func:`fedrefine.load` take a ``precision`` of their own and apply it with
:func:`cast_for_precision` and :func:`precision_context`. A fuser saved in any dtype loads into any precision: its
weights are cast when loaded, and every sender's K/V is converted to the fuser's dtype before it reads them.

The rotary tables (``inv_freq``) stay float32 in every precision, as ``from_pretrained(dtype=bfloat16)`` leaves them:
rounded to bf16 they would turn positions by up to a radian at a few hundred tokens.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from fedrefine.settings import SettingsError

#: The values ``precision`` takes (Lightning's names; ``32`` and ``bf16`` are Lightning's short forms).
PRECISIONS = ("32-true", "bf16-true", "bf16-mixed", "16-true", "16-mixed")
#: Short forms Lightning also accepts, by their full names.
ALIASES = {"32": "32-true", "bf16": "bf16-mixed", "16": "16-mixed", "auto": None}
#: Rotary buffers kept float32 whatever the precision.
ROTARY_BUFFERS = ("inv_freq", "original_inv_freq")


class PrecisionError(SettingsError):
    """A ``precision`` value that is not one of :data:`PRECISIONS`."""


def auto_precision(cuda: bool | None = None) -> str:
    """``bf16-mixed`` on a GPU that has bf16 (``16-mixed`` on one without), ``32-true`` on CPU (``cuda``: whether the
    run is on a GPU; None: whether one is available)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def resolve_precision(precision: str | int | None, device: str | torch.device | None = None) -> str:
    """``precision`` as one of :data:`PRECISIONS` (None / ``auto``: chosen by ``device``'s kind, see
    :func:`auto_precision`); anything else is refused, naming the values."""
    text = None if precision is None else str(precision)
    text = ALIASES.get(text, text)
    if text is None:
        kind = None if device is None else torch.device(device).type
        return auto_precision(None if kind is None else kind == "cuda")
    if text not in PRECISIONS:
        raise PrecisionError(f"precision={precision!r} is not one of {list(PRECISIONS)} (or null/auto: by the device).")
    return text


def weight_dtype(precision: str) -> torch.dtype:
    """The participants' weight dtype under ``precision`` (the frozen LLMs run in the compute dtype)."""
    text = resolve_precision(precision)
    return {"bf16": torch.bfloat16, "16": torch.float16}.get(text.split("-")[0], torch.float32)


def fuser_dtype(precision: str) -> torch.dtype:
    """The fusers' (and gates') weight dtype: the compute dtype for ``-true``, float32 otherwise (``-mixed`` autocasts)."""
    text = resolve_precision(precision)
    return weight_dtype(text) if text.endswith("-true") else torch.float32


def precision_context(precision: str, device: str | torch.device) -> AbstractContextManager:
    """What a forward runs under: ``torch.autocast`` in the compute dtype for ``-mixed``, nothing otherwise."""
    text = resolve_precision(precision)
    if not text.endswith("-mixed"):
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=weight_dtype(text))


def rotary_tables(root: nn.Module) -> dict[str, Tensor]:
    """Every rotary buffer (:data:`ROTARY_BUFFERS`) under ``root``, by its name, as a float32 copy."""
    return {name: buffer.detach().float().clone() for name, buffer in root.named_buffers()
            if name.rsplit(".", 1)[-1] in ROTARY_BUFFERS}


def restore_rotary_tables(root: nn.Module, tables: dict[str, Tensor]) -> None:
    """Put :func:`rotary_tables`' float32 copies back (after a cast rounded them), on each buffer's device."""
    for name, table in tables.items():
        owner, _, leaf = name.rpartition(".")
        module = root.get_submodule(owner)
        current = getattr(module, leaf)
        if current.dtype != torch.float32:
            setattr(module, leaf, table.to(current.device))


def load_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A participant source's ``dtype``: a name (``bfloat16``, ...) or ``auto``, the weight dtype of the precision
    chosen by the accelerator (under ``fedrefine fit/test``, ``auto`` is replaced by ``trainer.precision``'s first)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return weight_dtype(auto_precision())
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise PrecisionError(f"dtype={dtype!r} is not a float dtype; use auto, float32, bfloat16 or float16.")
    return resolved


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` in ``dtype``, in place, its rotary tables kept float32."""
    tables = rotary_tables(model)
    model.to(dtype=dtype)
    restore_rotary_tables(model, tables)
    return model


def cast_for_precision(root: nn.Module, precision: str) -> nn.Module:
    """Every participant model under ``root`` (any ``PreTrainedModel``) in :func:`weight_dtype`, everything else
    (fusers, gates) in :func:`fuser_dtype`, in place: a participant is cast once, never through another dtype."""
    models, inside = [], set()
    for module in root.modules():
        if isinstance(module, PreTrainedModel) and id(module) not in inside:
            models.append(module)
            inside.update(id(m) for m in module.modules())
    for model in models:
        cast_model(model, weight_dtype(precision))
    target = fuser_dtype(precision)
    for module in root.modules():
        if id(module) in inside:
            continue
        for tensors in (module._parameters, module._buffers):
            for name, tensor in tensors.items():
                if tensor is not None and tensor.is_floating_point() and tensor.dtype != target:
                    tensor.data = tensor.data.to(target)
    return root
