"""docs/support_matrix.md and the README's support table are what scripts/support_matrix.py renders
from the tests of tests/core/test_families.py (collected, not run: the suite runs them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "support_matrix.py"


def _script():
    spec = importlib.util.spec_from_file_location("support_matrix", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_support_matrix_page_is_up_to_date() -> None:
    assert _script().check() == []


def test_a_cell_is_green_only_when_all_its_tests_passed() -> None:
    script = _script()
    assert script._mark(["passed", "passed"]) == "✅"
    assert script._mark(["passed", "failed"]) == "❌"
    assert script._mark(["passed", "skipped: no GPU"]) == "⏭"
    assert script._mark([]) == "—"
