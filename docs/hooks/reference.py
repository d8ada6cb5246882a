"""MkDocs hook: fills the reference pages from the code, so they cannot fall behind it.

``docs/reference/cli.md`` gets every ``fedrefine`` subcommand (from ``fedrefine.cli.SUBCOMMANDS``) with the
``--help`` of those that have their own parser; ``docs/reference/config.md`` gets every field of every
``@documented`` config dataclass (``fedrefine.settings.DOCUMENTED``) with its type, default and help.
``tests/test_docs.py`` checks that both name everything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os
import pkgutil
import sys

CLI_MARKER = "<!-- generated: cli -->"
CONFIG_MARKER = "<!-- generated: config -->"

#: Subcommands run by LightningCLI: their options are the config (see the configuration reference).
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: Extra ``--help`` pages beyond one per subcommand.
NESTED_HELP = {"serve": (["serve", "participant"], ["serve", "registry"])}


def command_help(argv: list[str]) -> str:
    """What ``fedrefine ARGV --help`` prints (in-process, 100 columns wide)."""
    from fedrefine import cli

    out = io.StringIO()
    saved_argv, saved_columns = sys.argv, os.environ.get("COLUMNS")
    sys.argv, os.environ["COLUMNS"] = ["fedrefine", *argv, "--help"], "100"
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), contextlib.suppress(SystemExit):
            cli.main()
    finally:
        sys.argv = saved_argv
        if saved_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved_columns
    return out.getvalue().rstrip()


def toy_help() -> str:
    from fedrefine import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        cli.toy_main(["--help"])
    return out.getvalue().rstrip()


def cli_markdown() -> str:
    from fedrefine.cli import SUBCOMMANDS

    parts = []
    for name, text in SUBCOMMANDS.items():
        parts.append(f"## `fedrefine {name}`\n\n{text[0].upper()}{text[1:]}.\n")
        if name in LIGHTNING_SUBCOMMANDS:
            parts.append(f"A LightningCLI subcommand: `fedrefine {name} --config CONFIG.yaml [--section.field VALUE ...]`. "
                         "Its options are the config's fields (see [Configuration](config.md)); "
                         f"`fedrefine {name} --help` lists them all, `--print_config` prints the resolved config.\n")
            continue
        for argv in NESTED_HELP.get(name, ([name],)):
            parts.append(f"```text\n$ fedrefine {' '.join(argv)} --help\n{command_help(argv)}\n```\n")
    parts.append(f"## `fedrefine-toy`\n\n```text\n$ fedrefine-toy --help\n{toy_help()}\n```\n")
    return "\n".join(parts)


def import_all() -> None:
    """Import every fedrefine module, so that every ``@documented`` class is registered."""
    import fedrefine

    for module in pkgutil.walk_packages(fedrefine.__path__, "fedrefine."):
        if module.name.endswith("__main__") or ".protos." in module.name:
            continue
        importlib.import_module(module.name)


def _type_name(field: dataclasses.Field) -> str:
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    return str(kind).replace("|", "\\|")


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return f"`{field.default!r}`"
    if field.default_factory is not dataclasses.MISSING:
        return f"`{field.default_factory()!r}`"
    return "required"


def config_markdown() -> str:
    from fedrefine.settings import DOCUMENTED

    import_all()
    parts = []
    for cls in sorted(set(DOCUMENTED), key=lambda c: (c.__module__, c.__qualname__)):
        summary = (cls.__doc__ or "").split("\n\nArgs:")[0].strip()
        parts.append(f"## `{cls.__module__}.{cls.__qualname__}`\n\n{summary}\n")
        parts.append("| field | type | default | what it does |\n|---|---|---|---|")
        for field in dataclasses.fields(cls):
            text = " ".join(field.metadata["help"].split()).replace("|", "\\|")
            parts.append(f"| `{field.name}` | `{_type_name(field)}` | {_default(field)} | {text} |")
        parts.append("")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 - MkDocs hook signature
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_markdown())
    if CONFIG_MARKER in markdown:
        markdown = markdown.replace(CONFIG_MARKER, config_markdown())
    return markdown
