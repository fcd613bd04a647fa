"""`moa-train --help` / `moa-eval --help`: what the command does, three examples, its own groups, the docs."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli
from moa_train.cli.help import group_choices

GROUPS = {
    "moa-train": ["experiment", "model", "data", "experts", "router", "optimizer", "scheduler", "trainer",
                  "logger", "launcher", "debug"],
    "moa-eval": ["eval", "decoding", "model", "logger"],
}  # fmt: skip


@pytest.mark.parametrize("command", sorted(GROUPS))
def test_help_says_what_the_command_does_with_examples_and_only_its_groups(
    command: str, tmp_path: Path
) -> None:
    done = run_cli(command, "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert text.startswith(f"{command}: ") and "powered by Hydra" not in text
    examples = [line for line in text.splitlines() if line.startswith(f"  {command}")]
    assert len(examples) == 3 and any(" -m " in line for line in examples)  # the last one is a sweep
    listed = [line.split(":")[0] for line in text.splitlines() if line and line[0].isalpha() and ": " in line]
    groups = [name for name in listed if name in {g for gs in GROUPS.values() for g in gs}]
    assert groups == GROUPS[command]  # the train help has no eval / decoding groups, and vice versa
    assert group_choices(GROUPS[command][0]) in text  # the real choices, read from the configs
    assert "Docs: " in text and "docs/" in text


def test_export_help_names_its_keys_and_examples(tmp_path: Path) -> None:
    """moa-export is a Hydra command too: its help lists the keys and two runnable examples."""
    done = run_cli("moa-export", "--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert text.startswith("moa-export: ") and "powered by Hydra" not in text
    examples = [line for line in text.splitlines() if line.startswith("  moa-export ")]
    assert len(examples) == 2 and all("format=" in line and "out=" in line for line in examples)
    assert "format=peft|merged" in text and "Docs: docs/integrations.md" in text
