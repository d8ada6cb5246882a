"""Fusers from the C2C reference (``thu-nics/C2C``): its checkpoint folders read into FedRefine fusers of the
``c2c_reference`` variant, and written back (to return a fine-tuned fuser, or to make test checkpoints).

A reference checkpoint folder holds, per projector ``t``: ``projector_t.json`` (``{"class": ..., "init_args":
{...}}``, only the arguments that were passed) and ``projector_t.pt`` (its state dict, a torch pickle); and
``projector_config.json`` mapping ``{receiver model: {sender model: {receiver layer: [[sender layer,
projector]]}}}`` (model 0 is the receiver). Everything read is checked before it is used; each refusal is one
:class:`C2CImportError` line naming the file and the fix.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedrefine.fuser.config import FuserConfig, layer_map
from fedrefine.fuser.files import FuserFileError
from fedrefine.fuser.fuser import Fuser
from fedrefine.fuser.reference import reference_names
from fedrefine.participants import ParticipantIdentity

PROJECTOR_CLASS = "C2CProjector"
MAPPING_FILE = "projector_config.json"
#: ``C2CProjector``'s defaults for the arguments a checkpoint's JSON leaves out (it records only those passed).
REFERENCE_DEFAULTS: dict[str, Any] = {
    "source_num_heads": 1, "target_num_heads": 1, "intermediate_dim": 1024, "hidden_dim": 1024, "num_layers": 3,
    "dropout": 0.1, "initial_temperature": 1.0, "final_temperature": 0.001, "anneal_steps": 1929, "dtype": "float32",
}
#: The reference's training temperature buffer: not a parameter; kept in the fuser's recorded source.
TEMPERATURE_BUFFER = "gate_temperature"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class C2CImportError(FuserFileError):
    """A C2C reference checkpoint that cannot become a fuser for the named pair (one line: the file and the fix)."""


@dataclass(frozen=True)
class ImportReport:
    """What an import wrote: the fuser, its parameter count and the seconds the import took."""

    fuser: Fuser
    parameters: int
    seconds: float


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise C2CImportError(f"{path} is missing; copy the whole reference checkpoint folder (e.g. .../final).")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise C2CImportError(f"{path} is not valid JSON ({err}); it is truncated or corrupted: copy it again.") from None


def _init_args(path: Path) -> dict[str, Any]:
    """A projector's JSON: its class must be ``C2CProjector``; returns its init args with the defaults filled."""
    payload = _read_json(path)
    name = payload.get("class") if isinstance(payload, dict) else None
    if name != PROJECTOR_CLASS:
        raise C2CImportError(
            f"{path} holds a {name!r} projector; FedRefine computes the reference's {PROJECTOR_CLASS} only: export "
            f"that class, or train this pair in FedRefine with `fedrefine fit`."
        )
    args = dict(REFERENCE_DEFAULTS) | dict(payload.get("init_args") or {})
    if isinstance(args["dtype"], dict):  # the reference encodes dtypes as {"__type__": "torch.dtype", "value": ...}
        args["dtype"] = args["dtype"].get("value")
    if args["dtype"] not in _DTYPES:
        raise C2CImportError(f"{path}: unsupported dtype {args['dtype']!r}; the reference saves float32, bfloat16 or float16.")
    return args


def _check_pair(path: Path, args: dict[str, Any], sender: ParticipantIdentity, receiver: ParticipantIdentity) -> None:
    sender_width = args["source_dim"] * args["source_num_heads"]
    problems = []
    if sender_width != sender.num_kv_heads * sender.head_dim:
        problems.append(f"sender K/V width {args['source_num_heads']} x {args['source_dim']} but {sender.key} has "
                        f"{sender.num_kv_heads} x {sender.head_dim}")
    if (args["target_num_heads"], args["target_dim"]) != (receiver.num_kv_heads, receiver.head_dim):
        problems.append(f"receiver heads x dim {args['target_num_heads']} x {args['target_dim']} but {receiver.key} "
                        f"has {receiver.num_kv_heads} x {receiver.head_dim}")
    if problems:
        raise C2CImportError(
            f"{path} is a projector for another pair ({'; '.join(problems)}): name the models it was trained for with "
            f"--receiver/--sender, or import the checkpoint of this pair."
        )


def _config(args: dict[str, Any], path: Path) -> FuserConfig:
    hidden, inner = int(args["hidden_dim"]), int(args["intermediate_dim"])
    config = FuserConfig(
        variant="c2c_reference", hidden_size=hidden, num_blocks=int(args["num_layers"]), ffn_multiplier=inner / hidden,
        dropout=float(args["dropout"]), gate_init=0.0, gate_noise="gumbel", layer_map="top_down", token_alignment="reference",
        temperature_start=float(args["initial_temperature"]), temperature_end=float(args["final_temperature"]),
    )
    if round(hidden * config.ffn_multiplier) != inner:
        raise C2CImportError(f"{path}: intermediate_dim {inner} is not representable against hidden_dim {hidden}.")
    return config


