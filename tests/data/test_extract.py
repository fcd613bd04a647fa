"""Answer extraction of the LLM-Adapters protocol (method spec E.4) on hand-written tricky cases."""

from __future__ import annotations

import pytest

from moa_train.data.answers import (
    AnswerRule,
    extract,
    extract_answer,
    extract_letter,
    extract_number,
    infer_answer_type,
    is_correct,
    label_words,
    rule_for,
)
from moa_train.errors import MoATrainError

NUMERIC = AnswerRule("numeric")
AQUA = AnswerRule("letter")
AQUA_FINAL = AnswerRule("letter", letter_rule="final")


# -- math: last number, commas removed, |pred - gold| <= 1e-3 --------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She has 1,234 apples in total. The answer is 1,234.", 1234.0),  # thousands separator
        ("1,000,000 - 1 = 999,999", 999999.0),
        ("The temperature drops to -7 degrees.", -7.0),  # negative
        ("5 - 12 = -7", -7.0),  # last number wins, not the first
        ("Each costs 0.25 dollars, so 3.75 in all.", 3.75),  # decimals
        ("The answer is 42.", 42.0),  # trailing sentence dot belongs to the regex ("42." -> 42.0)
        ("x = 3 and y = 4, so x*y = 12\n", 12.0),
        ("I do not know.", None),  # no number
        ("", None),
    ],
)
def test_extract_number(text: str, expected: float | None) -> None:
    assert extract_number(text) == expected


@pytest.mark.parametrize(
    ("text", "gold", "correct"),
    [
        ("The answer is 1,234", "1234", True),
        ("The answer is 1234", "1,234.0", True),  # gold with a comma and a decimal
        ("The answer is 18.0005", "18", True),  # within the 1e-3 tolerance
        ("The answer is 18.002", "18", False),  # outside it
        ("It fell by -3", "-3.0", True),
        ("It fell by 3", "-3", False),  # sign matters
        ("no idea", "0", False),  # no number is wrong, even against gold 0
        ("first 7 then 8", "7", False),  # only the LAST number counts
    ],
)
def test_numeric_scoring(text: str, gold: str, correct: bool) -> None:
    assert is_correct(NUMERIC, extract(NUMERIC, text), gold) is correct


def test_numeric_gold_must_be_a_number() -> None:
    with pytest.raises(MoATrainError, match="not a number"):
        is_correct(NUMERIC, 3.0, "three")


# -- commonsense: first label word, case-sensitive, substring match like the official regex --------------


def test_first_label_word_wins() -> None:
    rule = rule_for("boolq")
    assert extract(rule, "the correct answer is false, not true") == "false"
    assert extract(rule, "true. Some say false.") == "true"


def test_label_words_inside_other_words_match_like_the_official_regex() -> None:
    # The official re.findall('true|false', ...) has no word boundaries: "untrue" reads as "true",
    # "falsehood" as "false". Reproduced on purpose (paper comparability).
    rule = rule_for("boolq")
    assert extract(rule, "that is untrue") == "true"
    assert extract(rule, "a falsehood") == "false"
    arc = rule_for("ARC-Easy")
    assert extract(arc, "my_answer2_final") == "answer2"
    assert extract(arc, "Answer2") is None  # case-sensitive: the capitalised option name is no label


def test_case_sensitive_and_no_match_is_wrong() -> None:
    rule = rule_for("boolq")
    assert extract(rule, "True") is None
    assert not is_correct(rule, extract(rule, "True"), "true")
    assert not is_correct(rule, extract(rule, "maybe"), "false")


@pytest.mark.parametrize(
    ("dataset", "words"),
    [
        ("boolq", ("true", "false")),
        ("piqa", ("solution1", "solution2")),
        ("social_i_qa", tuple(f"answer{i}" for i in range(1, 6))),
        ("ARC-Challenge", tuple(f"answer{i}" for i in range(1, 6))),
        ("openbookqa", tuple(f"answer{i}" for i in range(1, 6))),
        ("hellaswag", tuple(f"ending{i}" for i in range(1, 5))),
        ("winogrande", ("option1", "option2")),
    ],
)
def test_official_label_words(dataset: str, words: tuple[str, ...]) -> None:
    assert label_words(dataset) == words
    assert infer_answer_type(dataset) == "label"


def test_unknown_label_set_uses_its_gold_answers_longest_first() -> None:
    assert label_words("my_task", ["yes", "no", "yes", "not sure"]) == ("not sure", "yes", "no")
    rule = rule_for("my_task", answers=["yes", "no", "not sure"])
    assert extract(rule, "I am not sure, yes") == "not sure"


# -- AQuA: first capital A-E (faithful) vs the final answer only (strict) --------------------------------


def test_aqua_first_letter_is_faithful_including_the_A_of_answer() -> None:
    # spec G.10: the "A" of "Answer" counts -- fragile, but it is what the official numbers used.
    text = "Answer: (C) 12"
    assert extract(AQUA, text) == "A"
    assert not is_correct(AQUA, extract(AQUA, text), "C")
    assert extract(AQUA, "Explanation: ... so (D)") == "E"  # the E of "Explanation"
    assert extract(AQUA, "the result is (B)") == "B"
    assert extract(AQUA, "no capitals here") is None


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("Answer: (C) 12", "C"),
        ("A train leaves at 5. Explanation: 2 + 3 = 5. The answer is (B).", "B"),
        ("Option A looks tempting, but the answer is D", "D"),
        ("first (A) then reconsider: (E)", "E"),  # no statement: last parenthesised letter
        ("Answer choice is: A", "A"),
        ("A and B are both wrong", None),  # bare capitals are never read as the answer
        ("the answer is Apple", None),  # a letter followed by more letters is a word
    ],
)
def test_aqua_final_answer_rule(text: str, letter: str | None) -> None:
    assert extract_letter(text, "final") == letter
    assert extract(AQUA_FINAL, text) == letter


def test_answer_type_inference_from_names_and_answers() -> None:
    assert infer_answer_type("AQuA") == "letter"
    assert infer_answer_type("gsm8k") == "numeric"
    assert infer_answer_type("SVAMP") == "numeric"
    assert infer_answer_type("new_mc", ["A", "C", "E"]) == "letter"
    assert infer_answer_type("new_math", ["3", "-2.5", "1,000"]) == "numeric"
    assert infer_answer_type("new_cls", ["yes", "no"]) == "label"


def test_extract_answer_from_record_or_rule() -> None:
    assert extract_answer({"dataset": "gsm8k", "answer": "5"}, "so 2 + 3 = 5") == 5.0
    assert extract_answer({"dataset": "piqa", "answer": "solution2"}, "solution2") == "solution2"
    assert extract_answer({"dataset": "x", "answer": "B", "answer_type": "letter"}, "(B)") == "B"
    assert extract_answer(AQUA_FINAL, "Answer: B") == "B"


def test_bad_rules_are_one_line_errors() -> None:
    with pytest.raises(MoATrainError, match="unknown answer type"):
        AnswerRule("regex")
    with pytest.raises(MoATrainError, match="letter rule"):
        AnswerRule("letter", letter_rule="last")


def test_unknown_label_record_needs_its_label_words() -> None:
    with pytest.raises(MoATrainError, match="label words"):
        extract_answer({"dataset": "my_task", "answer": "yes"}, "yes")
    assert extract_answer({"dataset": "my_task", "answer": "no", "labels": ["yes", "no"]}, "no, yes") == "no"
