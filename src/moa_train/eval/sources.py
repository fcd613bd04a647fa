"""Evaluation data of the moa-eval presets: LLM-Adapters test files and data-group splits."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from moa_train.data import load_records, load_splits
from moa_train.errors import MoATrainError
from moa_train.eval.scoring import validate_records
from moa_train.files import config_dir

log = logging.getLogger(__name__)


def load_llm_adapters_file(
    path: str | os.PathLike[str],
    dataset: str | None = None,
    *,
    limit: int | None = None,
    answer_type: str | None = None,
) -> list[dict[str, Any]]:
    """The first ``limit`` records of one LLM-Adapters test file (JSON list or JSONL), validated.

    The dataset is named after the folder for the ``<Dataset>/test.json`` layout, else after the file.
    Reading and validation are the data module's (one-line errors naming the file, record and field).
    """
    return load_records(path, dataset=dataset, split="test", answer_type=answer_type, limit=limit)


def _preset_files(eval_cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """(path, name, answer_type) entries of a file-based preset (commonsense8 / math6 / custom)."""
    entries: list[dict[str, Any]] = []
    data_dir = eval_cfg.get("data_dir")
    for name in eval_cfg.get("datasets") or []:
        if not data_dir:
            raise MoATrainError(
                f"eval={eval_cfg.get('name')} needs eval.data_dir=<folder with <Dataset>/test.json> "
                "(the LLM-Adapters dataset/ layout)"
            )
        entries.append(
            {"path": Path(str(data_dir)).expanduser() / str(name) / "test.json", "name": str(name)}
        )
    for item in eval_cfg.get("files") or []:
        if isinstance(item, str):
            entries.append({"path": Path(item).expanduser(), "name": None})
        else:
            item = dict(item)
            if "path" not in item:
                raise MoATrainError(f"eval.files entry {item} has no 'path'")
            entries.append(
                {
                    "path": Path(str(item["path"])).expanduser(),
                    "name": item.get("name"),
                    "type": item.get("answer_type"),
                }
            )
    return entries


def load_eval_records(eval_cfg: Mapping[str, Any], run_cfg: Any = None) -> list[dict[str, Any]]:
    """Records of a moa-eval preset, each source cut to ``limit`` items.

    Sources: LLM-Adapters files (``datasets`` under ``data_dir``, and ``files``) and data-group nodes
    (``data``: a list or a name -> node mapping, read with the data module's ``load_splits``, split
    ``split``). ``data: run`` (the ``heldout`` preset) is the training run's own data node, with
    ``split``/``limit`` ``auto`` = that run's ``final_eval`` split and record count, i.e. exactly the
    records its final evaluation scored.
    """
    sources = _data_sources(eval_cfg, run_cfg)  # validates split/limit before any file is read
    limit = eval_cfg.get("limit")
    records: list[dict[str, Any]] = []
    missing: list[str] = []
    for entry in _preset_files(eval_cfg):
        if not entry["path"].is_file() and eval_cfg.get("skip_missing"):
            missing.append(str(entry["path"]))
            continue
        records += load_llm_adapters_file(
            entry["path"], entry["name"], limit=limit, answer_type=entry.get("type")
        )
    if missing:
        log.warning("skipped %d missing evaluation file(s): %s", len(missing), ", ".join(missing))
    for data_cfg, split, n in sources:
        # the heldout preset on a run without a held-out split: say which presets score it instead
        hint = (
            f"; choose the data with eval=<preset> ({', '.join(eval_presets())})"
            if eval_cfg.get("data") == "run"
            else ""
        )
        records += _data_module_records(data_cfg, split, n, hint)
    if not records:
        raise MoATrainError(
            f"eval={eval_cfg.get('name')}: no evaluation data (set eval.files, eval.datasets or eval.data)"
        )
    return records


def _data_sources(eval_cfg: Mapping[str, Any], run_cfg: Any) -> list[tuple[Any, str, int | None]]:
    """(data node, split, limit) for every data-group source of a preset."""
    data = eval_cfg.get("data")
    split, limit = eval_cfg.get("split") or "test", eval_cfg.get("limit")
    if data == "run":
        final = OmegaConf.select(run_cfg, "final_eval", default=None) if run_cfg is not None else None
        if run_cfg is None or OmegaConf.select(run_cfg, "data", default=None) is None:
            raise MoATrainError(
                f"eval={eval_cfg.get('name')} (the default) scores the held-out split of the data a checkpoint "
                "was trained on, and no moa-train run config.yaml records that data: pass checkpoint=<run dir> "
                f"of a moa-train run, or choose the data with eval=<preset> ({', '.join(eval_presets())})"
            )
        if split == "auto":
            split = (final or {}).get("split") or "test"
        if limit == "auto":
            limit = (final or {}).get("max_records")
        data = [run_cfg.data]
    elif isinstance(data, Mapping):  # one data node, or name -> node
        data = list(data.values()) if all(isinstance(v, Mapping) for v in data.values()) else [data]
    for value, name in ((split, "split"), (limit, "limit")):
        if value == "auto":
            raise MoATrainError(f"eval.{name}=auto only works with eval.data=run")
    return [(node, str(split), limit) for node in data or []]


def eval_presets() -> list[str]:
    """Names of the packaged moa-eval presets (configs/eval/*.yaml)."""
    return sorted(p.stem for p in (config_dir() / "eval").glob("*.yaml"))


def describe_data(eval_cfg: Mapping[str, Any], run_cfg: Any, records: Sequence[Mapping[str, Any]]) -> str:
    """One line saying which data an evaluation scored (printed above the table, kept in results.json)."""
    name = eval_cfg.get("name") or "eval"
    if eval_cfg.get("data") == "run":
        ((node, split, limit),) = _data_sources(eval_cfg, run_cfg)
        return (
            f"eval={name}: split {split!r} of data={node.get('name')} (the training run's data, "
            f"{len(records)} records{' = its final evaluation' if eval_cfg.get('limit') == 'auto' else ''})"
        )
    datasets = list(dict.fromkeys(str(r.get("dataset") or "default") for r in records))
    return f"eval={name}: {len(records)} records of {', '.join(datasets)}"


def _data_module_records(
    data_cfg: Any, split: str, limit: int | None, hint: str = ""
) -> list[dict[str, Any]]:
    """Records of one split of a data-group node (e.g. the generated arithmetic tasks) via ``load_splits``."""
    splits = load_splits(data_cfg)
    if split not in splits or not splits[split]:
        what = (
            f"an empty {split!r} split"
            if split in splits
            else f"no {split!r} split (has {', '.join(splits)})"
        )
        raise MoATrainError(f"data {data_cfg.get('name')} has {what}{hint}")
    rows = list(splits[split])
    rows = rows[: int(limit)] if limit else rows
    validate_records(rows, source=f"data {data_cfg.get('name')} ({split})")
    return rows
