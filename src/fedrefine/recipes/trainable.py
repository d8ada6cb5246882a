"""Checkpoints that hold only a module's trainable parts, named by the parts themselves (never by strings), and the
policy that keeps the participants frozen (:class:`TrainableOnly`).

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


class TrainableOnly:
    """The frozen-participant policy of a LightningModule (mixed in ahead of it): only the declared trainable parts
    ever train or reach a checkpoint, the participants' LLMs stay in eval mode, and a checkpoint loads only into a
    module whose fusers are for the same ordered pairs.

    The module sets ``self.fused`` (its :class:`~fedrefine.fusion.FusedReceiver`) and may override
    :meth:`trainable_modules`.
    """

    def trainable_modules(self) -> list[nn.Module]:
        """The parts that train and are checkpointed: the fusers and the gating network, if any."""
        return [self.fused.fusers, *([self.fused.source_gate] if self.fused.source_gate is not None else [])]

    def frozen_models(self) -> list[nn.Module]:
        return [m for m in self.modules() if getattr(m, "_is_fedrefine_participant", False)]

    def train(self, mode: bool = True):
        """Only fusers and gates ever enter train mode; the LLMs stay in eval mode (no dropout)."""
        super().train(mode)
        for model in self.frozen_models():
            model.eval()
        return self

    def state_dict(self, *args: Any, **kwargs: Any):
        """Only the trainable parts' weights: checkpoints never hold the frozen LLMs."""
        return trainable_state(super().state_dict(*args, **kwargs), trainable_prefixes(self, self.trainable_modules()))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load trainable weights; with ``strict`` every trainable key must be present and nothing else."""
        if strict:
            check_trainable_keys(set(self.state_dict()), state_dict)
        # The frozen LLM weights are absent from checkpoints by design; only they are left out here.
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["fedrefine_fusers"] = fuser_metadata(self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_fuser_pairs(checkpoint.get("fedrefine_fusers"), fuser_metadata(self))