def _layer_map(directory: Path, receiver_layers: int, sender_layers: int) -> tuple[list[int], list[int]]:
    """(sender layer, projector index) of each receiver layer, from the mapping JSON."""
    path = directory / MAPPING_FILE
    mapping = _read_json(path)
    try:
        (pairs,) = mapping.values()  # {receiver model: {sender model: {layer: [[sender layer, projector]]}}}
        (layers,) = pairs.values()
        entries = {int(t): [int(x) for x in v[0]] for t, v in layers.items()}
    except (AttributeError, ValueError, TypeError, IndexError):
        raise C2CImportError(
            f"{path} is not the single-pair layer mapping of a reference checkpoint ({{receiver: {{sender: {{layer: "
            f"[[sender layer, projector]]}}}}}}); import one sender's checkpoint at a time."
        ) from None
    missing = [t for t in range(receiver_layers) if t not in entries]
    outside = [t for t, (s, _) in entries.items() if not 0 <= t < receiver_layers or not 0 <= s < sender_layers]
    if missing or outside:
        raise C2CImportError(
            f"{path} maps receiver layers {sorted(entries)} to sender layers {sorted({s for s, _ in entries.values()})}, "
            f"but the named receiver has {receiver_layers} layers and the sender {sender_layers}: name the models "
            f"this checkpoint was trained for."
        )
    return [entries[t][0] for t in range(receiver_layers)], [entries[t][1] for t in range(receiver_layers)]


def _map_kind(sender_map: list[int], sender_layers: int, path: Path) -> str:
    for kind in ("top_down", "bottom_up", "uniform"):
        if layer_map(kind, len(sender_map), sender_layers) == sender_map:
            return kind
    raise C2CImportError(f"{path}: layer map {sender_map} is none of top_down, bottom_up, uniform; FedRefine cannot hold it.")


def _expected_shapes(fuser: Fuser, num_blocks: int) -> dict[str, tuple[int, ...]]:
    """Each reference parameter name of one projector -> its shape (from the first layer of ``fuser``)."""
    ours = {name: tuple(t.shape) for name, t in fuser.layers[0].state_dict().items()}
    return {theirs: ours[mine] for mine, theirs in reference_names(num_blocks).items()}


