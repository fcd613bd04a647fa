"""Bad configs fail at construction with one-line errors that name the problem and the fix."""

from __future__ import annotations

import pytest

from moa_train import MoAConfig, MoATrainError, RouterConfig, get_moa_model
from tiny_models import tiny_model

BAD = [
    (lambda: MoAConfig(lora_rank=0), "lora_rank must be > 0"),
    (lambda: MoAConfig(lora_rank_pattern={"q": -1}), "lora_rank_pattern[q]"),
    (lambda: MoAConfig(lora_targets=["q", "qq"]), "lora target='qq' is not known"),
    (lambda: RouterConfig(max_threshold=1.5), "(0, 1]"),
    (lambda: RouterConfig(max_threshold=0.0), "(0, 1]"),
    (lambda: RouterConfig(kind="mlp"), "router.kind='mlp' is not known"),
    (lambda: RouterConfig(selection="topk", activation="sigmoid"), "set router.activation=softmax"),
    (
        lambda: MoAConfig(
            router=RouterConfig(kind="linear", selection="topk", activation="softmax", top_k=9)
        ),
        "exceeds the 7 experts",
    ),
    (
        lambda: MoAConfig(
            lora_experts=4, site_router=RouterConfig(selection="topk", activation="softmax", top_k=5)
        ),
        "exceeds the 4 experts",
    ),
    (lambda: MoAConfig(lora_targets=[], pa_size=0, prompt_len=0), "enables no expert"),
    (lambda: MoAConfig(lora_layers="3-x"), "is not a layer span"),
    (lambda: MoAConfig.from_dict({"lora_rnk": 8}), "unknown moa option(s) ['lora_rnk']"),
    (lambda: MoAConfig.from_dict({"router": {"knd": "linear"}}), "unknown router option(s) ['knd']"),
    (lambda: MoAConfig(pa_activation="swish"), "pa_activation='swish'"),
]


@pytest.mark.parametrize("make,fragment", BAD)
def test_bad_config_one_line_error(make, fragment: str) -> None:
    with pytest.raises(MoATrainError) as info:
        make()
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_layer_span_outside_model_and_missing_module() -> None:
    with pytest.raises(MoATrainError, match=r"names layers \[2, 3\] but the model has 2 layers"):
        get_moa_model(tiny_model(), MoAConfig(lora_layers="0-4"))
    with pytest.raises(MoATrainError) as info:
        get_moa_model(tiny_model(), MoAConfig(site_modules={"q": "self_attn.wq"}))
    message = str(info.value)
    assert (
        "expects module 'self_attn.wq'" in message and "self_attn.q_proj" in message and "\n" not in message
    )


def test_layer_spans_limit_each_expert_type() -> None:
    model = get_moa_model(
        tiny_model(layers=4), MoAConfig(lora_layers="0-2", pa_layers=[3], prompt_layers="none")
    )
    slots = [None if m is None else m.slots for m in model._moa_layers]
    assert slots == [["q", "k", "v", "o", "down"], ["q", "k", "v", "o", "down"], None, ["pa"]]
