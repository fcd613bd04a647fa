"""Multi-turn chat records: ``messages`` (OpenAI roles) or ShareGPT ``conversations``.

A chat record is rendered with the tokenizer's own chat template and trained on its assistant turns only.
The label mask is placed by position, found by rendering prefixes of the conversation:

* turn i's assistant text starts where ``render(messages[:i], add_generation_prompt=True)`` ends and
  ends where ``render(messages[:i + 1])`` ends; both must be token prefixes of the whole conversation
  (a template that rewrites earlier turns, e.g. one that drops past reasoning, is refused, since no
  mask could then be placed by position);
* inside that span the supervised tokens are the reply up to and including the first EOS (the
  end-of-turn token of instruct tokenizers); what the template writes after it (a newline) is context.

Why not ``apply_chat_template(..., return_assistant_tokens_mask=True)``: it needs ``{% generation %}``
markers in the template, which most published templates (SmolLM2's included) do not have; rendering
prefixes works with any template that renders turns in order.

Evaluation (the final evaluation and moa-eval) generates the LAST assistant turn: the prompt is the
conversation before it with the generation prompt, the reference is that turn's text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from moa_train.errors import MoATrainError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's "from" values and the OpenAI role each one becomes
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "tool": "tool",
    "function_response": "tool",
    "observation": "tool",
}


def is_chat_record(item: Any) -> bool:
    """True for a record with ``messages`` or ``conversations`` (a chat record)."""
    return isinstance(item, Mapping) and ("messages" in item or "conversations" in item)


def normalize_messages(item: Mapping[str, Any], where: str) -> list[dict[str, str]]:
    """The record's turns as ``[{"role", "content"}]`` with OpenAI roles; one-line errors name ``where``.

    ShareGPT turns (``{"from": "human"|"gpt"|..., "value": ...}``) are converted. Refused: a turn that is
    not an object, an unknown role, non-text content, no assistant turn, an assistant turn before any user
    turn.
    """
    sharegpt = "messages" not in item
    turns = item.get("conversations") if sharegpt else item.get("messages")
    key = "conversations" if sharegpt else "messages"
    if not isinstance(turns, list) or not turns:
        raise MoATrainError(f"{where}: {key!r} must be a non-empty list of turns")
    messages: list[dict[str, str]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise MoATrainError(f"{where}: {key}[{i}] is a {type(turn).__name__}, expected an object")
        if sharegpt:
            raw_role, content = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
            role = SHAREGPT_ROLES.get(str(raw_role).lower()) if raw_role is not None else None
            known = ", ".join(sorted(SHAREGPT_ROLES))
        else:
            raw_role, content = turn.get("role"), turn.get("content")
            role = raw_role if raw_role in ROLES else None
            known = ", ".join(ROLES)
        if role is None:
            raise MoATrainError(f"{where}: {key}[{i}] has role {raw_role!r}; use one of {known}")
        if content is None:
            content = ""
        if not isinstance(content, str):  # multimodal content parts are not text this trainer can use
            raise MoATrainError(f"{where}: {key}[{i}] content is a {type(content).__name__}; expected text")
        messages.append({"role": role, "content": content})
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise MoATrainError(f"{where}: the conversation has no assistant turn to train on or score")
    first_assistant = roles.index("assistant")
    if "user" not in roles[:first_assistant]:
        raise MoATrainError(f"{where}: {key}[{first_assistant}] is an assistant turn before any user turn")
    return messages


def chat_record(item: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A record for the rest of the pipeline: ``messages`` (normalised) plus the fields that scoring and
    reports read: ``instruction`` = the last user turn before the last assistant turn, ``input`` = "",
    ``output`` = the last assistant turn, ``answer`` = the record's ``answer`` or that turn's text."""
    messages = normalize_messages(item, where)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    user = [m["content"] for m in messages[:last] if m["role"] == "user"][-1]
    record = {k: v for k, v in item.items() if k not in ("messages", "conversations")}
    answer = item.get("answer")
    record.update(
        messages=messages,
        instruction=user,
        input="",
        output=messages[last]["content"],
        answer=(messages[last]["content"] if answer is None else str(answer)).strip(),
    )
    return record


def _render(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], generation_prompt: bool, where: str
) -> list[int]:
    try:
        ids = tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=generation_prompt, tokenize=True
        )
    except Exception as exc:  # jinja errors (e.g. "roles must alternate") come as many exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MoATrainError(
            f"{where}: the tokenizer's chat template cannot render this conversation ({first}); "
            "fix the record or use a model whose template accepts its roles"
        ) from None
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def check_chat_tokenizer(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise MoATrainError(
            "chat records (messages / conversations) need a tokenizer with a chat template, and this one "
            "has none (a base model's tokenizer?); set model.tokenizer to an instruct model's tokenizer"
        )


def encode_chat(
    messages: Sequence[Mapping[str, str]],
    tokenizer: Any,
    max_len: int,
    *,
    train_on_inputs: bool = False,
    where: str = "record",
) -> tuple[dict[str, list[int]], bool]:
    """``({"input_ids", "labels"}, complete)`` of a whole conversation: labels are -100 except on each
    assistant reply (+ its end-of-turn token); ``train_on_inputs`` supervises every token.

    Longer than ``max_len``: the conversation is cut from its end (``complete`` is then False when a
    supervised token was cut); the caller drops an example left without a target."""
    check_chat_tokenizer(tokenizer)
    if max_len < 2:
        raise MoATrainError(f"data.max_len must be >= 2, got {max_len}")
    eos = tokenizer.eos_token_id
    full = _render(tokenizer, messages, False, where)
    labels = list(full) if train_on_inputs else [IGNORE_INDEX] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], True, where))
        through = _render(tokenizer, messages[: i + 1], False, where)
        if full[:start] != through[:start] or full[: len(through)] != through or start > len(through):
            raise MoATrainError(
                f"{where}: the chat template does not render turn {i} as a prefix of the conversation, so "
                "its loss mask cannot be placed by position; use a template that renders turns in order"
            )
        span = full[start : len(through)]
        if (
            eos is not None and eos in span
        ):  # the reply and its end-of-turn token; a trailing newline is context
            span = span[: span.index(eos) + 1]
        labels[start : start + len(span)] = span
    complete = len(full) <= max_len or all(label == IGNORE_INDEX for label in labels[max_len:])
    return {"input_ids": full[:max_len], "labels": labels[:max_len]}, complete


def chat_prompt_ids(
    messages: Sequence[Mapping[str, str]], tokenizer: Any, where: str = "record"
) -> list[int]:
    """Prompt ids for generating the LAST assistant turn: the turns before it + the generation prompt."""
    check_chat_tokenizer(tokenizer)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return _render(tokenizer, messages[:last], True, where)
