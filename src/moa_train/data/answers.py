"""Answer extraction and scoring of the LLM-Adapters evaluation protocol (method spec E.4).

Three rule kinds, chosen per dataset:

* ``label``   -- commonsense sets: the FIRST occurrence of one of the dataset's label words
  (``true|false``, ``answer1..answer5``, ...), case-sensitive and without word boundaries, exactly
  like the official ``evaluate_commonsense.py`` (so ``untrue`` reads as ``true``). No match: wrong.
* ``numeric`` -- math sets: commas removed, the LAST number (``-?\\d+\\.?\\d*``) as a float; correct
  iff ``|pred - gold| <= 1e-3``. No number: wrong (the official code uses +inf).
* ``letter``  -- AQuA-style multiple choice. ``letter_rule="first"`` (faithful, the default) takes the
  first capital A-E anywhere in the text, so the "A" of "Answer" counts (spec G.10).
  ``letter_rule="final"`` (stricter, documented in docs/evaluation.md) only reads the final answer:
  the last "answer is X" / "answer: X" / "option X" statement, else the last parenthesised "(X)",
  else nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from moa_train.errors import MoATrainError

NUMERIC_TOLERANCE = 1e-3
ANSWER_TYPES = ("numeric", "label", "letter")
LETTER_RULES = ("first", "final")

# Label words of the commonsense suite (official evaluate_commonsense.py), keyed by a normalised name.
_ANSWER_N = tuple(f"answer{i}" for i in range(1, 6))
LABEL_WORDS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "socialiqa": _ANSWER_N,
    "siqa": _ANSWER_N,
    "arceasy": _ANSWER_N,
    "arcchallenge": _ANSWER_N,
    "openbookqa": _ANSWER_N,
    "obqa": _ANSWER_N,
    "hellaswag": tuple(f"ending{i}" for i in range(1, 5)),
    "winogrande": ("option1", "option2"),
}
# Datasets whose gold answer is a letter A-E (the rest of the math suite is numeric).
LETTER_DATASETS = frozenset({"aqua", "mathqa"})
NUMERIC_DATASETS = frozenset({"addsub", "gsm8k", "multiarith", "singleeq", "svamp", "mawps"})

_NUMBER = re.compile(r"-?\d+\.?\d*")
_FIRST_LETTER = re.compile(r"A|B|C|D|E")
# "the answer is (C)", "Answer: C", "answer choice is C", "option C" -- the keyword is case-insensitive,
# the letter must be a capital standing on its own.
_FINAL_STATEMENT = re.compile(
    r"(?i:answer(?:\s+choice)?\s*(?:is|:)|option|choice)\s*:?\s*\(?([A-E])\)?(?![A-Za-z])"
)
_PAREN_LETTER = re.compile(r"\(([A-E])\)")


def normalise_name(name: str) -> str:
    """Dataset name key: lower case, letters and digits only (``ARC-Easy`` -> ``arceasy``)."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


@dataclass(frozen=True)
class AnswerRule:
    """How to read one dataset's generations. ``labels`` is only used by the ``label`` kind."""

    kind: str
    labels: tuple[str, ...] = ()
    letter_rule: str = "first"

    def __post_init__(self) -> None:
        if self.kind not in ANSWER_TYPES:
            raise MoATrainError(
                f"unknown answer type {self.kind!r} (expected one of {', '.join(ANSWER_TYPES)})"
            )
        if self.letter_rule not in LETTER_RULES:
            raise MoATrainError(f"unknown letter rule {self.letter_rule!r} (expected first or final)")
        if self.kind == "label" and not self.labels:
            raise MoATrainError("a label answer rule needs at least one label word")


def infer_answer_type(dataset: str, answers: Iterable[str] = ()) -> str:
    """Answer type of a dataset: from its name for the known suites, else from its gold answers."""
    key = normalise_name(dataset)
    if key in LABEL_WORDS:
        return "label"
    if key in LETTER_DATASETS:
        return "letter"
    if key in NUMERIC_DATASETS:
        return "numeric"
    golds = [str(a).strip() for a in answers]
    if golds and all(re.fullmatch(r"[A-E]", g) for g in golds):
        return "letter"
    if golds and all(_parse_float(g) is not None for g in golds):
        return "numeric"
    return "label"


