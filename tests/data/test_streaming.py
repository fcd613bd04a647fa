"""data.streaming: the JSONL stream's order, epochs and exact resume position."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moa_train.data.streaming import JsonlStream, StreamPosition
from moa_train.errors import MoATrainError


def _convert(item, path, index):
    if "n" not in item:
        raise MoATrainError(f"{path}: record {index} has no 'n'")
    return dict(item, at=(Path(path).name, index))


def _files(tmp_path: Path) -> list[Path]:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(4)) + "\n")  # a blank line is skipped
    b.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(4, 7)))  # no final newline either
    return [a, b]


def test_stream_order_epochs_and_resume_from_a_saved_position(tmp_path: Path) -> None:
    paths = _files(tmp_path)
    stream = JsonlStream(paths, _convert)
    seen = [r["n"] for _ in range(5) for r in stream.take(3)]
    assert seen == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 0]
    assert stream.position.epoch == 2
    at = [r["at"] for r in JsonlStream(paths, _convert).take(6)][3:]
    assert at == [("a.jsonl", 3), ("b.jsonl", 0), ("b.jsonl", 1)]
    first = JsonlStream(paths, _convert)
    first.take(5)
    saved = json.loads(json.dumps(first.position.to_dict()))  # as a checkpoint stores it
    rest = [r["n"] for r in first.take(6)]
    resumed = JsonlStream(paths, _convert, StreamPosition.from_dict(saved))
    assert [r["n"] for r in resumed.take(6)] == rest == [5, 6, 0, 1, 2, 3]


def test_stream_bad_inputs(tmp_path: Path) -> None:
    paths = _files(tmp_path)
    with pytest.raises(MoATrainError, match="is not .jsonl"):
        JsonlStream([tmp_path / "x.json"], _convert)
    with pytest.raises(MoATrainError, match="data file not found"):
        JsonlStream([tmp_path / "missing.jsonl"], _convert)
    with pytest.raises(MoATrainError, match="stream position .* is damaged"):
        StreamPosition.from_dict({"epoch": -1, "file": 0, "offset": 0, "records": 0})
    with pytest.raises(MoATrainError, match="has 2 files"):
        JsonlStream(paths, _convert, StreamPosition(file=5))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"n": 1}\n{"n": \n')
    with pytest.raises(MoATrainError, match=r"broken.jsonl: record 1 \(byte 9\) is not valid JSON"):
        JsonlStream([broken], _convert).take(2)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(MoATrainError, match="holds no records"):
        JsonlStream([empty], _convert).take(1)
