"""Embedded real data: BIG-bench tasks converted to LLM-Adapters records.

The BIG-bench sdist (``bigbench-1.0.0.tar.gz``, 358 MB, Apache-2.0) holds every task as
``bigbench-1.0.0/bigbench/benchmark_tasks/<task>/task.json``. It is never installed (its
dependencies pull TensorFlow): :func:`fetch_sdist` downloads it from PyPI into
``$MOA_TRAIN_CACHE/downloads/`` and :func:`prepare` reads the needed ``task.json`` members with
``tarfile`` in one streaming pass, converts them and caches the result as JSON under
``$MOA_TRAIN_CACHE/data/bigbench/<name>/{train,test,meta}.json``.

Conversion (deterministic for a given ``split_seed``):

* arithmetic tasks (``arithmetic/N_digit_<op>``): instruction = the BIG-bench question
  ("What is 80 plus 29?"), output by ``arith_format`` (default ``equation``: "80 + 29 = 109";
  the base SmolLM2 already completes that form far more often than any other), answer = the
  number, answer_type ``numeric``;
* multiple-choice tasks (``target_scores`` with one correct choice): the LLM-Adapters commonsense
  style -- options shuffled per item, listed as ``Answer1: ... Answer2: ...``, instruction ending in
  ``Answer format: answer1/answer2/...``, output ``the correct answer is answerN``, answer
  ``answerN``, answer_type ``label`` (``labels`` lists the item's label words).

Splits: exact duplicates (same question and choices) are removed, then each task's items are
shuffled with a seed derived from ``(split_seed, task)`` alone and the first ``test_per_task`` go to
the test split. So a task's test items do not depend on which other tasks are mixed in: arith2's
test items are also test items of arith_mix (same ``split_seed`` and ``test_per_task``), and a
larger ``test_per_task`` gives a superset. Train and test never share a question.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moa_train.errors import MoATrainError

SDIST_NAME = "bigbench-1.0.0.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
PYPI_SIMPLE_URL = "https://pypi.org/simple/bigbench/"
TASK_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"
# Bump when the conversion changes: cached splits with another version are rebuilt.
FORMAT_VERSION = 1
ARITH_FORMATS = ("equation", "number", "sentence")

_ARITH_QUESTION = re.compile(r"^What is (-?\d+) (plus|minus|times|divided by) (-?\d+)\?$")
_ARITH_SYMBOL = {"plus": "+", "minus": "-", "times": "*", "divided by": "/"}
# Tasks whose items are (copies of) a test set of the LLM-Adapters evaluation suite: training on
# them would score the model on its own training data.
OVERLAPS_EVAL_SUITE = {
    "social_iqa": "its items are the SIQA dev set = LLM-Adapters social_i_qa/test.json",
}
# Questions whose BIG-bench input is not a question on its own (winowhy gives a statement + reasoning).
QUESTION_TEMPLATES = {
    "winowhy": "Is the reasoning in the following explanation of a pronoun correct or incorrect? {input}",
}


def _cache_root() -> Path:
    from moa_train.base_models import cache_root

    return cache_root()


def sdist_path() -> Path:
    """Where the BIG-bench sdist lives: ``$MOA_TRAIN_CACHE/downloads/bigbench-1.0.0.tar.gz``."""
    return _cache_root() / "downloads" / SDIST_NAME


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_sdist(dest: str | os.PathLike[str] | None = None, timeout: float = 60.0) -> Path:
    """Download ``bigbench-1.0.0.tar.gz`` from PyPI (sha256-verified, atomic); returns its path.

    The URL comes from PyPI's simple JSON API (``pip download`` cannot fetch this sdist: it tries
    to build it). An existing file with the right hash is reused.
    """
    dest = Path(dest).expanduser() if dest else sdist_path()
    if dest.is_file() and _sha256(dest) == SDIST_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(
        PYPI_SIMPLE_URL, headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            index = json.load(response)
        entry = next((f for f in index.get("files", []) if f.get("filename") == SDIST_NAME), None)
        if entry is None:
            raise MoATrainError(f"{SDIST_NAME} is not listed on {PYPI_SIMPLE_URL}")
        print(f"moa_train: downloading {SDIST_NAME} (358 MB) from PyPI to {dest} ...", file=sys.stderr)
        fd, tmp = tempfile.mkstemp(prefix=f".{SDIST_NAME}-", dir=dest.parent)
        digest = hashlib.sha256()
        try:
            with (
                os.fdopen(fd, "wb") as out,
                urllib.request.urlopen(entry["url"], timeout=timeout) as response,
            ):
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != SDIST_SHA256:
                raise MoATrainError(
                    f"{SDIST_NAME} from PyPI has sha256 {digest.hexdigest()}, expected {SDIST_SHA256}"
                )
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:  # URLError, timeouts, disk errors
        raise MoATrainError(
            f"BIG-bench data is missing ({dest}) and could not be downloaded ({exc}); run `make setup` "
            f"or put {SDIST_NAME} (from PyPI) there"
        ) from None
    return dest


def read_tasks(
    tasks: Sequence[str], sdist: str | os.PathLike[str] | None = None
) -> dict[str, dict[str, Any]]:
    """``{task: parsed task.json}`` for the given task paths (e.g. ``arithmetic/2_digit_addition``).

    One streaming pass over the gzip (random access into a .tar.gz would decompress it per member).
    """
    path = Path(sdist).expanduser() if sdist else sdist_path()
    if not path.is_file():
        path = fetch_sdist(path)
    wanted = {f"{TASK_ROOT}/{task.strip('/')}/task.json": task for task in tasks}
    found: dict[str, dict[str, Any]] = {}
    with tarfile.open(path, "r|gz") as archive:
        for member in archive:
            task = wanted.get(member.name)
            if task is None or not member.isfile():
                continue
            handle = archive.extractfile(member)
            found[task] = json.load(handle) if handle else {}
            if len(found) == len(wanted):
                break
    missing = [t for t in tasks if t not in found]
    if missing:
        raise MoATrainError(
            f"BIG-bench task(s) {', '.join(missing)} not found in {path.name} "
            f"(names are folders under bigbench/benchmark_tasks/, e.g. arithmetic/2_digit_addition)"
        )
    return found


# ----------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------


def _item_rng(split_seed: int, *parts: Any) -> random.Random:
    # seeding with a str hashes it with sha512: stable across runs and PYTHONHASHSEED
    return random.Random("/".join(str(p) for p in (split_seed, *parts)))


def convert_arithmetic(
    task: str, example: Mapping[str, Any], arith_format: str = "equation"
) -> dict[str, Any]:
    """One BIG-bench arithmetic item -> record with a numeric answer."""
    question = str(example["input"]).strip()
    target = str(example["target"]).strip()
    match = _ARITH_QUESTION.match(question)
    if arith_format == "equation" and match:
        left, op, right = match.groups()
        output = f"{left} {_ARITH_SYMBOL[op]} {right} = {target}"
    elif arith_format == "sentence":
        output = f"The answer is {target}."
    else:
        output = target
    return {
        "instruction": question,
        "input": "",
        "output": output,
        "answer": target,
        "answer_type": "numeric",
        "task": task,
    }


def _question(task: str, spec: Mapping[str, Any], example: Mapping[str, Any]) -> str:
    text = " ".join(str(example.get("input", "")).split())
    name = task.split("/")[0]
    if name in QUESTION_TEMPLATES:
        return QUESTION_TEMPLATES[name].format(input=text)
    prefix = " ".join(str(spec.get("task_prefix") or "").split())
    return f"{prefix} {text}".strip() if prefix else text


def convert_multiple_choice(
    task: str, spec: Mapping[str, Any], example: Mapping[str, Any], rng: random.Random
) -> dict[str, Any] | None:
    """One multiple-choice item -> LLM-Adapters commonsense record; None without exactly one gold."""
    scores = example.get("target_scores") or {}
    options = [" ".join(str(o).split()) for o in scores]
    values = [float(v) for v in scores.values()]
    if (
        len(options) < 2
        or max(values) <= 0
        or values.count(max(values)) != 1
        or len(set(options)) != len(options)
    ):
        return None
    gold = options[values.index(max(values))]
    rng.shuffle(options)
    k = options.index(gold) + 1
    labels = [f"answer{i}" for i in range(1, len(options) + 1)]
    listed = " ".join(f"Answer{i}: {opt}" for i, opt in enumerate(options, start=1))
    instruction = (
        f"Please choose the correct answer to the question: {_question(task, spec, example)}\n\n"
        f"{listed}\n\nAnswer format: {'/'.join(labels)}"
    )
    return {
        "instruction": instruction,
        "input": "",
        "output": f"the correct answer is answer{k}",
        "answer": f"answer{k}",
        "answer_type": "label",
        "labels": labels,
        "task": task,
    }


def _is_arithmetic(spec: Mapping[str, Any]) -> bool:
    examples = spec.get("examples") or []
    return bool(examples) and all(
        "target" in e and re.fullmatch(r"-?\d+", str(e["target"]).strip()) for e in examples[:20]
    )


def convert_task(
    task: str, spec: Mapping[str, Any], split_seed: int, arith_format: str = "equation"
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """All usable items of one task (deduplicated, in file order) and counts of what was skipped."""
    arithmetic = _is_arithmetic(spec)
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    skipped = duplicates = 0
    for index, example in enumerate(spec.get("examples") or []):
        if arithmetic:
            record = convert_arithmetic(task, example, arith_format)
        else:
            record = convert_multiple_choice(
                task, spec, example, _item_rng(split_seed, task, "options", index)
            )
        if record is None:
            skipped += 1
            continue
        # the key ignores option order, so a repeated question cannot hide behind a reshuffle
        key = (
            record["instruction"]
            if arithmetic
            else _question(task, spec, example)
            + "\x00"
            + "\x00".join(sorted(" ".join(str(o).split()) for o in example["target_scores"]))
        )
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        records.append(record)
    return records, {"items": len(spec.get("examples") or []), "skipped": skipped, "duplicates": duplicates}


def build_splits(
    specs: Mapping[str, Mapping[str, Any]],
    tasks: Sequence[str],
    *,
    test_per_task: int,
    split_seed: int,
    arith_format: str = "equation",
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Train/test records of the given tasks and per-task statistics (see the module doc)."""
    train: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    stats: dict[str, Any] = {}
    for task in tasks:
        records, counts = convert_task(task, specs[task], split_seed, arith_format)
        if len(records) < 2 * test_per_task:
            raise MoATrainError(
                f"BIG-bench task {task} has {len(records)} usable items; data.test_per_task={test_per_task} "
                f"needs at least {2 * test_per_task}"
            )
        _item_rng(split_seed, task, "split").shuffle(records)
        test += records[:test_per_task]
        train += records[test_per_task:]
        stats[task] = {**counts, "train": len(records) - test_per_task, "test": test_per_task}
    # mix the tasks so that a num_train / num_test cap (first N) keeps every task represented
    _item_rng(split_seed, "train-order").shuffle(train)
    _item_rng(split_seed, "test-order").shuffle(test)
    return {"train": train, "test": test}, stats


