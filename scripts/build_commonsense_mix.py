"""Build the packaged commonsense mix (src/moa_train/data/commonsense_mix/) from LLM-Adapters files.

    python scripts/build_commonsense_mix.py /path/to/LLM-Adapters/dataset

Reads ``<Name>/train.json`` and ``<Name>/test.json`` of ARC-Easy, ARC-Challenge, boolq and openbookqa
(the LLM-Adapters ``dataset/`` folder, commit 8166572) and writes ``commonsense_mix.jsonl.xz``:

* training items: every record of the four *training* files, minus exact repeats and minus any
  question that also occurs in one of the four test files (so a model trained on the mix is never
  scored on its own training items by ``eval=commonsense8`` either);
* held-out items: ``HELD_OUT`` records per *test* file, the ones whose SHA-256 of the question sorts
  first (a fixed, documented choice, independent of file order).

The output is deterministic: training items first, then held-out items, each ordered by SHA-256 of
the question (which interleaves the tasks), written as
JSON lines with sorted keys and compressed with xz (preset 9, no timestamps in the stream).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import sys
from pathlib import Path

TASKS = ("ARC-Easy", "ARC-Challenge", "boolq", "openbookqa")
HELD_OUT = 100
OUT = Path(__file__).resolve().parents[1] / "src" / "moa_train" / "data" / "commonsense_mix"


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _read(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


def _item(record: dict, task: str, split: str) -> dict:
    assert record["output"] == f"the correct answer is {record['answer']}", record
    assert not record.get("input"), record
    return {"split": split, "task": task, "instruction": record["instruction"], "answer": record["answer"]}


def build(source: Path) -> tuple[list[dict], dict]:
    tests = {task: _read(source / task / "test.json") for task in TASKS}
    test_questions = {r["instruction"] for records in tests.values() for r in records}
    items: list[dict] = []
    counts: dict = {}
    for task in TASKS:
        seen: set[str] = set()
        train = []
        dropped = {"repeats": 0, "in_a_test_file": 0}
        for record in _read(source / task / "train.json"):
            if record["instruction"] in seen:
                dropped["repeats"] += 1
                continue
            seen.add(record["instruction"])
            if record["instruction"] in test_questions:
                dropped["in_a_test_file"] += 1
                continue
            train.append(_item(record, task, "train"))
        unique_tests = {r["instruction"]: r for r in tests[task]}  # a repeated question counts once
        held = sorted(unique_tests.values(), key=lambda r: _key(r["instruction"]))[:HELD_OUT]
        items += sorted(train, key=lambda r: _key(r["instruction"]))
        items += [_item(r, task, "test") for r in held]
        counts[task] = {"train": len(train), "test": len(held), "dropped": dropped}
    # tasks interleaved (order by question hash), so a num_train / num_test cap keeps all four
    items.sort(key=lambda r: (r["split"] != "train", _key(r["instruction"])))
    return items, counts


def main() -> None:
    if len(sys.argv) != 2 or not Path(sys.argv[1], "boolq", "train.json").is_file():
        raise SystemExit("usage: python scripts/build_commonsense_mix.py <LLM-Adapters dataset/ folder>")
    items, counts = build(Path(sys.argv[1]))
    text = "".join(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n" for item in items)
    OUT.mkdir(parents=True, exist_ok=True)
    data = lzma.compress(text.encode("utf-8"), format=lzma.FORMAT_XZ, preset=9)
    (OUT / "commonsense_mix.jsonl.xz").write_bytes(data)
    print(json.dumps(counts, indent=1))
    print(
        f"{len(items)} records, {len(text.encode())} bytes -> {len(data)} bytes xz, sha256 {_key_bytes(data)}"
    )


def _key_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


if __name__ == "__main__":
    main()
