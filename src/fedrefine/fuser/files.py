"""A saved fuser (or gate) on disk: a safetensors file of weights beside a JSON file of metadata, each checked on
the way in, every error naming the file and the fix."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

FORMAT_NAME = "fedrefine.fuser"
FORMAT_VERSION = 2
#: Version 1 named ``fuse_at`` ``positions``; it is read with that one key renamed.
READABLE_VERSIONS = (1, 2)
WEIGHTS_FILE = "fuser.safetensors"
METADATA_FILE = "fuser.json"


class FuserFileError(ValueError):
    """A saved fuser's files are missing, unreadable, or do not belong together."""


class FuserPairMismatchError(ValueError):
    """A fuser was trained for another sender/receiver pair than the one it is loaded into."""


def write_weights(path: Path, module: nn.Module, format_name: str) -> None:
    """A module's state (a fuser's, a gate's) as a safetensors file tagged with its format (directories made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in module.state_dict().items()}
    save_file(tensors, path, metadata={"format": format_name})


def read_weights(path: Path, module: nn.Module, map_location: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The tensors of a saved module's safetensors file (a fuser's, a gate's), checked against ``module``, built
    from the metadata saved beside it: every error names the file."""
    if not path.is_file():
        raise FuserFileError(f"{path} is missing; a saved fuser or gate needs its JSON metadata and {path.name}.")
    try:
        weights = load_file(path, device=str(map_location))
    except (SafetensorError, OSError, ValueError) as err:
        raise FuserFileError(
            f"{path} is not a readable safetensors file ({err}); it is truncated or corrupted: re-export or copy the fuser again."
        ) from None
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in weights.items()}
    problems = [f"missing {name}" for name in expected if name not in found]
    problems += [f"unexpected {name}" for name in found if name not in expected]
    problems += [f"{name} is {found[name]}, expected {shape}" for name, shape in expected.items() if found.get(name, shape) != shape]
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise FuserFileError(
            f"{path} does not hold the weights that the metadata beside it describes ({shown}); the two files come "
            f"from different exports: copy both from the same one."
        )
    return weights