# ----------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def _read_cached(directory: Path, meta: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]] | None:
    try:
        stored = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        if stored.get("params") != meta["params"]:
            return None
        return {
            split: json.loads((directory / f"{split}.json").read_text(encoding="utf-8"))
            for split in ("train", "test")
        }
    except (OSError, ValueError):
        return None


def prepare(
    name: str,
    tasks: Sequence[str],
    *,
    test_per_task: int = 100,
    split_seed: int = 0,
    arith_format: str = "equation",
    sdist: str | os.PathLike[str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Cached train/test records of a BIG-bench mix; converts (and downloads) on first use.

    The cache directory ``$MOA_TRAIN_CACHE/data/bigbench/<name>/`` is rebuilt when the conversion
    parameters differ from the ones recorded in its ``meta.json``; it is replaced atomically.
    """
    if not tasks:
        raise MoATrainError(f"data.tasks is empty for BIG-bench dataset {name}")
    if arith_format not in ARITH_FORMATS:
        raise MoATrainError(
            f"data.arith_format must be one of {', '.join(ARITH_FORMATS)}, got {arith_format!r}"
        )
    if test_per_task < 1:
        raise MoATrainError(f"data.test_per_task must be >= 1, got {test_per_task}")
    tasks = [str(t).strip("/") for t in tasks]
    for task in tasks:
        if task.split("/")[0] in OVERLAPS_EVAL_SUITE:
            print(
                f"moa_train: warning: BIG-bench task {task}: {OVERLAPS_EVAL_SUITE[task.split('/')[0]]}; "
                "do not evaluate a model trained on it with that test set",
                file=sys.stderr,
            )
    params = {
        "format_version": FORMAT_VERSION,
        "tasks": tasks,
        "test_per_task": int(test_per_task),
        "split_seed": int(split_seed),
        "arith_format": arith_format,
        "sdist_sha256": SDIST_SHA256,
    }
    directory = _cache_root() / "data" / "bigbench" / name
    meta = {"params": params}
    cached = _read_cached(directory, meta)
    if cached is not None:
        return cached
    specs = read_tasks(tasks, sdist)
    splits, stats = build_splits(
        specs, tasks, test_per_task=int(test_per_task), split_seed=int(split_seed), arith_format=arith_format
    )
    meta = {
        "params": params,
        "source": f"BIG-bench 1.0.0 ({SDIST_NAME} from PyPI, Apache-2.0)",
        "counts": {"train": len(splits["train"]), "test": len(splits["test"])},
        "tasks": stats,
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=directory.parent))
    try:
        _write_json(tmp / "train.json", splits["train"])
        _write_json(tmp / "test.json", splits["test"])
        _write_json(tmp / "meta.json", meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        # swap in the new directory; the old one (other params) is moved aside first
        old = None
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}-old-", dir=directory.parent))
            os.replace(directory, old / name)
        try:
            os.rename(tmp, directory)
        except OSError:
            if _read_cached(directory, meta) is None:  # someone else wrote other params meanwhile
                raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return splits


def main() -> None:
    """``python -m moa_train.data.bigbench``: download the sdist into the cache (for `make setup`)."""
    try:
        print(fetch_sdist())
    except MoATrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
