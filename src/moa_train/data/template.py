"""Prompt templates for training and evaluation (``data.template``).

``alpaca`` (the default, the paper's: method spec E.2): no system prompt and no chat template, the target
is appended directly after ``### Response:``. ``chat``: the tokenizer's own chat template, one user turn
(the instruction, then the input) and one assistant turn (the output); see ``data/tokenize.py``.
"""

from __future__ import annotations

TEMPLATES = ("alpaca", "chat")

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def build_prompt(instruction: str, input: str | None = None) -> str:
    """Return the Alpaca prompt for one record (the model's answer follows it directly)."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def chat_user_text(instruction: str, input: str | None = None) -> str:
    """The user turn of the chat template: the instruction, then the input after a blank line."""
    return f"{instruction}\n\n{input}" if input else instruction