def label_words(dataset: str, answers: Iterable[str] = ()) -> tuple[str, ...]:
    """The label words of a dataset: the official list for known sets, else its distinct gold answers.

    Longer words come first among the gold answers so that an alternation never stops at a prefix
    ("answer1" before "answer10" is irrelevant for the official lists, which have no prefixes).
    """
    key = normalise_name(dataset)
    if key in LABEL_WORDS:
        return LABEL_WORDS[key]
    distinct = sorted({str(a).strip() for a in answers if str(a).strip()}, key=lambda s: (-len(s), s))
    return tuple(distinct)


def rule_for(
    dataset: str,
    answer_type: str | None = None,
    answers: Iterable[str] = (),
    letter_rule: str = "first",
) -> AnswerRule:
    """The extraction rule of one dataset (``answers``: its gold answers, used for unknown label sets)."""
    answers = list(answers)
    kind = answer_type or infer_answer_type(dataset, answers)
    labels = label_words(dataset, answers) if kind == "label" else ()
    return AnswerRule(kind=kind, labels=labels, letter_rule=letter_rule)


def _parse_float(text: str) -> float | None:
    try:
        value = float(str(text).replace(",", "").strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def extract_number(text: str) -> float | None:
    """Last number in ``text`` after removing commas (None when there is none)."""
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def extract_label(text: str, labels: tuple[str, ...]) -> str | None:
    """First occurrence of any label word (case-sensitive, no word boundaries, like the official code)."""
    pattern = "|".join(re.escape(w) for w in labels)
    match = re.search(pattern, text.strip())
    return match.group(0) if match else None


def extract_letter(text: str, letter_rule: str = "first") -> str | None:
    """A-E answer letter: the first capital anywhere ("first") or only the final answer ("final")."""
    if letter_rule == "first":
        match = _FIRST_LETTER.search(text)
        return match.group(0) if match else None
    statements = _FINAL_STATEMENT.findall(text)
    if statements:
        return statements[-1]
    parens = _PAREN_LETTER.findall(text)
    return parens[-1] if parens else None


def extract(rule: AnswerRule, text: str) -> str | float | None:
    """The predicted answer of one generation under ``rule`` (None when nothing can be read)."""
    if rule.kind == "numeric":
        return extract_number(text)
    if rule.kind == "letter":
        return extract_letter(text, rule.letter_rule)
    return extract_label(text, rule.labels)


def is_correct(rule: AnswerRule, predicted: str | float | None, gold: str) -> bool:
    """Score one prediction against the gold ``answer`` field."""
    if predicted is None:
        return False
    if rule.kind == "numeric":
        gold_value = _parse_float(gold)
        if gold_value is None:
            raise MoATrainError(f"gold answer {gold!r} is not a number (numeric answer type)")
        return abs(float(predicted) - gold_value) <= NUMERIC_TOLERANCE
    return str(predicted) == str(gold).strip()


def extract_answer(record_or_rule: Mapping[str, Any] | AnswerRule, text: str) -> str | float | None:
    """Extract the answer from ``text`` for a record (its ``dataset``/``answer_type``) or a rule.

    A record of an unknown label dataset must carry its label words (``labels``); otherwise the
    label set is only known from the whole dataset (see ``moa_train.eval.scoring.dataset_rule``).
    """
    if isinstance(record_or_rule, AnswerRule):
        return extract(record_or_rule, text)
    record = record_or_rule
    dataset = str(record.get("dataset", ""))
    labels = list(record.get("labels") or [])
    kind = record.get("answer_type") or infer_answer_type(
        dataset, [record["answer"]] if "answer" in record else []
    )
    if kind == "label" and normalise_name(dataset) not in LABEL_WORDS and not labels:
        raise MoATrainError(
            f"dataset {dataset!r} has no known label words; give the record 'labels' or score whole datasets"
        )
    return extract(rule_for(dataset, kind, labels), text)
