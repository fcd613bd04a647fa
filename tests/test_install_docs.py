"""What the install instructions promise holds: the extras they name exist, `make setup` downloads no data
and refuses a disk too full for its virtual environment before it writes anything."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# pip install -e ".[dev,quant]", pip install ".[quant]", pip install "moa_train[quant]"
EXTRAS = re.compile(r"pip install[^\n`]*?(?:\.|moa_train)\[([A-Za-z0-9_,\- ]+)\]")


def test_every_extra_the_docs_name_is_defined() -> None:
    defined = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = {}
    for path in [*DOCS, REPO / "pyproject.toml", REPO / "Makefile"]:
        for match in EXTRAS.finditer(path.read_text(encoding="utf-8")):
            for extra in match.group(1).split(","):
                named.setdefault(extra.strip(), path.name)
    assert "dev" in named and "quant" in named  # the README's install section names both
    missing = {extra: where for extra, where in named.items() if extra not in defined}
    assert not missing, f"extras named in the docs but not in pyproject.toml: {missing}"


def test_make_setup_downloads_nothing_but_packages() -> None:
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("$(STAMP): pyproject.toml\n", 1)[1].split("\n\n", 1)[0]
    commands = [line.strip() for line in recipe.splitlines() if line.strip()]
    disk_check = "@test -x $(BIN)/python || $(PYTHON) scripts/check_disk.py $(SETUP_GIB) ."
    assert commands[0] == disk_check  # before the venv exists, nothing else runs first
    commands = commands[1:]
    assert commands and commands[-1] == "touch $(STAMP)"
    package_step = re.compile(
        r"(test -x \$\(BIN\)/python \|\| )?\$\((PYTHON|BIN)\)(/python)? -m (venv|pip install) "
    )
    for command in commands[:-1]:
        assert package_step.match(command), f"make setup runs more than a package install: {command}"
    assert not re.search(r"curl|wget|urllib|bigbench", recipe)


def test_make_setup_on_a_full_disk_stops_with_one_line_before_making_the_venv(tmp_path) -> None:
    for name in ("Makefile", "pyproject.toml", "scripts/check_disk.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    free_gib = shutil.disk_usage(tmp_path).free / 2**30
    proc = subprocess.run(
        ["make", "setup", f"SETUP_GIB={free_gib * 10 + 1:.0f}"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "GiB free on the disk of ." in errors[0] and "free some space" in errors[0]
    assert not (tmp_path / ".venv").exists()  # stopped before `python -m venv`


@pytest.mark.parametrize(
    "args, code", [(["0"], 0), (["1e9"], 1), (["lots"], 2), ([], 2)], ids=["room", "full", "nan", "no-args"]
)
def test_check_disk_exit_codes(args: list[str], code: int, tmp_path) -> None:
    path = [str(tmp_path)] if args else []  # with no GIB, no PATH either: the usage line
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts/check_disk.py"), *args, *path], capture_output=True, text=True
    )
    assert proc.returncode == code
    assert proc.stderr.count("\n") == (0 if code == 0 else 1)
