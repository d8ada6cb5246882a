"""The fused receiver a FedRefine config describes (a fit/test config's ``model`` section: C2C, Co-C2C or
federation), built as ``fedrefine test`` builds it, with overrides of its arguments."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from fedrefine.participants.precision import cast_for_precision, resolve_precision
from fedrefine.recipes import FusionModule
from fedrefine.settings import SettingsError


def with_overrides(init_args: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``init_args`` with each override set, a dotted key naming a nested one (``evaluation.link.codec``)."""
    merged = yaml.safe_load(yaml.safe_dump(init_args)) or {}
    for key, value in overrides.items():
        node = merged
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SettingsError(f"model_args {key}={value!r}: {part} is not a group of settings in the config.")
        node[last] = value
    return merged


def config_precision(config: str | Path, precision: str | None, device: torch.device) -> str:
    """The precision the adapter runs in: ``precision`` when given, else the config's ``trainer.precision``, else by
    the device (see :mod:`fedrefine.participants.precision`)."""
    if precision is None:
        data = (yaml.safe_load(Path(config).read_text()) if Path(config).is_file() else None) or {}
        precision = (data.get("trainer") or {}).get("precision")
    return resolve_precision(precision, device)


def load_module(config: str | Path, overrides: Mapping[str, Any] | None = None, precision: str | None = None) -> FusionModule:
    """The ``model`` of the config at ``config`` (its ``class_path`` and ``init_args``, with ``overrides``), built
    with the config's seed (``seed_everything``), in eval mode; with ``precision``, its participants and fusers cast
    to it (:func:`~fedrefine.participants.precision.cast_for_precision`)."""
    from jsonargparse import ArgumentParser

    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"model_args config={config}: no such file; name a FedRefine fit/test config (YAML).")
    data = yaml.safe_load(path.read_text()) or {}
    model = data.get("model")
    if not isinstance(model, dict) or "class_path" not in model:
        raise SettingsError(f"{config} has no model section with a class_path: name a `fedrefine fit/test` config.")
    model = {"class_path": model["class_path"], "init_args": with_overrides(model.get("init_args") or {}, overrides or {})}
    seed = data.get("seed_everything", 0)
    torch.manual_seed(0 if seed is None or seed is True else int(seed))
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(FusionModule, "model", required=True)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    module = instantiate(parser.parse_object({"model": model})).model
    return (module if precision is None else cast_for_precision(module, precision)).eval()
