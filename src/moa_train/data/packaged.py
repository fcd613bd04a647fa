"""Packaged data: multiple-choice records that ship inside moa_train (``data.source: packaged``).

``commonsense_mix/commonsense_mix.jsonl.xz`` holds LLM-Adapters records of ARC-Easy, ARC-Challenge,
BoolQ and OpenBookQA: every item of their *training* files (minus repeats and questions that also
occur in a test file) and 100 held-out items per *test* file. Its README (origin, counts) and
``DATA_LICENSE`` (ODC-By, plus each benchmark's own terms) sit beside it; the file is rebuilt by
``scripts/build_commonsense_mix.py``. Reading it needs no network and writes nothing.
"""

from __future__ import annotations

import json
import lzma
from collections.abc import Sequence
from importlib import resources
from typing import Any

from moa_train.errors import MoATrainError

PACKAGES = {"commonsense_mix": "commonsense_mix/commonsense_mix.jsonl.xz"}


def _labels(instruction: str) -> list[str]:
    """The item's label words, from its closing ``Answer format: a/b/...`` line."""
    tail = instruction.rsplit("Answer format:", 1)
    return [w.strip() for w in tail[1].split("/")] if len(tail) == 2 else []


def read_package(package: str) -> list[dict[str, Any]]:
    """Raw items (``split``, ``task``, ``instruction``, ``answer``) of a packaged data file."""
    if package not in PACKAGES:
        raise MoATrainError(f"data.package must be one of {', '.join(PACKAGES)}, got {package!r}")
    resource = resources.files("moa_train.data").joinpath(PACKAGES[package])
    try:
        text = lzma.decompress(resource.read_bytes()).decode("utf-8")
    except (OSError, lzma.LZMAError) as exc:
        raise MoATrainError(
            f"packaged data {PACKAGES[package]} is missing or damaged ({exc}); reinstall moa_train"
        ) from None
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def build_splits(
    package: str, tasks: Sequence[str] | None = None, test_per_task: int | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Train/held-out records of the chosen tasks (all when ``tasks`` is empty), in file order."""
    items = read_package(package)
    available = sorted({item["task"] for item in items})
    chosen = [str(t) for t in tasks] if tasks else available
    unknown = [t for t in chosen if t not in available]
    if unknown:
        raise MoATrainError(
            f"data.tasks of data={package}: unknown {', '.join(unknown)}; choose from {', '.join(available)}"
        )
    shipped = {t: sum(1 for i in items if i["task"] == t and i["split"] == "test") for t in chosen}
    if test_per_task is not None and not 1 <= test_per_task <= min(shipped.values()):
        raise MoATrainError(
            f"data.test_per_task must be between 1 and {min(shipped.values())} for data={package}, "
            f"got {test_per_task}"
        )
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    taken: dict[str, int] = {}
    for item in items:
        if item["task"] not in chosen:
            continue
        if item["split"] == "test":
            taken[item["task"]] = taken.get(item["task"], 0) + 1
            if test_per_task is not None and taken[item["task"]] > test_per_task:
                continue
        splits[item["split"]].append(
            {
                "instruction": item["instruction"],
                "input": "",
                "output": f"the correct answer is {item['answer']}",
                "answer": item["answer"],
                "answer_type": "label",
                "labels": _labels(item["instruction"]),
                "task": item["task"],
            }
        )
    return splits
