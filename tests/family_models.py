"""Tiny random-init models of every base family in the support matrix, built offline from the
transformers config classes (hidden 64, 4 heads / 2 KV heads, 2 layers, vocab 128; < 1 M parameters).

Each family keeps the traits that matter to a routed mixture: Gemma 2's logit soft-capping and
alternating sliding windows (a window of 4 so the tests' sequences cross it), Gemma 3's per-head q/k
norms, Phi-3's fused qkv_proj / gate_up_proj, GPT-NeoX's interleaved query_key_value and parallel
residual, OLMo 2's full-width q/k norms and post-norms, Granite's multipliers, SmolLM3's NoPE layers,
and the MoE blocks of Qwen3-MoE, Mixtral and OLMoE (fused 3-D expert tensors, 4 experts, top-2).
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
MOE = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.01)

FAMILY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama"),
    "gemma2": dict(
        model_type="gemma2",
        head_dim=16,
        query_pre_attn_scalar=24,  # a scaling other than head_dim**-0.5, as in the 27B model
        attn_logit_softcapping=5.0,  # low, so that the cap bends the tiny model's scores
        final_logit_softcapping=30.0,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "gemma3_text": dict(
        model_type="gemma3_text",
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "phi3": dict(model_type="phi3", num_key_value_heads=2),
    "gpt_neox": dict(model_type="gpt_neox", num_key_value_heads=4, use_parallel_residual=True),
    "olmo2": dict(model_type="olmo2"),
    "granite": dict(
        model_type="granite",
        attention_multiplier=0.1,
        residual_multiplier=0.5,
        embedding_multiplier=2.0,
        logits_scaling=2.0,
    ),
    "smollm3": dict(model_type="smollm3", no_rope_layers=[1, 0]),  # layer 1 has no RoPE (NoPE)
    "qwen3_moe": dict(model_type="qwen3_moe", head_dim=16, num_experts=4, moe_intermediate_size=32, **MOE),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, sliding_window=None, **MOE),
    "olmoe": dict(model_type="olmoe", num_experts=4, **MOE),
}
DENSE_FAMILIES = [f for f in FAMILY_CONFIGS if f not in ("qwen3_moe", "mixtral", "olmoe")]
MOE_FAMILIES = ["qwen3_moe", "mixtral", "olmoe"]


def family_config(family: str, attn: str = "eager", layers: int = 2):
    """The tiny config of ``family`` (a transformers config object; nothing is downloaded)."""
    kwargs = {**COMMON, **FAMILY_CONFIGS[family], "num_hidden_layers": layers}
    if family == "gpt_neox":  # GPT-NeoX names its FFN width and has no GQA
        kwargs["intermediate_size"] = 4 * kwargs["hidden_size"]
    if "layer_types" in kwargs:
        kwargs["layer_types"] = (kwargs["layer_types"] * layers)[:layers]
    if "no_rope_layers" in kwargs:
        kwargs["no_rope_layers"] = (kwargs["no_rope_layers"] * layers)[:layers]
    return AutoConfig.for_model(attn_implementation=attn, **kwargs)


def family_model(family: str, attn: str = "eager", seed: int = 0, layers: int = 2, dtype=torch.float32):
    """A deterministic random causal LM of ``family`` in eval mode."""
    config = family_config(family, attn, layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # larger-than-default init so routers and experts see non-trivial activations
        model.get_input_embeddings().weight.normal_(0, 1.0)
        for name, param in model.named_parameters():
            # MoE routers init at 0 in some families: random logits so every expert gets tokens
            if name.endswith("gate.weight") and param.dim() == 2 and param.abs().sum() == 0:
                param.normal_(0, 0.5)
    return model.eval()
