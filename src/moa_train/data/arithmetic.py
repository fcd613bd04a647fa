"""Generated arithmetic data: BIG-bench-style questions, the same items on every machine.

``data.source: arithmetic`` (the default data, ``configs/data/arith*.yaml``) builds its records here,
in memory, in well under a second; nothing is downloaded or cached.

**Tasks** are named like BIG-bench's arithmetic subtasks, ``arithmetic/<N>_digit_<op>`` with ``N`` in
1..5 and ``op`` one of addition, subtraction, multiplication, and use BIG-bench's wording: the question
is "What is 80 plus 29?" (``minus``, ``times``), the answer the exact integer result (negative for a
subtraction whose second operand is larger). Both operands are drawn uniformly from ``0 .. 10**N - 1``,
and a draw whose operands both have fewer than N digits is skipped (for N >= 2): so every question
belongs to exactly one task, and a 3-digit task never repeats a question of a 2-digit one.

**Generator.** Python's ``random`` is not used: its algorithms may change between versions. Draw ``i``
of a task is SHA-256 of the UTF-8 text ``"moa_train-arith/v1/<split_seed>/<task>/<i>"``; the first 8
bytes of the digest (big-endian) modulo ``10**N`` give the first operand and the next 8 bytes the second.
(The modulo bias is below 10**5 / 2**64, far under anything measurable.) SHA-256 and integer arithmetic
are the same on every platform and Python version, so the items are too.

**Splits.** Draws that repeat an earlier question (or belong to a task with fewer digits) are
skipped, so a task's stream holds distinct questions of its own. Its first ``test_per_task`` questions are held out, the next
``items_per_task - test_per_task`` are for training: train and held-out never share a question.
A task's stream depends only on ``(split_seed, task)``, so its held-out items are the same in every
mix (arith2's held-out questions are also held-out in arith_mix, and never trained on by it).
Each split is then ordered by SHA-256 of ``"<split_seed>/<split>/<question>"`` so that the tasks are
interleaved and a ``num_train`` / ``num_test`` cap keeps every task represented.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

from moa_train.errors import MoATrainError

GENERATOR_VERSION = "v1"
ARITH_FORMATS = ("equation", "number", "sentence")
OPERATIONS = {  # task word -> (question word, symbol)
    "addition": ("plus", "+"),
    "subtraction": ("minus", "-"),
    "multiplication": ("times", "*"),
}
_TASK = re.compile(r"^arithmetic/([1-5])_digit_(addition|subtraction|multiplication)$")
TASK_HELP = (
    "arithmetic/<N>_digit_<op> with N in 1..5 and op one of addition, subtraction, multiplication, "
    "e.g. arithmetic/2_digit_addition"
)


def parse_task(task: str) -> tuple[int, str]:
    """``(digits, operation)`` of a task name such as ``arithmetic/2_digit_addition``."""
    match = _TASK.match(str(task).strip("/"))
    if match is None:
        raise MoATrainError(f"unknown arithmetic task {task!r} in data.tasks; use {TASK_HELP}")
    return int(match.group(1)), match.group(2)


def draw_operands(split_seed: int, task: str, index: int, digits: int) -> tuple[int, int]:
    """Operands of draw ``index`` of ``task`` (see the module doc: SHA-256, first/second 8 bytes)."""
    digest = hashlib.sha256(
        f"moa_train-arith/{GENERATOR_VERSION}/{split_seed}/{task}/{index}".encode()
    ).digest()
    bound = 10**digits
    return int.from_bytes(digest[:8], "big") % bound, int.from_bytes(digest[8:16], "big") % bound


def make_record(task: str, left: int, right: int, arith_format: str = "equation") -> dict[str, Any]:
    """One record: BIG-bench's question, the integer answer, the output in ``arith_format``.

    ``equation`` ("80 + 29 = 109") is the default because the base SmolLM2 completes that form far
    more often than a bare number (see docs/data.md); every format ends in the answer, so the
    "last number" scoring rule reads all three.
    """
    _, operation = parse_task(task)
    word, symbol = OPERATIONS[operation]
    result = (
        left + right
        if operation == "addition"
        else left - right
        if operation == "subtraction"
        else left * right
    )
    return format_record(
        task, f"What is {left} {word} {right}?", str(result), arith_format, symbol, left, right
    )


def format_record(
    task: str,
    question: str,
    answer: str,
    arith_format: str,
    symbol: str | None = None,
    left: int | str | None = None,
    right: int | str | None = None,
) -> dict[str, Any]:
    """A numeric record; the equation form needs the operands (else it falls back to the number)."""
    if arith_format not in ARITH_FORMATS:
        raise MoATrainError(
            f"data.arith_format must be one of {', '.join(ARITH_FORMATS)}, got {arith_format!r}"
        )
    if arith_format == "equation" and symbol is not None:
        output = f"{left} {symbol} {right} = {answer}"
    elif arith_format == "sentence":
        output = f"The answer is {answer}."
    else:
        output = answer
    return {
        "instruction": question,
        "input": "",
        "output": output,
        "answer": answer,
        "answer_type": "numeric",
        "task": task,
    }


def task_records(
    task: str, count: int, split_seed: int = 0, arith_format: str = "equation"
) -> list[dict[str, Any]]:
    """The first ``count`` distinct questions of a task's stream, in draw order."""
    digits, _ = parse_task(task)
    smallest = 10 ** (digits - 1) if digits > 1 else 0  # the larger operand has exactly N digits
    possible = 10 ** (2 * digits) - smallest**2
    if count > possible // 2:  # a stream this dense would mostly be rejected repeats
        raise MoATrainError(
            f"arithmetic task {task} has {possible} distinct questions; data.items_per_task={count} "
            f"must be at most {possible // 2}"
        )
    records: list[dict[str, Any]] = []
    seen: set[tuple[int, int]] = set()
    index = 0
    while len(records) < count:
        pair = draw_operands(split_seed, task, index, digits)
        index += 1
        if pair in seen or max(pair) < smallest:
            continue
        seen.add(pair)
        records.append(make_record(task, *pair, arith_format=arith_format))
    return records


