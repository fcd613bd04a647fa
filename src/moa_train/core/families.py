"""Base-model families as data: where each family keeps the sites a mixture attaches to.

One injection path (inject.py) serves every family; what differs between families is written down
here, not coded as copies of transformers modules:
  * module paths of the sites inside a decoder layer (q, k, v, o, up, gate, down, the MLP, attention);
  * fused projections: a site that is a slice of one nn.Linear's output rows (Phi-3 ``qkv_proj`` and
    ``gate_up_proj`` in row blocks, GPT-NeoX ``query_key_value`` interleaved per head), so a LoRA on
    q of a fused projection adapts exactly the q rows;
  * the norm that makes the attention's input (what a ``normed`` block router reads): Llama's
    ``input_layernorm``, none for OLMo 2 (its norms come after attention and MLP);
  * the MLP's activation attribute (FFN experts re-run it) and the routed experts of an MoE block.
The attention traits the prompt expert follows (score scale, soft-capping, per-head or full-width
k norm) are read from each attention module itself by ``AttentionView``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moa_train.core.config import DEFAULT_SITE_MODULES
from moa_train.errors import MoATrainError

LLAMA_SITES = DEFAULT_SITE_MODULES  # Llama, Mistral, Qwen2/3, Gemma, OLMo 2, Granite, SmolLM3, MoE attention
ROW_LAYOUTS = ("qkv", "qkv_heads", "halves")


@dataclass(frozen=True)
class FusedSlice:
    """A site that is one slice of a fused projection's output rows."""

    path: str  # the fused nn.Linear inside the decoder layer
    layout: str  # qkv: [q | k | v] row blocks; qkv_heads: per head [q k v]; halves: [first | second]
    part: int  # which slice (0 = q / first half)

    def rows(self, out_features: int, heads: int, kv_heads: int, head_dim: int) -> slice | torch.Tensor:
        """The output rows of this slice: a slice when contiguous, else an index tensor."""
        if self.layout == "halves":
            half = out_features // 2
            return slice(self.part * half, (self.part + 1) * half)
        if self.layout == "qkv":
            sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
            start = sum(sizes[: self.part])
            return slice(start, start + sizes[self.part])
        # qkv_heads (GPT-NeoX): rows are laid out [head, (q, k, v), head_dim]
        return torch.arange(out_features).view(-1, 3, head_dim)[:, self.part].reshape(-1)


@dataclass(frozen=True)
class Family:
    """How moa_train finds the sites of one model family's decoder layers."""

    name: str
    sites: dict[str, str] = field(default_factory=lambda: dict(LLAMA_SITES))
    fused: dict[str, FusedSlice] = field(default_factory=dict)
    attn_norm: str | None = "input_layernorm"  # None: the attention reads the residual stream itself
    act: str | None = "act_fn"  # the gated MLP's activation (block-level FFN experts re-run it)
    moe_experts: str | None = None  # the routed experts of an MoE block (LoRA target "experts")
    missing: dict[str, str] = field(default_factory=dict)  # site -> why this family has none
    known: bool = True

    def path(self, site: str) -> str:
        return self.fused[site].path if site in self.fused else self.sites[site]


def _moe(name: str) -> Family:
    why = (
        f"the FFN of {name} is a mixture of experts with no shared {{site}} projection; use lora target "
        "'experts' (a LoRA on every routed expert) or pa_size > 0 (an FFN-block expert beside the MoE block)"
    )
    return Family(
        name,
        act=None,
        moe_experts="mlp.experts",
        missing={s: why.format(site=s) for s in ("gate", "up", "down")},
    )


_PHI3_FUSED = {
    "q": FusedSlice("self_attn.qkv_proj", "qkv", 0),
    "k": FusedSlice("self_attn.qkv_proj", "qkv", 1),
    "v": FusedSlice("self_attn.qkv_proj", "qkv", 2),
    "gate": FusedSlice("mlp.gate_up_proj", "halves", 0),  # Phi3MLP: gate, up = gate_up.chunk(2)
    "up": FusedSlice("mlp.gate_up_proj", "halves", 1),
}
_NEOX_SITES = {
    "o": "attention.dense",
    "up": "mlp.dense_h_to_4h",
    "down": "mlp.dense_4h_to_h",
    "mlp": "mlp",
    "attn": "attention",
}
_NEOX_FUSED = {s: FusedSlice("attention.query_key_value", "qkv_heads", i) for i, s in enumerate("qkv")}

