"""Commands the README shows, read from README.md so that tests use exactly what a user is told to type."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_section(title: str) -> str:
    """The text of the README section ``## <title>`` (up to the next ``## `` heading)."""
    text = README.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    if match is None:
        raise AssertionError(f"README.md has no section '## {title}'")
    return match.group(1)


def tensorboard_command() -> list[str]:
    """The ``tensorboard ...`` command of the README's "Viewing the maps" section, split into arguments."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", readme_section("Viewing the maps"), flags=re.M | re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("tensorboard ")]
    if len(lines) != 1:
        raise AssertionError(f"expected one tensorboard command in README's 'Viewing the maps', found {lines}")
    return shlex.split(lines[0])


def with_logdir(command: list[str], logdir: str | Path) -> list[str]:
    """``command`` with the value of its ``--logdir`` replaced by ``logdir``."""
    if "--logdir" not in command:
        raise AssertionError(f"the README's tensorboard command has no --logdir: {command}")
    position = command.index("--logdir") + 1
    return [*command[:position], str(logdir), *command[position + 1 :]]
