"""LLM-Adapters records: reading, validation and answer types.

A record is ``{"instruction", "input", "output", "answer"}`` (strings; ``input`` may be empty) plus

* ``dataset``     -- the dataset name; the evaluator groups and scores per dataset;
* ``answer_type`` -- ``numeric`` (last number), ``label`` (answerN / true|false / solutionN / optionN)
  or ``letter`` (AQuA-style A-E); it picks the extraction rule.

Sources: a local JSON list or JSONL file, or a Hugging Face hub dataset.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from moa_train.data.answers import infer_answer_type as _infer
from moa_train.data.chat import chat_record, is_chat_record
from moa_train.errors import MoATrainError

ANSWER_TYPES = ("numeric", "label", "letter")
TEXT_FIELDS = ("instruction", "input", "output", "answer")
# What each split needs: training uses instruction/output, evaluation instruction/answer.
REQUIRED_FIELDS = {"train": ("instruction", "output"), "test": ("instruction", "answer")}
_SPLIT_STEMS = ("train", "test", "validation", "valid", "dev", "eval")


def dataset_name_for(path: str | os.PathLike[str]) -> str:
    """Dataset name of a file: its folder for the ``<Dataset>/test.json`` layout, else its stem."""
    path = Path(path)
    return path.parent.name if path.stem.lower() in _SPLIT_STEMS and path.parent.name else path.stem


def infer_answer_type(dataset: str, answers: Iterable[Any] = ()) -> str:
    """``numeric`` | ``label`` | ``letter`` from the dataset name (known suites) or its gold answers.

    Delegates to the evaluator's rule table so that training data and evaluation agree.
    """
    return _infer(dataset, [str(a) for a in answers])


def read_json_records(path: str | os.PathLike[str]) -> list[Any]:
    """Raw items of a JSON list or JSONL file (one-line error for a missing or malformed file)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MoATrainError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MoATrainError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    except OSError as exc:
        raise MoATrainError(f"{path}: cannot be read ({exc.strerror})") from None
    if path.suffix.lower() != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            # a .json file that holds JSON lines is common enough to accept
            if "Extra data" not in str(exc):
                raise MoATrainError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        else:
            if not isinstance(data, list):
                raise MoATrainError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
            return data
    items = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise MoATrainError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from None
    return items


def validate_record(item: Any, index: int, source: str, split: str = "train") -> dict[str, Any]:
    """Check one raw item and return a clean record (text fields as strings, ``input`` defaulting to "").

    ``split`` selects the required fields (see ``REQUIRED_FIELDS``). Errors are one line naming the
    source, the record index and the field.
    """
    if not isinstance(item, Mapping):
        raise MoATrainError(f"{source}: record {index} is a {type(item).__name__}, expected a JSON object")

    if is_chat_record(item):  # messages / ShareGPT conversations (data/chat.py)
        return chat_record(item, f"{source}: record {index}")
    for field in REQUIRED_FIELDS.get(split, REQUIRED_FIELDS["train"]):
        if item.get(field) is None:
            raise MoATrainError(f"{source}: record {index} has no {field!r} field")
    record = dict(item)
    for field in TEXT_FIELDS:
        value = item.get(field)
        if isinstance(value, Mapping | list | tuple):  # str() of it would silently train on "{'a': 1}"
            raise MoATrainError(
                f"{source}: record {index} field {field!r} is a {type(value).__name__}; expected text"
            )
        record[field] = "" if value is None else str(value)
    record["answer"] = record["answer"].strip()
    return record


def finalize_records(
    items: Sequence[Any],
    source: str,
    *,
    dataset: str,
    split: str = "train",
    answer_type: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Validate raw items and add ``dataset`` and ``answer_type`` (inferred once per dataset)."""
    if answer_type is not None and answer_type not in ANSWER_TYPES:
        raise MoATrainError(f"answer_type must be one of {', '.join(ANSWER_TYPES)}, got {answer_type!r}")
    items = list(items[:limit] if limit else items)
    records = [validate_record(item, i, source, split) for i, item in enumerate(items)]
    if not records:
        raise MoATrainError(f"{source}: no records")
    kind = answer_type or infer_answer_type(dataset, (r["answer"] for r in records if r["answer"]))
    for record in records:
        record["dataset"] = dataset
        # an explicit answer_type wins over one stored in the file, which wins over the inferred one
        record["answer_type"] = answer_type or record.get("answer_type") or kind
    return records


def load_records(
    path: str | os.PathLike[str],
    *,
    dataset: str | None = None,
    split: str = "train",
    answer_type: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Records of a local JSON list / JSONL file (``dataset`` defaults to :func:`dataset_name_for`)."""
    path = Path(path).expanduser()
    items = read_json_records(path)
    return finalize_records(
        items,
        str(path),
        dataset=dataset or dataset_name_for(path),
        split=split,
        answer_type=answer_type,
        limit=limit,
    )


def load_hub_records(
    hub_id: str,
    hub_split: str,
    *,
    config_name: str | None = None,
    dataset: str | None = None,
    split: str = "train",
    answer_type: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Records of a Hugging Face hub dataset split with LLM-Adapters columns."""
    # deferred: datasets is heavy and only Hub sources need it
    import datasets

    try:
        table = datasets.load_dataset(hub_id, config_name, split=hub_split)
    except (OSError, ValueError, ConnectionError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "offline" in first.lower() or os.environ.get("HF_DATASETS_OFFLINE") in ("1", "true", "TRUE"):
            raise MoATrainError(
                f"dataset '{hub_id}' is not available offline; download it or pass "
                f"data.source=json data.train_path=<local file>"
            ) from None
        raise MoATrainError(
            f"dataset '{hub_id}' (split {hub_split}) cannot be loaded ({first}); "
            f"pass data.source=json data.train_path=<local file>"
        ) from None
    rows = table.select(range(min(limit, len(table)))) if limit else table
    return finalize_records(
        list(rows),
        f"{hub_id}[{hub_split}]",
        dataset=dataset or hub_id.rsplit("/", 1)[-1],
        split=split,
        answer_type=answer_type,
    )
