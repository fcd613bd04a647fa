"""The default: `moa-train` with no overrides trains and evaluates the quickstart, from an empty cache."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_quickstart_beats_the_base_model(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    started = time.monotonic()
    cache = tmp_path / "cache"  # empty: the data is generated, only the model conversion is cached
    result = run_cli(
        "moa-train",
        f"hydra.run.dir={run_dir}",
        "logger=none",
        cwd=tmp_path,
        timeout=3600,
        env={"MOA_TRAIN_CACHE": str(cache)},
    )
    minutes = (time.monotonic() - started) / 60
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"quickstart accuracy: base=(\d\.\d+) tuned=(\d\.\d+)", last)
    assert match, f"unexpected last line: {last!r}"
    base, tuned = float(match.group(1)), float(match.group(2))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["base_accuracy"] == pytest.approx(base, abs=5e-4)
    assert summary["tuned_accuracy"] == pytest.approx(tuned, abs=5e-4)
    assert summary["eval_records"] == 200
    print(f"quickstart: {minutes:.1f} min, base={base:.3f} tuned={tuned:.3f}")
    assert tuned >= 0.40 and tuned - base >= 0.30
    assert sorted(p.name for p in cache.iterdir()) == ["models"]  # nothing downloaded or cached but the model
