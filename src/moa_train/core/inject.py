"""The one place that finds sites in a stock Hugging Face causal LM and wires experts and routers in.

Nothing of transformers is copied or patched: we attach a ``moa`` MoALayer to every decoder layer and
install hooks —
  * decoder-layer forward pre-hook: the block router computes this layer's gates from its input;
  * forward hooks on q/k/v/o/up/gate/down projections: output += gated LoRA delta of the site input;
  * block-level FFN experts (ffn_experts): hooks on gate/up record the frozen outputs, a pre-hook on
    down feeds it the routed mix of the experts' hidden states, a hook on down adds their deltas;
  * forward hook on the MLP: output += gated parallel adapter of the MLP input (the FFN-norm output);
  * an attention function registered with transformers' AttentionInterface (``moa_<impl>``): it runs
    the model's own attention, then adds the gated prompt attention of the post-RoPE queries;
  * a model-level pre-hook that records the padding mask, the instance mask and prefill vs decode.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from moa_train.core.config import DEFAULT_SITE_MODULES, LORA_SITES, MoAConfig, parse_layers
from moa_train.core.layer import MoALayer, MoAState
from moa_train.errors import MoATrainError

ATTN_PREFIX = "moa_"


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers (``model.model.layers`` for Llama/Mistral/Qwen)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and hasattr(module[0], "input_layernorm"):
            return module
    raise MoATrainError(
        f"{type(model).__name__} has no list of decoder layers with an 'input_layernorm'; "
        "moa_train supports Llama-style causal LMs (Llama, Mistral, Qwen2, Qwen3)"
    )


def _site_module(layer: nn.Module, cfg: MoAConfig, site: str, index: int) -> nn.Module:
    path = cfg.site_modules.get(site, DEFAULT_SITE_MODULES[site])
    try:
        return layer.get_submodule(path)
    except AttributeError:
        names = sorted(n for n, m in layer.named_modules() if n and isinstance(m, nn.Linear))
        raise MoATrainError(
            f"target '{site}' expects module '{path}' in decoder layer {index}, which has: {', '.join(names)}; "
            f"set moa.site_modules.{site}=<one of these>"
        ) from None


def _model_attention(module: nn.Module, implementation: str) -> Callable:
    if implementation == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _moa_attention(module, query, key, value, attention_mask, **kwargs):
    """The model's own attention, plus the gated prompt expert of this layer (when it has one)."""
    moa_layer: MoALayer | None = module.__dict__.get("_moa_layer")
    implementation = module.config._attn_implementation.removeprefix(ATTN_PREFIX)
    out, weights = _model_attention(module, implementation)(
        module, query, key, value, attention_mask, **kwargs
    )
    if moa_layer is not None and moa_layer._state.enabled:
        delta = moa_layer.prompt_delta(module, query)
        out = out + (delta if delta.dtype == out.dtype else delta.to(out.dtype))
    return out, weights


def _use_moa_attention(model: nn.Module) -> None:
    config = model.config
    current = config._attn_implementation or "eager"
    if current.startswith(ATTN_PREFIX):
        return
    name = ATTN_PREFIX + current
    ALL_ATTENTION_FUNCTIONS.register(name, _moa_attention)
    if current in ALL_MASK_ATTENTION_FUNCTIONS:
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    config._attn_implementation = name


def restore_attention(model: nn.Module) -> None:
    impl = model.config._attn_implementation
    if impl and impl.startswith(ATTN_PREFIX):
        model.config._attn_implementation = impl.removeprefix(ATTN_PREFIX)


def inject(model: nn.Module, cfg: MoAConfig, state: MoAState) -> tuple[list[MoALayer | None], list]:
    """Attach a MoALayer to every decoder layer that gets an expert; return them and the hook handles."""
    layers = find_decoder_layers(model)
    n = len(layers)
    has_lora = bool(cfg.lora_targets) or cfg.has_ffn_experts()
    lora_layers = set(parse_layers(cfg.lora_layers, n, "lora_layers")) if has_lora else set()
    pa_layers = set(parse_layers(cfg.pa_layers, n, "pa_layers")) if cfg.pa_size > 0 else set()
    prompt_layers = set(parse_layers(cfg.prompt_layers, n, "prompt_layers")) if cfg.prompt_len > 0 else set()
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden, heads = text_config.hidden_size, text_config.num_attention_heads
    handles: list = []
    moa_layers: list[MoALayer | None] = []
    for index, layer in enumerate(layers):
        layer_cfg = cfg.for_layer(index, n)  # per-layer expert counts and top-k (MoLA span maps)
        sites = (
            {s: _site_module(layer, cfg, s, index) for s in cfg.lora_targets} if index in lora_layers else {}
        )
        ffn_sites = _ffn_sites(layer, cfg, index) if index in lora_layers and layer_cfg.ffn_experts else {}
        use_pa, use_prompt = index in pa_layers, index in prompt_layers
        if not (sites or ffn_sites or use_pa or use_prompt):
            moa_layers.append(None)
            continue
        shapes = {s: (m.in_features, m.out_features) for s, m in sites.items()}
        ffn = None
        if ffn_sites:
            gate = ffn_sites["gate"]
            ffn = (gate.in_features, gate.out_features, ffn_sites["act_fn"])
        reference = next(p for p in layer.parameters())
        with torch.device(reference.device):
            moa = MoALayer(layer_cfg, shapes, hidden, heads, use_prompt, use_pa, state, ffn)
        moa.float()  # adapters train in fp32 whatever the base dtype (spec D.1)
        layer.moa = moa
        moa_layers.append(moa)
        handles.append(layer.register_forward_pre_hook(_route_hook(moa, state), with_kwargs=True))
        for site, module in sites.items():
            handles.append(module.register_forward_hook(_site_hook(moa, state, site)))
        if ffn_sites:
            handles += _ffn_hooks(moa, state, ffn_sites)
        if use_pa:
            mlp = _site_module(layer, cfg, "mlp", index)
            handles.append(mlp.register_forward_hook(_pa_hook(moa, state)))
        if use_prompt:
            attn = _site_module(layer, cfg, "attn", index)
            attn.__dict__["_moa_layer"] = moa  # plain attribute: not a second registration of the module
    if prompt_layers:
        _use_moa_attention(model)
    handles.append(model.register_forward_pre_hook(_model_hook(state, moa_layers), with_kwargs=True))
    return moa_layers, handles