def _order_key(split_seed: int, split: str, record: dict[str, Any]) -> str:
    return hashlib.sha256(f"{split_seed}/{split}/{record['instruction']}".encode()).hexdigest()


def build_splits(
    tasks: Sequence[str],
    *,
    items_per_task: int = 1000,
    test_per_task: int = 100,
    split_seed: int = 0,
    arith_format: str = "equation",
) -> dict[str, list[dict[str, Any]]]:
    """``{"train": [...], "test": [...]}`` of the given tasks (see the module doc)."""
    tasks = [str(t).strip("/") for t in tasks]
    if not tasks:
        raise MoATrainError(f"data.tasks is empty; list arithmetic tasks ({TASK_HELP})")
    if len(set(tasks)) != len(tasks):
        raise MoATrainError(f"data.tasks lists a task twice: {tasks}")
    if test_per_task < 1 or items_per_task <= test_per_task:
        raise MoATrainError(
            f"need 1 <= data.test_per_task < data.items_per_task, got test_per_task={test_per_task}, "
            f"items_per_task={items_per_task}"
        )
    if arith_format not in ARITH_FORMATS:
        raise MoATrainError(
            f"data.arith_format must be one of {', '.join(ARITH_FORMATS)}, got {arith_format!r}"
        )
    train: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    for task in tasks:
        records = task_records(task, items_per_task, split_seed, arith_format)
        test += records[:test_per_task]
        train += records[test_per_task:]
    train.sort(key=lambda r: _order_key(split_seed, "train", r))
    test.sort(key=lambda r: _order_key(split_seed, "test", r))
    return {"train": train, "test": test}
