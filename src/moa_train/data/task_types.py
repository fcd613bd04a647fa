"""Per-example task types (0/1) for LoRAMoE's localized balancing constraint (router.lbc_coef > 0).

A record's type comes from ``data.task_type_field`` (a record field holding 0 or 1), else from
``data.task_types``, a map from the record's dataset name (its ``dataset`` field, set for every embedded
and file dataset) to 0 or 1, where the key ``default`` covers the datasets not named. LoRAMoE gives type 1
to world-knowledge data and type 0 to the rest; experts in the first half of each site serve type 0,
the second half type 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from moa_train.data import cfg_value
from moa_train.errors import MoATrainError

HINT = (
    "set data.task_type_field=<record field holding 0/1> or data.task_types={<dataset>: 0 or 1, default: 0}"
)


def configured(data_cfg: Any) -> bool:
    return bool(cfg_value(data_cfg, "task_type_field") or cfg_value(data_cfg, "task_types"))


def check_config(cfg: Any) -> None:
    """Before anything loads: an LBC coefficient needs task types, and a task-type map holds only 0/1."""
    moa, data = cfg_value(cfg, "moa") or {}, cfg_value(cfg, "data") or {}
    lbc = max(float((moa.get(r) or {}).get("lbc_coef") or 0.0) for r in ("router", "site_router"))
    mapping = cfg_value(data, "task_types")
    if mapping is not None:
        if not isinstance(mapping, Mapping):
            raise MoATrainError(f"data.task_types={mapping!r} is not a map; {HINT}")
        bad = {k: v for k, v in mapping.items() if v not in (0, 1)}
        if bad:
            raise MoATrainError(f"data.task_types gives {bad}: task types are 0 or 1; {HINT}")
    if lbc > 0 and not configured(data):
        raise MoATrainError(
            f"router lbc_coef > 0 (LoRAMoE's localized balancing constraint) needs task types: {HINT}"
        )


def assign(records: Sequence[Mapping[str, Any]], data_cfg: Any) -> list[Mapping[str, Any]]:
    """The records with a ``task_type`` (0/1) each when task types are configured, else unchanged."""
    field, mapping = cfg_value(data_cfg, "task_type_field"), cfg_value(data_cfg, "task_types") or {}
    if not field and not mapping:
        return list(records)
    out = []
    for index, record in enumerate(records):
        value = record.get(field) if field else None
        if value is None:
            value = mapping.get(record.get("dataset"), mapping.get("default"))
        if value in ("0", "1"):
            value = int(value)
        if value not in (0, 1) or isinstance(value, bool):
            where = f"record {index} (dataset {record.get('dataset')!r})"
            raise MoATrainError(f"{where} has no task type 0 or 1 (got {value!r}); {HINT}")
        out.append({**record, "task_type": int(value)})
    return out
