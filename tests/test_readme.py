"""The README is a short entry point whose commands work: every command it shows exists, every config and
file it names is there and parses, and it carries no commit hashes or issue references."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def shell_lines(text: str) -> list[str]:
    """The commands of the ```bash blocks, continuation lines joined, one per `&&`/`&`-separated part."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands += [part.strip().rstrip("&").strip() for part in re.split(r"&&", line) if part.strip()]
    return commands


def test_readme_is_short_and_free_of_history():
    assert len(README) <= 12_000, f"README.md is {len(README)} characters; move detail into docs/"
    assert not re.search(r"(?<![0-9a-zA-Z])[0-9a-f]{7,40}(?![0-9a-zA-Z])", README), "a commit hash in README.md"
    assert not re.search(r"\bissue\b|#\d+\b", README, flags=re.I), "an issue reference in README.md"


def test_readme_keeps_two_setup_to_result_commands():
    setups = [line for line in shell_lines(README) if line.startswith("python3 -m venv")]
    assert len(setups) == 2, setups
    assert re.search(r"```bash\npython3 -m venv .*fedrefine-toy\n```", README)
    assert re.search(r"```bash\npython3 -m venv .*python -m pytest -q\n```", README)


def test_every_command_in_the_readme_exists_and_its_files_parse():
    from fedrefine.cli import SUBCOMMANDS

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    checked = 0
    for command in shell_lines(README):
        words = shlex.split(command)
        if words[0] in scripts:
            if words[0] == "fedrefine":
                assert words[1] in SUBCOMMANDS, command
            checked += 1
        for flag, value in zip(words, words[1:]):
            if flag == "--config" and not value.startswith("runs/"):  # runs/...: written by the command before it
                assert yaml.safe_load((ROOT / value).read_text()), value
    assert checked >= 8


def test_every_local_link_and_named_config_in_the_readme_exists():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
    for path in re.findall(r"`((?:configs|benchmarks)/[\w./-]+\.(?:yaml|md|py))`", README):
        assert (ROOT / path).exists(), path
    for path in re.findall(r"\b(configs/[\w/-]+\.yaml)\b", README):
        yaml.safe_load((ROOT / path).read_text())


@pytest.mark.parametrize("name", sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                                        ["optional-dependencies"]))
def test_extras_are_spelled_as_every_pip_reads_them(name):
    """Older pips do not normalise an extra's name (PEP 685): a declared ``lm_eval`` was installed as nothing."""
    assert name == re.sub(r"[-_.]+", "-", name).lower()


def test_install_commands_name_declared_extras():
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    texts = [README, *(p.read_text() for p in (ROOT / "docs").rglob("*.md")), (ROOT / "CONTRIBUTING.md").read_text()]
    named = {extra for text in texts for group in re.findall(r'\.\[([\w,.-]+)\]', text) for extra in group.split(",")}
    assert named and named <= extras, named - extras
