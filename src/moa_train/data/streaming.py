"""Streaming training data (``data.streaming=true``): JSONL files read as they are consumed, never whole.

:class:`JsonlStream` hands out the next records of ``data.train_path`` files, in file order, epoch after
epoch, and knows its exact position: ``(epoch, file, byte offset, records read)`` of the next record.
The training loop saves that position with each checkpoint (``TrainState.extra["stream"]``), so a
resumed run (after kill -9 too) continues at the exact record the interrupted one would have read next.

Processes: every process reads the same lines (reading is cheap next to a forward pass) and takes its
own slice of each global batch, exactly as for in-memory data, so the global batches and the position
are the same on every process and one saved position serves them all.

What streaming changes: there is no shuffle (records come in file order; shuffle the files beforehand),
no length grouping, no ``data.val_size`` (use ``data.val_path``), no packing, and the run length must be
given as ``trainer.max_steps`` (the number of records is not known up front).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moa_train.data import cfg_value
from moa_train.data.records import infer_answer_type, validate_record
from moa_train.errors import MoATrainError


@dataclass
class StreamPosition:
    """The next record to read: ``file`` index in the list, ``offset`` in bytes, ``records`` read so far
    from that file (the next record's index in it), ``epoch`` (passes over all files done)."""

    epoch: int = 0
    file: int = 0
    offset: int = 0
    records: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> StreamPosition:
        keys = ("epoch", "file", "offset", "records")
        if not isinstance(data, dict) or any(not isinstance(data.get(k), int) or data[k] < 0 for k in keys):
            raise MoATrainError(
                f"the checkpoint's stream position {data!r} is damaged; resume from another checkpoint"
            )
        return cls(**{k: data[k] for k in keys})


class JsonlStream:
    """The records of JSONL ``paths``, in order, cycling over epochs; ``convert(item, path, index)``
    validates each raw item into a record (one-line errors name the file and the record's index)."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        convert: Callable[[Any, str, int], dict[str, Any]],
        position: StreamPosition | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise MoATrainError("data.streaming=true needs data.train_path (JSONL files)")
        for path in self.paths:
            if path.suffix.lower() != ".jsonl":
                raise MoATrainError(
                    f"data.streaming=true reads JSONL files; {path} is not .jsonl (convert it)"
                )
            if not path.is_file():
                raise MoATrainError(f"data file not found: {path} (data.train_path)")
        self.convert = convert
        self.position = position or StreamPosition()
        if self.position.file >= len(self.paths):
            raise MoATrainError(
                f"the checkpoint's stream position is in file {self.position.file}, but data.train_path has "
                f"{len(self.paths)} files; resume with the same data.train_path"
            )

    def take(self, count: int) -> list[dict[str, Any]]:
        """The next ``count`` records (wrapping into the next epoch at the end of the last file)."""
        out: list[dict[str, Any]] = []
        empty_pass = True
        while len(out) < count:
            pos = self.position
            path = self.paths[pos.file]
            with open(path, "rb") as f:
                f.seek(pos.offset)
                while len(out) < count:
                    raw = f.readline()
                    if not raw:
                        break
                    line_start = pos.offset
                    pos.offset += len(raw)
                    if not raw.strip():
                        continue
                    index = pos.records
                    pos.records += 1
                    try:
                        item = json.loads(raw)
                    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                        raise MoATrainError(
                            f"{path}: record {index} (byte {line_start}) is not valid JSON ({exc}); fix or remove it"
                        ) from None
                    out.append(self.convert(item, str(path), index))
                    empty_pass = False
            if len(out) < count:  # end of this file: next file, or the next epoch
                pos.file, pos.offset, pos.records = pos.file + 1, 0, 0
                if pos.file == len(self.paths):
                    if empty_pass:
                        raise MoATrainError(
                            f"data.train_path {[str(p) for p in self.paths]} holds no records"
                        )
                    pos.epoch, pos.file, empty_pass = pos.epoch + 1, 0, True
        return out


def record_converter(data_cfg: Any) -> Callable[[Any, str, int], dict[str, Any]]:
    """``convert(item, path, index)`` for :class:`JsonlStream`: the checks of in-memory records
    (``validate_record``, chat records included), then ``dataset`` (``data.name``) and ``answer_type``
    (``data.answer_type``, the record's own, else inferred from the dataset name: a stream's answers are
    not all known up front)."""
    name = str(cfg_value(data_cfg, "name", "data"))
    answer_type = cfg_value(data_cfg, "answer_type")
    inferred = answer_type or infer_answer_type(name)

    def convert(item: Any, path: str, index: int) -> dict[str, Any]:
        record = validate_record(item, index, path, "train")
        record["dataset"] = name
        record["answer_type"] = answer_type or record.get("answer_type") or inferred
        return record

    return convert