def _ffn_sites(layer: nn.Module, cfg: MoAConfig, index: int) -> dict:
    """gate/up/down projections and the MLP activation of a layer that gets block-level FFN experts."""
    found = {s: _site_module(layer, cfg, s, index) for s in ("gate", "up", "down")}
    act = getattr(_site_module(layer, cfg, "mlp", index), "act_fn", None)
    if act is None:
        raise MoATrainError(
            f"ffn_experts needs a gated MLP with an 'act_fn' (Llama style); decoder layer {index}'s MLP has none"
        )
    return {**found, "act_fn": act}


def _ffn_hooks(moa: MoALayer, state: MoAState, sites: dict) -> list:
    """Block-level FFN experts (experts/ffn.py): record the frozen gate/up outputs, replace the down
    projection's input by the routed mix of the experts' hidden states, add the experts' down deltas."""
    ffn = moa.ffn

    def gate_hook(module, args, output):
        if state.enabled:
            ffn.remember(x=args[0], base_gate=output)

    def up_hook(module, args, output):
        if state.enabled:
            ffn.remember(base_up=output)

    def down_pre_hook(module, args):
        if not state.enabled:
            return None
        mixed = ffn.mixed_hidden()
        return (mixed if mixed.dtype == args[0].dtype else mixed.to(args[0].dtype),)

    def down_hook(module, args, output):
        if not state.enabled:
            return None
        delta = ffn.down_delta()
        return output + (delta if delta.dtype == output.dtype else delta.to(output.dtype))

    return [
        sites["gate"].register_forward_hook(gate_hook),
        sites["up"].register_forward_hook(up_hook),
        sites["down"].register_forward_pre_hook(down_pre_hook),
        sites["down"].register_forward_hook(down_hook),
    ]


def _route_hook(moa: MoALayer, state: MoAState):
    def hook(layer, args, kwargs):
        if state.enabled:
            moa.route(layer, args[0] if args else kwargs["hidden_states"])

    return hook


def _site_hook(moa: MoALayer, state: MoAState, site: str):
    expert = moa.lora[site]
    assert site in LORA_SITES

    def hook(module, args, output):
        if not state.enabled:
            return None
        delta = moa.delta(site, args[0], expert)
        return output + (delta if delta.dtype == output.dtype else delta.to(output.dtype))

    return hook


def _pa_hook(moa: MoALayer, state: MoAState):
    def hook(module, args, output):
        if not state.enabled:
            return None
        delta = moa.delta("pa", args[0], moa.pa)
        return output + (delta if delta.dtype == output.dtype else delta.to(output.dtype))

    return hook


def _model_hook(state: MoAState, moa_layers: list[MoALayer | None]):
    def hook(module, args, kwargs):
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        length = tokens.shape[1]
        attention_mask = kwargs.get("attention_mask")
        token_mask = None
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -length:].to(torch.float32)
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        state.is_prefill = (
            cache is None or not hasattr(cache, "get_seq_length") or cache.get_seq_length() == 0
        )
        state.token_mask = token_mask
        # Instance routers average over the prompt: labels of -100 mark it during training (fixes spec G.12).
        instance = state.explicit_instance_mask
        labels = kwargs.get("labels")
        if instance is None and isinstance(labels, torch.Tensor):
            prompt = (labels == -100).to(torch.float32)
            instance = prompt if token_mask is None else prompt * token_mask
            empty = instance.sum(1, keepdim=True) == 0  # a row with no prompt: fall back to all real tokens
            fallback = token_mask if token_mask is not None else torch.ones_like(instance)
            instance = torch.where(empty, fallback, instance)
        state.instance_mask = instance
        state.aux = {}

    return hook