FAMILIES: dict[str, Family] = {
    **{name: Family(name) for name in ("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite")},
    **{name: Family(name) for name in ("gemma", "gemma2", "gemma3_text")},
    "olmo2": Family("olmo2", attn_norm=None),  # post-norms only: the attention reads the residual itself
    "phi3": Family("phi3", fused=_PHI3_FUSED, act="activation_fn"),
    "gpt_neox": Family(
        "gpt_neox",
        sites=_NEOX_SITES,
        fused=_NEOX_FUSED,
        act=None,
        missing={
            "gate": "GPT-NeoX's MLP is not gated: it has no gate projection (targets: q, k, v, o, up, down)"
        },
    ),
    **{name: _moe(name) for name in ("qwen3_moe", "mixtral", "olmoe", "gpt_oss")},
}


def model_type_of(model: nn.Module) -> str:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return str(getattr(config, "model_type", "") or type(model).__name__)


def family_of(model: nn.Module) -> Family:
    """The family of ``model``; unknown model types get the Llama layout (they work when their layers match it)."""
    model_type = model_type_of(model)
    return FAMILIES.get(model_type) or Family(model_type, known=False)


def supported() -> str:
    return ", ".join(sorted(FAMILIES))


def find_layers(model: nn.Module, family: Family) -> nn.ModuleList:
    """The decoder layers: the first ModuleList whose layers hold the family's attention and MLP."""
    attn, mlp = family.sites["attn"], family.sites["mlp"]
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            first = module[0]
            try:
                first.get_submodule(attn), first.get_submodule(mlp)
            except AttributeError:
                continue
            return module
    hint = (
        ""
        if family.known
        else f" (model_type '{family.name}' is not one of the supported families: {supported()})"
    )
    raise MoATrainError(
        f"{type(model).__name__} has no list of decoder layers with '{attn}' and '{mlp}' modules{hint}; "
        "set moa.site_modules.attn / moa.site_modules.mlp to their names"
    )


class AttentionView:
    """What the prompt expert needs of one attention module, whatever its family: the frozen k and v
    projections of the prompt vectors (fused slices included, with the family's k norm, per head or
    full width), the score scale and the logit soft-cap.

    The projections are called through ``forward`` (not ``__call__``): module hooks, i.e. the LoRA
    experts on k/v, do not apply to the prompt, and quantized layers run their own kernels.
    """

    def __init__(
        self,
        attn: nn.Module,
        k: tuple[nn.Module, slice | torch.Tensor | None],
        v: tuple[nn.Module, slice | torch.Tensor | None],
        head_dim: int,
    ) -> None:
        if getattr(attn, "sinks", None) is not None:
            raise MoATrainError(
                f"{type(attn).__name__} has attention sinks, which the prompt expert does not model; "
                "set moa.prompt_len=0"
            )
        self.attn, self.k, self.v, self.head_dim = attn, k, v, head_dim
        self.scaling = float(getattr(attn, "scaling", head_dim**-0.5))
        cap = getattr(attn, "attn_logit_softcapping", None)
        self.softcap = float(cap) if cap else None
        self.k_norm = getattr(attn, "k_norm", None)
        # Qwen3 / Gemma 3 normalise each head (weight [head_dim]); OLMo 2 / OLMoE the whole k (weight [kv * hd])
        weight = getattr(self.k_norm, "weight", None)
        self.k_norm_per_head = weight is None or weight.shape[-1] == head_dim

    @property
    def k_proj(self) -> nn.Module:
        return self.k[0]

    def versions(self) -> tuple:
        """Identity of every tensor the prompt keys/values depend on (a decode-time cache key)."""
        params = [self.k[0].weight, self.v[0].weight]
        if self.k_norm is not None:
            params += list(self.k_norm.parameters())
        return tuple((p._version, p.data_ptr()) for p in params) + (self.k[0].weight.dtype,)

    def _project(self, part: tuple[nn.Module, slice | torch.Tensor | None], x: torch.Tensor) -> torch.Tensor:
        module, rows = part
        out = module.forward(x)
        if rows is None:
            return out
        if isinstance(rows, slice):
            return out[..., rows]
        return out.index_select(-1, rows.to(out.device))

    def keys_values(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [slots, kv_heads, head_dim] of the prompt vectors [slots, hidden]."""
        keys = self._project(self.k, prompt)
        values = self._project(self.v, prompt).unflatten(-1, (-1, self.head_dim))
        if self.k_norm is not None and not self.k_norm_per_head:
            keys = self.k_norm(keys)
        keys = keys.unflatten(-1, (-1, self.head_dim))
        if self.k_norm is not None and self.k_norm_per_head:
            keys = self.k_norm(keys)
        return keys, values
