"""Data: record formats, the Alpaca template, tokenisation with positional label masking, data sources.

``load_splits(data_cfg)`` reads the Hydra ``data`` group node (see ``configs/data/*.yaml``):

====================  ==============================================================================
field                 meaning
====================  ==============================================================================
``name``              dataset name (``dataset`` of the records)
``source``            ``arithmetic`` (generated) | ``packaged`` (ships with moa_train) | ``bigbench``
                      (your BIG-bench copy) | ``json`` (local files) | ``hub`` (HF datasets)
``tasks``             arithmetic / bigbench: task names, e.g. ``[arithmetic/2_digit_addition, ...]``;
                      packaged: sources to include (empty = all)
``items_per_task``    arithmetic: distinct questions generated per task (held-out + training)
``test_per_task``     arithmetic / bigbench / packaged: held-out items per task
``split_seed``        arithmetic / bigbench: generation or conversion seed (which items are held out)
``arith_format``      arithmetic outputs: ``equation`` | ``number`` | ``sentence``
``package``           packaged: which packaged file (``commonsense_mix``)
``bigbench_path``     bigbench: ``bigbench-1.0.0.tar.gz`` or a ``benchmark_tasks`` folder
``data_dir``          json: folder that relative ``train_path`` / ``test_path`` entries are under
``train_path``        json: a file or a list of files (JSON list or JSONL)
``test_path``         json: a file, a list of files, or null (no held-out split)
``hub_id``            hub: dataset id; ``hub_config``, ``train_split`` (train), ``test_split`` (test/null)
``answer_type``       null (inferred per dataset) | ``numeric`` | ``label`` | ``letter``
``missing_hint``      json: where to get the files, shown when a required path is missing
``max_len``           training sequence length in tokens (prompt + response + EOS)
``train_on_inputs``   false: loss on response + EOS only; true: also on the prompt
``template``          ``alpaca`` (the paper's prompt) | ``chat`` (the tokenizer's chat template)
``group_by_length``   use the length-grouped sampler instead of a plain shuffle
``seed``              data-order seed (separate from the model/adapter init seed)
``num_train``         optional cap: first N training records of each dataset
``num_test``          optional cap: first N held-out records of each dataset
``eval_max_new_tokens`` generation budget attached to held-out records (null = evaluator default)
====================  ==============================================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from moa_train.data import arithmetic, bigbench, packaged
from moa_train.data.records import (
    ANSWER_TYPES,
    dataset_name_for,
    infer_answer_type,
    load_hub_records,
    load_records,
    read_json_records,
    validate_record,
)
from moa_train.data.template import build_prompt
from moa_train.data.tokenize import (
    IGNORE_INDEX,
    LengthGroupedSampler,
    ShuffleSampler,
    TrainCollator,
    encode_dataset,
    encode_for_training,
    encode_prompt_ids,
    epoch_order,
    length_grouped_order,
)
from moa_train.errors import MoATrainError

SOURCES = ("arithmetic", "packaged", "bigbench", "json", "hub")

__all__ = [
    "ANSWER_TYPES",
    "IGNORE_INDEX",
    "LengthGroupedSampler",
    "ShuffleSampler",
    "TrainCollator",
    "build_prompt",
    "dataset_name_for",
    "encode_dataset",
    "encode_for_training",
    "encode_prompt_ids",
    "epoch_order",
    "infer_answer_type",
    "length_grouped_order",
    "load_hub_records",
    "load_records",
    "load_splits",
    "read_json_records",
    "validate_record",
]


def cfg_value(cfg: Any, key: str, default: Any = None) -> Any:
    """Field of a dict or DictConfig; missing (``???``, also through an interpolation) or None -> default."""
    try:
        value = cfg.get(key, default)
    except Exception as exc:  # omegaconf MissingMandatoryValue / InterpolationToMissingValueError
        if "Missing" in type(exc).__name__:
            return default
        raise
    if value is None or value == "???":
        return default
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]


def _resolve_paths(cfg: Any, key: str, name: str, hint: str) -> list[Path]:
    """Files of ``train_path`` / ``test_path``; relative entries are taken under ``data_dir`` if set."""
    entries = _as_list(cfg_value(cfg, key))
    data_dir = cfg_value(cfg, "data_dir")
    paths = []
    for entry in entries:
        path = Path(entry).expanduser()
        if not path.is_absolute() and data_dir is None and _is_missing(cfg, "data_dir"):
            raise MoATrainError(f"data.data_dir is required for data={name}{hint}")
        if not path.is_absolute() and data_dir is not None:
            path = Path(str(data_dir)).expanduser() / path
        if not path.is_file():
            raise MoATrainError(f"data file not found: {path} (data.{key} of data={name}){hint}")
        paths.append(path)
    return paths


def _is_missing(cfg: Any, key: str) -> bool:
    """True when the field is the mandatory marker ``???`` (not merely null/absent)."""
    if isinstance(cfg, DictConfig):
        # note: `key in cfg` is False for a ??? value
        return key in cfg.keys() and OmegaConf.is_missing(cfg, key)
    return hasattr(cfg, "get") and cfg.get(key) == "???"


def _load_json_split(
    cfg: Any, key: str, name: str, split: str, answer_type: str | None
) -> list[dict[str, Any]]:
    hint = cfg_value(cfg, "missing_hint", "")
    hint = f"; {hint}" if hint else ""
    paths = _resolve_paths(cfg, key, name, hint)
    if not paths and split == "train":
        raise MoATrainError(f"data.train_path is required for data={name}{hint}")
    records: list[dict[str, Any]] = []
    for path in paths:
        # several files: each keeps its own dataset name (per-dataset scoring); one train file: name
        dataset = name if (split == "train" and len(paths) == 1) else dataset_name_for(path)
        records += load_records(path, dataset=dataset, split=split, answer_type=answer_type)
    return records


def _name_datasets(splits: dict[str, list[dict[str, Any]]], name: str) -> dict[str, list[dict[str, Any]]]:
    kinds = {r["answer_type"] for split in splits.values() for r in split}
    for split in splits.values():
        for record in split:
            # one dataset per answer type: the evaluator scores one rule per dataset
            record["dataset"] = name if len(kinds) == 1 else f"{name}_{record['answer_type']}"
    return splits


def _load_generated(cfg: Any, name: str, source: str) -> dict[str, list[dict[str, Any]]]:
    tasks = _as_list(cfg_value(cfg, "tasks"))
    test_per_task = cfg_value(cfg, "test_per_task")
    if source == "arithmetic":
        splits = arithmetic.build_splits(
            tasks,
            items_per_task=int(cfg_value(cfg, "items_per_task", 1000)),
            test_per_task=int(test_per_task or 100),
            split_seed=int(cfg_value(cfg, "split_seed", 0)),
            arith_format=str(cfg_value(cfg, "arith_format", "equation")),
        )
    elif source == "packaged":
        splits = packaged.build_splits(
            str(cfg_value(cfg, "package", name)),
            tasks,
            None if test_per_task is None else int(test_per_task),
        )
    else:
        splits = bigbench.prepare(
            name,
            tasks,
            test_per_task=int(test_per_task or 100),
            split_seed=int(cfg_value(cfg, "split_seed", 0)),
            arith_format=str(cfg_value(cfg, "arith_format", "equation")),
            path=cfg_value(cfg, "bigbench_path"),
        )
    return _name_datasets(splits, name)


def _stream_split(cfg: Any, name: str) -> list[dict[str, Any]]:
    """data.streaming: no training record is read here; the files are checked (a missing one fails now)."""
    hint = cfg_value(cfg, "missing_hint", "")
    if not _resolve_paths(cfg, "train_path", name, f"; {hint}" if hint else ""):
        raise MoATrainError(f"data.train_path is required for data={name}")
    return []


def stream_paths(cfg: Any) -> list[Path]:
    """The training files of ``data.train_path`` (relative entries under ``data.data_dir``), checked."""
    return _resolve_paths(cfg, "train_path", str(cfg_value(cfg, "name", "data")), "")


def cap_per_dataset(records: list[dict[str, Any]], cap: int) -> list[dict[str, Any]]:
    """The first ``cap`` records of each ``dataset`` (order kept), so a cap never drops a whole test set."""
    seen: dict[str, int] = {}
    kept = []
    for record in records:
        count = seen.get(record.get("dataset", ""), 0)
        if count < cap:
            kept.append(record)
        seen[record.get("dataset", "")] = count + 1
    return kept


def load_splits(data_cfg: Any) -> dict[str, list[dict[str, Any]]]:
    """``{"train": [...], "test": [...]}`` of LLM-Adapters records (with ``dataset``, ``answer_type``)."""
    name = cfg_value(data_cfg, "name")
    if not name:
        raise MoATrainError("data.name is required")
    name = str(name)
    source = str(cfg_value(data_cfg, "source", "json"))
    answer_type = cfg_value(data_cfg, "answer_type")
    if answer_type is not None and answer_type not in ANSWER_TYPES:
        raise MoATrainError(
            f"data.answer_type must be one of {', '.join(ANSWER_TYPES)} or null, got {answer_type!r}"
        )
    if source in ("arithmetic", "packaged", "bigbench"):
        splits = _load_generated(data_cfg, name, source)
    elif source == "json":
        streaming = bool(cfg_value(data_cfg, "streaming", False))  # read as consumed (data/streaming.py)
        splits = {
            "train": _stream_split(data_cfg, name)
            if streaming
            else _load_json_split(data_cfg, "train_path", name, "train", answer_type),
            "test": _load_json_split(data_cfg, "test_path", name, "test", answer_type),
        }
    elif source == "hub":
        hub_id = cfg_value(data_cfg, "hub_id")
        if not hub_id:
            raise MoATrainError(f"data.hub_id is required for data={name} (source=hub)")
        common = {
            "config_name": cfg_value(data_cfg, "hub_config"),
            "dataset": name,
            "answer_type": answer_type,
        }
        test_split = cfg_value(data_cfg, "test_split", "test")
        splits = {
            "train": load_hub_records(
                str(hub_id), str(cfg_value(data_cfg, "train_split", "train")), **common
            ),
            "test": load_hub_records(str(hub_id), str(test_split), split="test", **common)
            if test_split
            else [],
        }
    else:
        raise MoATrainError(f"data.source must be one of {', '.join(SOURCES)}, got {source!r}")
    for split, key in (("train", "num_train"), ("test", "num_test")):
        cap = cfg_value(data_cfg, key)
        if cap is not None:
            if int(cap) < 1:
                raise MoATrainError(f"data.{key} must be >= 1 or null, got {cap}")
            splits[split] = cap_per_dataset(splits[split], int(cap))
    budget = cfg_value(data_cfg, "eval_max_new_tokens")
    if budget is not None:
        for record in splits["test"]:
            record["eval_max_new_tokens"] = int(budget)
    return splits
