"""What the install instructions promise holds: the extras they name exist, `make setup` downloads no data."""

from __future__ import annotations

import re
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
    assert commands and commands[-1] == "touch $(STAMP)"
    package_step = re.compile(
        r"(test -x \$\(BIN\)/python \|\| )?\$\((PYTHON|BIN)\)(/python)? -m (venv|pip install) "
    )
    for command in commands[:-1]:
        assert package_step.match(command), f"make setup runs more than a package install: {command}"
    assert not re.search(r"curl|wget|urllib|bigbench", recipe)
