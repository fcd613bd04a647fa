"""moa_train.files, the one home for durable writes: a folder written with atomic_dir is complete or absent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from moa_train.files import atomic_dir, config_dir


def test_atomic_dir_renames_a_complete_folder_with_usable_subfolders(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "out"
    with atomic_dir(target) as tmp:
        assert not target.exists()
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("a")
        (tmp / "b.txt").write_text("b")
    assert (target / "sub" / "a.txt").read_text() == "a" and (target / "b.txt").read_text() == "b"
    assert os.access(target / "sub", os.X_OK)  # a folder keeps its search bit
    assert [p.name for p in target.parent.iterdir()] == ["out"]  # no temp folder left behind


def test_atomic_dir_leaves_nothing_when_the_block_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_keeps_a_folder_completed_meanwhile_and_can_refuse_instead(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:  # a cache: the other process's copy is as good as ours
        (tmp / "ours.txt").write_text("ours")
        target.mkdir()
        (target / "theirs.txt").write_text("theirs")
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]

    with pytest.raises(OSError), atomic_dir(target, keep_theirs=False) as tmp:  # an export: never replaced
        (tmp / "ours.txt").write_text("ours")
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_config_dir_holds_the_packaged_configs_without_loading_torch() -> None:
    assert (config_dir() / "train.yaml").is_file() and (config_dir() / "decoding").is_dir()
    code = "import sys, moa_train.files, moa_train.cli.help; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
