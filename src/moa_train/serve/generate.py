"""``moa-generate``: answer every record of a JSONL file, in batches, into an output JSONL.

The output is written in input order, one batch at a time, each batch appended and synced before the
next starts: a failure or Ctrl-C loses at most the batch in progress, never a line already written.
Re-running the same command continues after the lines already there (they must belong to the same
input: each keeps the record's own fields). A torn last line (a crash mid-write) is set aside in
``<output>.partial`` and generated again.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from tqdm import tqdm

from moa_train.errors import MoATrainError
from moa_train.serve.engine import Request
from moa_train.serve.load import check_settings, load, prompt_ids, sampling_from_config

RESULT_FIELDS = ("text", "prompt_tokens", "completion_tokens", "finish_reason", "router")


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a JSONL file (blank lines skipped); a bad line is one error naming the line."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise MoATrainError(
            f"{path} is not UTF-8 text; pass a JSONL file (one JSON object per line)"
        ) from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MoATrainError(
                f"{path} line {number} is not valid JSON ({exc.msg}, column {exc.colno}); fix or remove that line"
            ) from None
        if not isinstance(record, dict) or not ({"prompt", "messages", "instruction"} & set(record)):
            raise MoATrainError(
                f"{path} line {number} needs a JSON object with 'prompt' (text), 'messages' (chat) or "
                "'instruction'"
            )
        records.append(record)
    if not records:
        raise MoATrainError(f"{path} holds no records; write one JSON object per line")
    return records


def _input_part(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in RESULT_FIELDS}


def done_count(output: Path, records: list[dict[str, Any]]) -> int:
    """How many records the output already answers (checked against the input); sets a torn last line aside."""
    if not output.exists():
        return 0
    raw = output.read_bytes()
    lines = raw.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    if tail.strip():  # no newline at the end: a write was cut off
        output.with_name(output.name + ".partial").write_bytes(tail)
        with output.open("r+b") as handle:
            handle.truncate(len(raw) - len(tail))
    done = 0
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            written = json.loads(line)
        except json.JSONDecodeError:
            raise MoATrainError(
                f"{output} line {number} is not valid JSON; it was not written by moa-generate: pass another output="
            ) from None
        if done >= len(records) or _input_part(written) != _input_part(records[done]):
            raise MoATrainError(
                f"{output} line {number} does not answer record {done + 1} of the input; it belongs to another "
                "input: pass another output= (or delete the file)"
            )
        done += 1
    return done


def check_paths(cfg: DictConfig) -> tuple[Path, Path]:
    if not cfg.get("input"):
        raise MoATrainError("no input given; pass input=<prompts.jsonl>")
    if not cfg.get("output"):
        raise MoATrainError("no output given; pass output=<answers.jsonl>")
    source, output = Path(str(cfg.input)).expanduser(), Path(str(cfg.output)).expanduser()
    if not source.is_file():
        raise MoATrainError(f"input file not found: {source}")
    if output.resolve() == source.resolve():
        raise MoATrainError("output= is the input file; pass another output path")
    if output.exists() and not output.is_file():
        raise MoATrainError(f"output {output} is not a file; pass a file path")
    if not output.parent.is_dir():
        raise MoATrainError(f"the folder of output={output} does not exist; create it first")
    return source, output


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate everything, then load the model and answer the records not answered yet."""
    check_settings(cfg)
    source, output = check_paths(cfg)
    records = read_records(source)
    done = done_count(output, records)
    todo = records[done:]
    if not todo:
        print(
            f"moa-generate: all {len(records)} records of {source} are already in {output}", file=sys.stderr
        )
        return {"records": len(records), "generated": 0}
    sampling = sampling_from_config(cfg)
    loaded = load(cfg)
    ids = []
    for number, record in enumerate(todo, done + 1):  # bad messages etc. fail before anything is generated
        try:
            ids.append(prompt_ids(loaded, record))
        except MoATrainError as exc:
            raise MoATrainError(f"{source} record {number}: {exc}") from None
    engine = loaded.engine(cfg)

    bar = tqdm(
        total=len(records), initial=done, unit="rec", disable=not cfg.get("progress", True), file=sys.stderr
    )
    size = int(cfg.max_batch_size)
    with output.open("a", encoding="utf-8") as handle:
        for start in range(0, len(todo), size):
            batch = [
                Request(ids[i], sampling, router=bool(cfg.get("router_stats")))
                for i in range(start, min(start + size, len(todo)))
            ]
            engine.run_batch(batch)
            lines = []
            for record, request in zip(todo[start:], batch):
                out = {
                    **record,
                    "text": request.text,
                    "prompt_tokens": len(request.prompt_ids),
                    "completion_tokens": len(request.tokens),
                    "finish_reason": request.finish_reason,
                }
                if cfg.get("router_stats"):
                    out["router"] = request.router_summary
                lines.append(json.dumps(out, ensure_ascii=False) + "\n")
            handle.write("".join(lines))
            handle.flush()
            os.fsync(handle.fileno())
            bar.update(len(batch))
    bar.close()
    print(f"moa-generate: {len(todo)} records answered -> {output}", file=sys.stderr)
    return {"records": len(records), "generated": len(todo)}
