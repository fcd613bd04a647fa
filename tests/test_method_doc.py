"""docs/method.md is the method reference: every `spec X.Y` cited in the code, configs and docs is a
heading there, and the project's text cites no tracker issue numbers."""

from __future__ import annotations

import re

from conftest import REPO

METHOD = REPO / "docs" / "method.md"
CITATION = re.compile(r"\bspec ([A-G](?:\.\d+)?)\b")
RELATED = re.compile(r"related-methods spec (\d+)")
ISSUE = re.compile(r"\bissues? ?#?\d+|/issues/\d+", re.I)


def _texts():
    roots = [REPO / "src" / "moa_train", REPO / "configs", REPO / "docs"]
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.suffix in (".py", ".yaml", ".md") and path.is_file():
                yield path, path.read_text(encoding="utf-8")
    yield REPO / "README.md", (REPO / "README.md").read_text(encoding="utf-8")


def test_every_cited_spec_section_is_a_heading_of_method_md() -> None:
    headings = set()
    for line in METHOD.read_text(encoding="utf-8").splitlines():
        match = re.match(r"#{2,3} ([A-G](?:\.\d+)?)[. ]|#{3} Related-methods (\d+):", line)
        if match:
            headings.add(match.group(1) or f"R{match.group(2)}")
    assert {"A", "A.1", "G.12", "R7"} <= headings
    missing = []
    for path, text in _texts():
        cited = set(CITATION.findall(text)) | {f"R{n}" for n in RELATED.findall(text)}
        missing += [f"{path.relative_to(REPO)}: spec {c}" for c in sorted(cited - headings)]
    assert not missing, "cited but not a heading of docs/method.md:\n" + "\n".join(missing)


def test_no_tracker_issue_numbers_in_code_configs_or_docs() -> None:
    found = [
        f"{path.relative_to(REPO)}: {match.group(0)}"
        for path, text in _texts()
        for match in ISSUE.finditer(text)
        # links to upstream projects' public issue threads are sources, not our tracker
        if "github.com" not in text[max(0, match.start() - 80) : match.start()]
    ]
    assert not found, "\n".join(found)
