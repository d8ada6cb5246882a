"""Checkpoints that hold only a module's trainable parts, named by the parts themselves (never by strings).

A LightningModule declares its trainable parts (``trainable_modules()``, as torchtune's
``adapter_params()``); their state-dict prefixes are found in the module tree, so renaming an
attribute renames the keys instead of silently emptying checkpoints.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from fedrefine.fuser import Fuser, FuserPairMismatchError


def trainable_prefixes(root: nn.Module, parts: Sequence[nn.Module]) -> tuple[str, ...]:
    """State-dict prefixes (``"name."``) of ``parts`` inside ``root``; every part must be a submodule."""
    wanted = {id(part): part for part in parts}
    found = {id(module): name for name, module in root.named_modules() if id(module) in wanted}
    missing = [type(part).__name__ for key, part in wanted.items() if key not in found]
    if missing:
        raise ValueError(
            f"{type(root).__name__} declares trainable part(s) {missing} that are not its submodules; "
            f"assign them as attributes so that checkpoints hold them."
        )
    return tuple(f"{found[key]}." for key in wanted)


def trainable_state(full: Mapping[str, Tensor], prefixes: Sequence[str]) -> OrderedDict[str, Tensor]:
    """The entries of a full state dict that belong to the trainable parts."""
    return OrderedDict((k, v) for k, v in full.items() if k.startswith(tuple(prefixes)))


def check_trainable_keys(expected: set[str], given: Mapping[str, Any]) -> None:
    """A checkpoint must hold every trainable key and nothing else."""
    missing, unexpected = sorted(expected - set(given)), sorted(set(given) - expected)
    if missing or unexpected:
        raise KeyError(
            f"Checkpoint does not match this module's fusers: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )


def fuser_metadata(root: nn.Module) -> list[dict[str, Any]]:
    """The metadata (pair identities, config, layer map) of every fuser in ``root``, in module order."""
    return [fuser.metadata() for fuser in root.modules() if isinstance(fuser, Fuser)]


def check_fuser_pairs(saved: list[dict[str, Any]] | None, current: list[dict[str, Any]]) -> None:
    """A checkpoint's fusers must be for the same ordered pairs as this run's."""
    if saved is None:
        raise KeyError("Checkpoint has no 'fedrefine_fusers' metadata; it was not written by FedRefine.")

    def pairs(entries):
        return [(e["sender"], e["receiver"]) for e in entries]

    def describe(entries):
        return ", ".join(
            f"{s['name_or_path']}@{s['revision']} -> {r['name_or_path']}@{r['revision']}" for s, r in pairs(entries)
        )

    if pairs(saved) != pairs(current):
        raise FuserPairMismatchError(
            f"Checkpoint is for {describe(saved)}, but this run's pairs are {describe(current)}. "
            f"Use the checkpoint of this pair."
        )
