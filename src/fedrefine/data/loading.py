"""Open a dataset by hub id or local file (JSON, JSONL, parquet), streaming, with clear offline errors."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import datasets

from fedrefine.participants.hub import hub_offline

_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
Row = TypeVar("Row")


class DataFileError(ValueError):
    """A data file that cannot be read at all (not UTF-8 JSON, not parquet, truncated)."""


def read_rows(rows: Iterable[Row], source: str, option: str = "path") -> Iterator[Row]:
    """Iterate a dataset's rows; a file that cannot be decoded is one error naming it, not a reader's traceback."""
    iterator = iter(rows)
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except (UnicodeDecodeError, OSError, ValueError, datasets.exceptions.DatasetGenerationError) as err:
            if not Path(source).exists():
                raise
            raise DataFileError(unreadable(source, err, option)) from None
        yield row


def unreadable(source: str, err: BaseException, option: str) -> str:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else "no detail"
    return (f"{source} cannot be read ({type(err).__name__}: {reason}). It must be UTF-8 JSON / JSONL or parquet; "
            f"re-encode or re-export it, or point `{option}` at another file.")


def open_dataset(
    path_or_id: str, split: str, config_name: str | None = None, streaming: bool = True, option: str = "path"
) -> datasets.IterableDataset | datasets.Dataset:
    """A split of a hub dataset or of a local JSON/JSONL/parquet file (or directory of such files).

    A local path may contain ``{split}`` (e.g. ``obqa_{split}.jsonl``) to pick a file per split.
    ``option`` names the config key the user sets, so that offline errors can say what to change.
    """
    path_or_id = path_or_id.replace("{split}", split)
    local = Path(path_or_id)
    if local.exists():
        files = sorted(p for p in local.rglob("*") if p.suffix in _LOCAL_BUILDERS) if local.is_dir() else [local]
        if not files or files[0].suffix not in _LOCAL_BUILDERS:
            raise ValueError(f"{path_or_id}: expected a .json, .jsonl or .parquet file (or a folder of them).")
        builder = _LOCAL_BUILDERS[files[0].suffix]
        try:
            return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=streaming)
        except (UnicodeDecodeError, OSError, ValueError, datasets.exceptions.DatasetGenerationError) as err:
            raise DataFileError(unreadable(path_or_id, err, option)) from None
    if path_or_id.startswith((".", "/", "~")) or path_or_id.endswith(tuple(_LOCAL_BUILDERS)):
        raise FileNotFoundError(f"Dataset file {path_or_id!r} does not exist (set `{option}` to an existing file).")
    if hub_offline():
        raise ConnectionError(
            f"Cannot open dataset {path_or_id!r}: the Hugging Face hub is not reachable (offline). Download it on a "
            f"connected machine (e.g. `hf download --repo-type dataset {path_or_id} --local-dir <DIR>`) "
            f"and set `{option}` to the local .json/.jsonl/.parquet file or folder."
        )
    return datasets.load_dataset(path_or_id, config_name, split=split, streaming=streaming)