def _load_state(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> dict[str, Tensor]:
    """A projector's state dict, its size checked before it is read and every tensor after."""
    if not path.is_file():
        raise C2CImportError(f"{path} is missing; copy the whole reference checkpoint folder (e.g. .../final).")
    needed = sum(math.prod(s) for s in shapes.values()) * torch.empty((), dtype=dtype).element_size()
    if path.stat().st_size < needed:
        raise C2CImportError(
            f"{path} is {path.stat().st_size} bytes but its projector's weights take {needed}: the file is truncated; "
            f"copy it again."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - whatever the unpickler says, the file is unusable
        raise C2CImportError(f"{path} is not a readable torch state dict ({str(err).splitlines()[0]}); copy it again.") from None
    if not isinstance(state, dict):
        raise C2CImportError(f"{path} holds no state dict; re-save the projector with its state_dict().")
    problems = [f"missing {n}" for n in shapes if n not in state]
    problems += [f"{n} is {tuple(state[n].shape)}, expected {s}" for n, s in shapes.items() if n in state and tuple(state[n].shape) != s]
    problems += [f"unexpected {n}" for n in state if n not in shapes and n != TEMPERATURE_BUFFER]
    problems += [f"{n} is not finite" for n in shapes if n in state and not torch.isfinite(state[n]).all()]
    if problems:
        raise C2CImportError(
            f"{path} does not hold the C2CProjector its JSON describes ({'; '.join(problems[:3])}); re-export the projector, or copy the .pt and "
            f".json of the same checkpoint."
        )
    return state


def import_c2c(directory: str | Path, sender: ParticipantIdentity, receiver: ParticipantIdentity) -> ImportReport:
    """The reference checkpoint in ``directory`` as a ``c2c_reference`` fuser for exactly this pair."""
    start = time.perf_counter()
    directory = Path(directory)
    if not directory.is_dir():
        raise C2CImportError(f"{directory} is not a directory; pass the checkpoint folder holding {MAPPING_FILE}.")
    sender_map, projectors = _layer_map(directory, receiver.num_layers, sender.num_layers)
    first = directory / f"projector_{projectors[0]}.json"
    args = _init_args(first)
    _check_pair(first, args, sender, receiver)
    config = _config(args, first)
    config.layer_map = _map_kind(sender_map, sender.num_layers, directory / MAPPING_FILE)
    with torch.device("meta"):  # shapes first; the weights' memory is taken once, uninitialised, then filled
        fuser = Fuser(sender, receiver, config)
    shapes = _expected_shapes(fuser, config.num_blocks)
    fuser = fuser.to_empty(device="cpu")
    fuser.temperature.fill_(config.temperature_start)
    names = reference_names(config.num_blocks)
    temperatures = {}
    for layer, index in enumerate(projectors):
        json_path = directory / f"projector_{index}.json"
        layer_args = _init_args(json_path)
        if {k: v for k, v in layer_args.items() if k != "dtype"} != {k: v for k, v in args.items() if k != "dtype"}:
            raise C2CImportError(f"{json_path} differs from {first.name}; a fuser holds projectors of one shape.")
        state = _load_state(directory / f"projector_{index}.pt", shapes, _DTYPES[layer_args["dtype"]])
        if TEMPERATURE_BUFFER in state:
            temperatures[str(layer)] = float(state[TEMPERATURE_BUFFER])
        with torch.no_grad():
            for mine, theirs in names.items():
                fuser.layers[layer].get_parameter(mine).copy_(state[theirs])
    fuser.source = {
        "format": "thu-nics/C2C checkpoint", "path": str(directory.resolve()), "class": PROJECTOR_CLASS,
        "init_args": args, "projectors": projectors, "sender_layers": sender_map, "gate_temperatures": temperatures,
    }
    return ImportReport(fuser.eval(), sum(p.numel() for p in fuser.parameters()), time.perf_counter() - start)


def export_c2c(fuser: Fuser, directory: str | Path, dtype: str = "float32") -> Path:
    """Write a ``c2c_reference`` fuser as a reference checkpoint folder (one projector per receiver layer)."""
    if fuser.config.variant != "c2c_reference":
        raise ValueError(f"Only c2c_reference fusers have the reference's layout; this one is {fuser.config.variant!r}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config, sender, receiver = fuser.config, fuser.sender, fuser.receiver
    init_args = {
        "source_dim": sender.head_dim, "target_dim": receiver.head_dim, "source_num_heads": sender.num_kv_heads,
        "target_num_heads": receiver.num_kv_heads, "intermediate_dim": round(config.hidden_size * config.ffn_multiplier),
        "hidden_dim": config.hidden_size, "num_layers": config.num_blocks, "dropout": config.dropout,
        "initial_temperature": config.temperature_start, "final_temperature": config.temperature_end,
        "dtype": {"__type__": "torch.dtype", "value": dtype},
    }
    names = reference_names(config.num_blocks)
    for t, layer in enumerate(fuser.layers):
        (directory / f"projector_{t}.json").write_text(json.dumps({"class": PROJECTOR_CLASS, "init_args": init_args}, indent=2))
        state = {theirs: layer.get_parameter(mine).detach().to(_DTYPES[dtype]).clone() for mine, theirs in names.items()}
        state[TEMPERATURE_BUFFER] = fuser.temperature.detach().to(_DTYPES[dtype]).clone()
        torch.save(state, directory / f"projector_{t}.pt")
    mapping = {"0": {"1": {str(t): [[s, t]] for t, s in enumerate(fuser.layer_map)}}}
    (directory / MAPPING_FILE).write_text(json.dumps(mapping))
    return directory


def model_identity(name_or_path: str, revision: str | None = None, name: str | None = None) -> ParticipantIdentity:
    """The identity a participant loaded from ``name_or_path`` gets (as ``fedrefine fit/test`` record it), read from
    its config alone (no weights)."""
    from fedrefine.participants import load_model_config

    local = Path(name_or_path).expanduser().is_dir()
    config = load_model_config(name_or_path, revision)
    return ParticipantIdentity.from_config(config, name or name_or_path, revision or ("local" if local else "main"))


def main(argv: list[str] | None = None) -> None:
    """``fedrefine import-c2c CHECKPOINT_DIR --receiver ID --sender ID (--out DIR | --registry DIR)``."""
    import argparse

    from fedrefine.fuser.registry import FuserRegistry

    parser = argparse.ArgumentParser(
        prog="fedrefine import-c2c", description="Import a C2C reference checkpoint folder as a FedRefine fuser."
    )
    parser.add_argument("checkpoint", help="the reference's checkpoint folder (projector_*.json/.pt, projector_config.json)")
    for role in ("receiver", "sender"):
        parser.add_argument(f"--{role}", required=True, help=f"the {role} model: hub id or local directory (its config is read)")
        parser.add_argument(f"--{role}-revision", default=None, help=f"the {role}'s hub revision, as your configs name it")
        parser.add_argument(f"--{role}-name", default=None, help=f"identity name of a local {role} copy (e.g. its hub id)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="write the fuser (fuser.safetensors + fuser.json) into this directory")
    target.add_argument("--registry", help="add the fuser to this registry directory")
    args = parser.parse_args(argv)
    receiver = model_identity(args.receiver, args.receiver_revision, args.receiver_name)
    sender = model_identity(args.sender, args.sender_revision, args.sender_name)
    report = import_c2c(args.checkpoint, sender, receiver)
    where = report.fuser.save(args.out) if args.out else FuserRegistry(args.registry).save(report.fuser)
    opened = sum(report.fuser.open_layers())
    print(f"Imported {report.parameters:,} parameters ({len(report.fuser.layers)} layers, {opened} with an open gate) "
          f"for {sender.key} -> {receiver.key} into {where} in {report.seconds:.1f} s.")
