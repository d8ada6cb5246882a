"""The docs site names everything a user can set or run: every ``fedrefine`` subcommand and every field of
every ``@documented`` config class appears in the generated reference pages, and every page is in the nav."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def reference_hook():
    spec = importlib.util.spec_from_file_location("docs_reference_hook", ROOT / "docs/hooks/reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_reference_names_every_subcommand_and_its_options():
    from fedrefine.cli import SUBCOMMANDS, bench_parser

    text = reference_hook().cli_markdown()
    for name in SUBCOMMANDS:
        assert f"## `fedrefine {name}`" in text, name
    assert "## `fedrefine-toy`" in text
    for action in bench_parser()._actions:  # the options themselves, not only the names
        for option in action.option_strings:
            if option.startswith("--") and "." not in option:
                assert option in text, option


def test_the_config_reference_names_every_field_of_every_documented_class():
    from fedrefine.settings import DOCUMENTED

    hook = reference_hook()
    text = hook.config_markdown()
    assert len(DOCUMENTED) >= 10
    for cls in DOCUMENTED:
        assert f"`{cls.__module__}.{cls.__qualname__}`" in text
        for field in dataclasses.fields(cls):
            assert f"| `{field.name}` |" in text, f"{cls.__qualname__}.{field.name}"


def _nav_pages(entries) -> list[str]:
    pages = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_exists():
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)  # tags-free load of the nav
    nav = set(_nav_pages(config["nav"]))
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert nav == pages, {"not in nav": pages - nav, "missing": nav - pages}
