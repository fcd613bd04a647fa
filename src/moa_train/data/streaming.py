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

from moa_train.errors import MoATrainError


@dataclass
class StreamPosition:
    """The next record to read: ``file`` index in the list, ``offset`` in bytes, ``records`` read so far
    in this epoch (for messages), ``epoch`` (passes over all files done)."""

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
    """The records of JSONL ``paths``, in order, cycling over epochs; ``convert(item, where)`` validates
    each raw item into a record (one-line errors name the file and line)."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        convert: Callable[[Any, str], dict[str, Any]],
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
                    pos.records += 1
                    where = f"{path} byte {line_start} (record {pos.records} of epoch {pos.epoch})"
                    try:
                        item = json.loads(raw)
                    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                        raise MoATrainError(
                            f"{where}: not valid JSON ({exc}); fix or remove the line"
                        ) from None
                    out.append(self.convert(item, where))
                    empty_pass = False
            if len(out) < count:  # end of this file: next file, or the next epoch
                pos.file, pos.offset = pos.file + 1, 0
                if pos.file == len(self.paths):
                    if empty_pass:
                        raise MoATrainError(
                            f"data.train_path {[str(p) for p in self.paths]} holds no records"
                        )
                    pos.epoch, pos.file, pos.records, empty_pass = pos.epoch + 1, 0, 0, True
        return out
