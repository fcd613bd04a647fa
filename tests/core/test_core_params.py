"""Trainable-parameter counts on the real LLaMA-3.1-8B shapes equal every row of spec F.2."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moa_train import MoAConfig, RouterConfig, get_moa_model

QKVOD = ["q", "k", "v", "o", "down"]
SITE_SOFTMAX = dict(kind="linear", activation="softmax")
ROWS = {
    "soft_moa_math": (dict(), 24_520_288),
    "soft_moa_commonsense": (dict(router=RouterConfig(kind="linear")), 18_089_696),
    "sparse_moa": (dict(prompt_len=0, router=RouterConfig(kind="swiglu", selection="threshold")), 22_289_120),
    "sparse_moa_linear": (
        dict(prompt_len=0, router=RouterConfig(kind="linear", selection="threshold")),
        16_777_952,
    ),
    "lora_r16": (
        dict(lora_rank=16, lora_alpha=16, pa_size=0, prompt_len=0, router=RouterConfig(kind="none")),
        23_068_672,
    ),
    "prompt": (dict(lora_targets=[], pa_size=0, router=RouterConfig(kind="none")), 1_311_744),
    "parallel_adapter": (dict(lora_targets=[], prompt_len=0, router=RouterConfig(kind="none")), 4_325_888),
    "naive_composition": (dict(router=RouterConfig(kind="none")), 17_171_968),
    "unipeft": (dict(router=RouterConfig(kind="linear", granularity="instance", groups="type")), 17_565_280),
    "hydralora": (
        dict(
            pa_size=0,
            prompt_len=0,
            lora_experts=8,
            lora_shared_a=True,
            router=RouterConfig(kind="none"),
            site_router=RouterConfig(bias=False, **SITE_SOFTMAX),
        ),
        45_088_768,
    ),
    "molora": (
        dict(
            pa_size=0,
            prompt_len=0,
            lora_experts=8,
            router=RouterConfig(kind="none"),
            site_router=RouterConfig(bias=False, **SITE_SOFTMAX),
        ),
        100_139_008,
    ),
    "topk_moe_lora": (
        dict(
            pa_size=0,
            prompt_len=0,
            lora_experts=8,
            router=RouterConfig(kind="none"),
            site_router=RouterConfig(bias=True, selection="topk", top_k=2, **SITE_SOFTMAX),
        ),
        100_140_288,
    ),
    "adamole": (
        dict(
            pa_size=0,
            prompt_len=0,
            lora_experts=8,
            router=RouterConfig(kind="none"),
            site_router=RouterConfig(bias=True, selection="adamole", **SITE_SOFTMAX),
        ),
        101_123_488,
    ),
    # the mixture-of-LoRA family (docs/experiments.md): counts from each release's public code
    "mola": (
        dict(
            lora_targets=["q", "k", "v", "o", "gate", "up", "down"],
            pa_size=0,
            prompt_len=0,
            lora_experts="0-7:2,8-15:4,16-23:6,24-31:8",
            router=RouterConfig(kind="none"),
            site_router=RouterConfig(bias=False, selection="topk", top_k=2, **SITE_SOFTMAX),
        ),
        111_083_520,
    ),
    "dynmole": (
        dict(
            lora_targets=[],
            lora_rank=24,
            lora_alpha=48,
            ffn_experts=6,
            pa_size=0,
            prompt_len=0,
            router=RouterConfig(kind="none"),
            site_router=RouterConfig(bias=False, selection="dynmole", **SITE_SOFTMAX),
        ),
        255_590_400,
    ),
    "loramoe": (
        dict(
            lora_targets=["gate", "up", "down"],
            lora_rank=4,
            lora_alpha=32,
            lora_experts=8,
            pa_size=0,
            prompt_len=0,
            router=RouterConfig(kind="none"),
            site_router=RouterConfig(bias=False, **SITE_SOFTMAX),
        ),
        62_390_272,
    ),
    "moslora": (
        dict(
            lora_targets=["q", "k", "v", "up", "down"],
            lora_rank=16,
            lora_alpha=32,
            lora_mixer=True,
            pa_size=0,
            prompt_len=0,
            router=RouterConfig(kind="none"),
        ),
        28_352_512,
    ),
}


def llama31_8b_on_meta() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(config)


@pytest.mark.parametrize("row", sorted(ROWS))
def test_trainable_parameters_match_spec_f2(row: str) -> None:
    kwargs, expected = ROWS[row]
    model = get_moa_model(
        llama31_8b_on_meta(), MoAConfig(lora_targets=kwargs.pop("lora_targets", QKVOD), **kwargs)
    )
    assert model.num_trainable_parameters() == expected
    by_type = model.num_trainable_parameters(by_type=True)
    assert by_type["total"] == expected == sum(v for k, v in by_type.items() if k != "total")


def test_breakdown_of_sparse_moa_per_layer() -> None:
    cfg = MoAConfig(prompt_len=0, router=RouterConfig(kind="swiglu", selection="threshold"))
    by_type = get_moa_model(llama31_8b_on_meta(), cfg).num_trainable_parameters(by_type=True)
    # spec B.2: LoRA 360,448 + PA 135,184 + router 196,806 + threshold 4,097 per layer
    assert by_type == {
        "lora": 32 * 360_448,
        "pa": 32 * 135_184,
        "router": 32 * 196_806,
        "threshold": 32 * 4_097,
        "total": 22_289_120,
    }
