"""Per-field help on config dataclasses, in one place: ``field(metadata={"help": ...})`` (peft's style),
copied into the class docstring's ``Args:`` section so that ``--help`` of the CLI shows it too."""

from __future__ import annotations

import dataclasses
import textwrap
from typing import TypeVar

ConfigClass = TypeVar("ConfigClass", bound=type)

#: Every ``@documented`` config class, in definition order: the docs' configuration reference lists their fields.
DOCUMENTED: list[type] = []


class SettingsError(ValueError):
    """Settings that contradict each other (the message names both and the fix)."""


def documented(cls: ConfigClass) -> ConfigClass:
    """Append an ``Args:`` section built from each field's ``metadata["help"]`` to a dataclass's docstring.

    Every field must have help: a config option nobody can look up is a bug.
    """
    missing = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("help")]
    if missing:
        raise TypeError(f"{cls.__name__}: give field(s) {missing} a metadata help text.")
    lines = [(cls.__doc__ or cls.__name__).rstrip(), "", "Args:"]
    for f in dataclasses.fields(cls):
        text = " ".join(f.metadata["help"].split())
        lines += textwrap.wrap(f"{f.name}: {text}", width=96, initial_indent="    ", subsequent_indent="        ")
    cls.__doc__ = "\n".join(lines) + "\n"
    DOCUMENTED.append(cls)
    return cls
