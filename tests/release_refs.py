"""Plain-torch transcriptions of the released forward and loss code of five mixture-of-LoRA methods.

tests/core/test_release_fidelity.py checks each related-method preset against these, on the same weights.
Where a release carries a licence (Apache-2.0: mikecovlee/DynMoLE, TUDB-Labs/MoE-PEFT) the functions
follow its code line by line (repository, commit, file and function named on each); where it carries
none (GCYZSL/MoLA, Ablustrund/LoRAMoE, wutaiqiang/MoSLoRA) they are written here from the behaviour of
that code, as described in each docstring, without copying it. Nothing here imports moa_train.

Every reference runs in eval mode semantics (no dropout), so that its outputs are deterministic; the
releases apply LoRA dropout only in training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DYNMOLE = "mikecovlee/DynMoLE@9354b27173dcdcf4cfb9df27a6c482c415668f76"
MOE_PEFT = "TUDB-Labs/MoE-PEFT@40f8cb742cb20eda861099563c96fbb5e6ff3bc2"
MOLA = "GCYZSL/MoLA@01785c84c70846999638b11b88409fdf86361d9a"
LORAMOE = "Ablustrund/LoRAMoE@117728885a4069b74d3fe0f2d71ca84fa5918df4"
MOSLORA = "wutaiqiang/MoSLoRA@bba79b5491742df44e740e7348a265a0954da903"

# Release defaults (templates, config.from_config defaults and run scripts of the commits above).
RELEASE_DEFAULTS = {
    # DynMoLE templates/dynmole.json + moe_peft/adapters/dynmole/config.py::DynMoleConfig.from_config
    "dynmole": dict(
        targets=("gate", "up", "down"), experts=6, r=24, alpha=48, dropout=0.05, top_p=0.75, keep_top_k=2,
        entropy_index=1.1, entropy_threshold=0.9, entropy_eps=1e-5, aux_coef=0.001, dyn_coef=0.01,
        router_init="kaiming_uniform(a=sqrt(5.0))",
    ),
    # MoE-PEFT templates/mixlora.json + moe_peft/adapters/mixlora/config.py::MixLoraConfig.from_config
    "mixlora": dict(
        targets=("q", "k", "v", "o", "gate", "up", "down"), experts=8, top_k=2, r=16, alpha=32,
        dropout=0.05, aux_coef=0.001, router_init_std=0.02,
    ),
    # MoLA README recipe (mola_training.py: --obalance False, modeling: router_aux_loss_coef 0.001)
    "mola": dict(
        targets=("q", "k", "v", "o", "gate", "up", "down"), experts=(2, 4, 6, 8), top_k=2, r=8, alpha=16,
        dropout=0.05, aux_coef=0.001, balance=False,
    ),
    # LoRAMoE run_loramoe.sh
    "loramoe": dict(
        targets=("gate", "up", "down"), experts=8, r=4, alpha=32, dropout=0.05, blc_alpha=0.0, blc_weight=0.0,
    ),
    # MoSLoRA commonsense_reasoning/train_moslora.sh and finetune.py defaults
    "moslora": dict(targets=("q", "k", "v", "up", "down"), r=16, alpha=32, dropout=0.05),
}  # fmt: skip


def lora_forward(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """One LoRA expert's delta B(A(dropout(x))) * scaling in fp32, as every release computes it
    (MoE-PEFT moe_peft/common/lora_linear.py::Lora.lora_forward; the same form in MoLA, LoRAMoE)."""
    return F.linear(F.linear(x.float(), a), b) * scaling


# ----------------------------------------------------------------------------------------------------
# DynMoLE (Apache-2.0), mikecovlee/DynMoLE@9354b27
# ----------------------------------------------------------------------------------------------------


def dynmole_tsallis_entropy(p: torch.Tensor, q: float, eps: float = 1e-5) -> torch.Tensor:
    """moe_peft/common/moe_utils.py::tsallis_entropy (normalize=True): (1 - sum (p+eps)^q)/(q-1), divided
    by its maximum (1 - N^(1-q))/(q-1)."""
    n = p.size(-1)
    p = p + eps
    entropy = (1 - torch.sum(p**q, dim=-1)) / (q - 1)
    max_entropy = torch.tensor((1 - n ** (1 - q)) / (q - 1), dtype=torch.float32)
    return entropy / max_entropy


def dynmole_dynamic_routing(
    probs: torch.Tensor,
    entropy_threshold: float,
    entropy_index: float,
    entropy_eps: float,
    keep_top_k: int,
    top_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """moe_peft/adapters/dynmole/model.py::_dynamic_routing (tsallis): (entropy [N], weights p * mask)."""
    sorted_probs, sorted_indices = torch.sort(probs, dim=-1, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    expert_mask = (cumulative <= top_p).to(probs.dtype)
    expert_mask[..., :keep_top_k] = 1
    final_mask = torch.zeros_like(probs)
    final_mask.scatter_(-1, sorted_indices, expert_mask)
    entropy = dynmole_tsallis_entropy(probs, entropy_index, entropy_eps)
    if entropy_index > 0.0 and entropy_threshold < 1.0:
        final_mask[entropy > entropy_threshold] = 1
    return entropy, probs * final_mask


class DynMoLELinear(nn.Module):
    """One target projection under DynMoLE: model.py::DynMoleSparseMoe.forward. A bias-free fp32 router
    over the projection's input; the frozen output plus sum_i w_i * LoRA_i(x), w = dynamic-routing
    weights (not renormalised). ``router_logits_`` keeps [N, E] for the router loss."""

    def __init__(self, base: nn.Linear, router: torch.Tensor, a: list, b: list, scaling: float, cfg: dict):
        super().__init__()
        self.base, self.cfg, self.scaling = base, cfg, scaling
        self.router = nn.Parameter(router.detach().clone())
        self.a = nn.ParameterList([nn.Parameter(t.detach().clone()) for t in a])
        self.b = nn.ParameterList([nn.Parameter(t.detach().clone()) for t in b])
        self.router_logits_: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        residual = self.base(x)
        router_logits = F.linear(x.float(), self.router)
        self.router_logits_ = router_logits.reshape(-1, len(self.a))
        weights = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        _, weights = dynmole_dynamic_routing(
            weights, cfg["entropy_threshold"], cfg["entropy_index"], cfg["entropy_eps"],
            cfg["keep_top_k"], cfg["top_p"],
        )  # fmt: skip
        for i, (a, b) in enumerate(zip(self.a, self.b)):
            residual = residual + (weights[..., i].unsqueeze(-1) * lora_forward(x, a, b, self.scaling)).to(
                x.dtype
            )
        return residual


def dynmole_router_loss(
    router_logits: torch.Tensor, attention_mask: torch.Tensor | None, cfg: dict
) -> torch.Tensor:
    """model.py::_dynamic_load_balancing_loss_func on the logits of EVERY router of the model
    concatenated along the token axis (moe_utils.py::collect_plugin_router_logtis, model.py::forward):
    one entropy mean over all (router, token) rows, padding included; one balance loss with f_e and
    P_e each averaged over all routers' real tokens, f_e from the masked weights (with gradient)."""
    orig = F.softmax(router_logits, dim=-1)
    entropy, weights = dynmole_dynamic_routing(
        orig,
        cfg["entropy_threshold"],
        cfg["entropy_index"],
        cfg["entropy_eps"],
        cfg["keep_top_k"],
        cfg["top_p"],
    )
    entropy_loss = entropy.mean()
    num_experts = weights.size(-1)
    if attention_mask is None:
        tokens_per_expert = weights.mean(0)
        prob_per_expert = orig.mean(0)
    else:
        batch, seq = attention_mask.shape
        routers = weights.shape[0] // (batch * seq)
        mask = (
            attention_mask[None, :, :, None].expand(routers, batch, seq, num_experts).reshape(-1, num_experts)
        )
        mask = mask.to(weights.dtype)
        denom = mask.sum(0)
        tokens_per_expert = (weights * mask).sum(0) / (denom + 1e-8)
        prob_per_expert = (orig * mask).sum(0) / (denom + 1e-8)
    balance = num_experts * torch.sum(tokens_per_expert * prob_per_expert)
    return cfg["dyn_coef"] * entropy_loss + cfg["aux_coef"] * balance


# ----------------------------------------------------------------------------------------------------
# MixLoRA (Apache-2.0), TUDB-Labs/MoE-PEFT@40f8cb7
# ----------------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A plain LoRA projection: moe_peft/common/lora_linear.py::Lora.forward (residual + lora_forward)."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, scaling: float):
        super().__init__()
        self.base, self.scaling = base, scaling
        self.a, self.b = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + lora_forward(x, self.a, self.b, self.scaling).to(x.dtype)


class MixLoRAMLP(nn.Module):
    """A LLaMA MLP under MixLoRA: moe_peft/adapters/mixlora/model.py::MixtralSparseMoe.forward with
    moe_peft/models/modeling_llama.py::LlamaMLP._mixlora_forward. Expert i is the frozen FFN with its own
    LoRA on gate (w1), up (w3) and down (w2); a fp32 bias-free router picks the top k by softmax
    probability, renormalises them, and each expert runs only on its tokens (index_add_)."""

    def __init__(self, mlp: nn.Module, router: torch.Tensor, loras: dict, scaling: float, top_k: int):
        super().__init__()
        self.mlp, self.scaling, self.top_k = mlp, scaling, top_k
        self.router = nn.Parameter(router.detach().clone())
        # loras[proj] = (list of A_i, list of B_i), proj in gate/up/down
        self.loras = nn.ModuleDict(
            {
                proj: nn.ParameterList([nn.Parameter(t.detach().clone()) for t in (*a, *b)])
                for proj, (a, b) in loras.items()
            }
        )
        self.experts = router.shape[0]
        self.router_logits_: torch.Tensor | None = None

    def _lora(self, proj: str, i: int, base_out: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        params = self.loras[proj]
        a, b = params[i], params[self.experts + i]
        return base_out + lora_forward(data, a, b, self.scaling).to(base_out.dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden_dim = hidden_states.shape
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.view(-1, hidden_dim).float()
        router_logits = F.linear(hidden_states, self.router)
        self.router_logits_ = router_logits
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float32)
        routing_weights, selected = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
        final = torch.zeros((batch * seq, hidden_dim), dtype=torch.float32, device=hidden_states.device)
        expert_mask = F.one_hot(selected, num_classes=self.experts).permute(2, 1, 0)
        mlp = self.mlp
        common_w1 = mlp.gate_proj(hidden_states.to(input_dtype)).float()
        common_w3 = mlp.up_proj(hidden_states.to(input_dtype)).float()
        for i in range(self.experts):
            idx, top_x = torch.where(expert_mask[i])
            data = hidden_states[top_x].to(input_dtype)
            w1 = self._lora("gate", i, common_w1[top_x].to(input_dtype), data)
            w3 = self._lora("up", i, common_w3[top_x].to(input_dtype), data)
            act = mlp.act_fn(w1) * w3
            out = self._lora("down", i, mlp.down_proj(act), act)
            final.index_add_(0, top_x, (out * routing_weights[top_x, idx, None]).float())
        return final.reshape(batch, seq, hidden_dim).to(input_dtype)


def mixtral_load_balancing_loss(
    gate_logits: torch.Tensor, num_experts: int, top_k: int, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """moe_peft/adapters/mixlora/model.py::_mixtral_load_balancing_loss_func on every layer's router
    logits concatenated (model.py::forward, moe_utils.py::unpack_router_logits): ONE loss whose
    f_e (fraction of real tokens keeping e, summed over the k choices) and P_e are pooled over layers."""
    routing_weights = F.softmax(gate_logits, dim=-1)
    _, selected = torch.topk(routing_weights, top_k, dim=-1)
    expert_mask = F.one_hot(selected, num_experts)
    if attention_mask is None:
        tokens_per_expert = expert_mask.float().mean(0)
        prob_per_expert = routing_weights.mean(0)
    else:
        batch, seq = attention_mask.shape
        layers = routing_weights.shape[0] // (batch * seq)
        expert_attention_mask = (
            attention_mask[None, :, :, None, None]
            .expand(layers, batch, seq, top_k, num_experts)
            .reshape(-1, top_k, num_experts)
            .to(routing_weights.dtype)
        )
        tokens_per_expert = (expert_mask.float() * expert_attention_mask).sum(0) / expert_attention_mask.sum(
            0
        )
        router_mask = (
            attention_mask[None, :, :, None]
            .expand(layers, batch, seq, num_experts)
            .reshape(-1, num_experts)
            .to(routing_weights.dtype)
        )
        prob_per_expert = (routing_weights * router_mask).sum(0) / router_mask.sum(0)
    return torch.sum(tokens_per_expert * prob_per_expert.unsqueeze(0)) * num_experts


# ----------------------------------------------------------------------------------------------------
# MoLA (no licence: written from the behaviour of GCYZSL/MoLA src/mola_lora_hacked.py::Linear.forward
# and src/mola_modeling_llama_hacked.py::load_balancing_loss_func)
# ----------------------------------------------------------------------------------------------------


class TopKLoRALinear(nn.Module):
    """A MoLA projection: the frozen output plus, for each token, its top-k LoRA experts (router softmax in
    fp32 over a bias-free linear map of the projection input, the k weights renormalised to sum 1),
    each expert computed only on the tokens that picked it. ``router_logits_`` keeps [N, E]."""

    def __init__(self, base: nn.Linear, router: torch.Tensor, a: list, b: list, scaling: float, top_k: int):
        super().__init__()
        self.base, self.scaling, self.top_k = base, scaling, top_k
        self.router = nn.Parameter(router.detach().clone())
        self.a = nn.ParameterList([nn.Parameter(t.detach().clone()) for t in a])
        self.b = nn.ParameterList([nn.Parameter(t.detach().clone()) for t in b])
        self.router_logits_: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        flat = x.reshape(-1, x.shape[-1])
        logits = F.linear(flat, self.router)
        self.router_logits_ = logits
        probs = torch.softmax(logits.float(), dim=-1)
        top, chosen = probs.topk(self.top_k, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        delta = torch.zeros(flat.shape[0], out.shape[-1], dtype=torch.float32)
        for e in range(len(self.a)):
            rows, slot = torch.nonzero(chosen == e, as_tuple=True)
            if rows.numel():
                contrib = lora_forward(flat[rows], self.a[e], self.b[e], self.scaling) * top[rows, slot, None]
                delta = delta.index_add(0, rows, contrib)
        return out + delta.reshape(out.shape).to(out.dtype)


def mola_balance_loss(layer_logits: list[torch.Tensor], top_k: list[int]) -> torch.Tensor:
    """MoLA's optional balance loss: per decoder layer the router logits of all its sites are stacked
    into one set of rows (padding included, no mask); f_e = the share of all (row, pick) assignments that
    went to e, P_e = the mean softmax probability of e over the rows; the layer's loss is E_l * sum f P;
    the model's loss is the sum over layers (times router_aux_loss_coef 0.001 when --obalance)."""
    total = torch.zeros(())
    for logits, k in zip(layer_logits, top_k):
        probs = torch.softmax(logits.float(), dim=-1)
        num = probs.shape[-1]
        picks = torch.zeros(num).index_add_(
            0, probs.topk(k, dim=-1).indices.reshape(-1), torch.ones(probs.shape[0] * k)
        )
        total = total + num * torch.sum(picks / picks.sum() * probs.mean(0))
    return total


# ----------------------------------------------------------------------------------------------------
# LoRAMoE (no licence: written from the behaviour of Ablustrund/LoRAMoE peft/tuners/lora.py::Linear)
# ----------------------------------------------------------------------------------------------------


class DenseLoRALinear(nn.Module):
    """A LoRAMoE projection: the frozen output plus sum_i softmax(route(x))_i * LoRA_i(x) over all experts
    (no top-k; the route is a bias-free linear map of the un-dropped input). ``route_weight_`` keeps
    [B, T, E] for the localized balancing constraint."""

    def __init__(self, base: nn.Linear, router: torch.Tensor, a: list, b: list, scaling: float):
        super().__init__()
        self.base, self.scaling = base, scaling
        self.router = nn.Parameter(router.detach().clone())
        self.a = nn.ParameterList([nn.Parameter(t.detach().clone()) for t in a])
        self.b = nn.ParameterList([nn.Parameter(t.detach().clone()) for t in b])
        self.route_weight_: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        weights = torch.softmax(F.linear(x, self.router).float(), dim=-1).to(out.dtype)
        self.route_weight_ = weights
        for e in range(len(self.a)):
            out = out + weights[..., e : e + 1] * lora_forward(x, self.a[e], self.b[e], self.scaling).to(
                out.dtype
            )
        return out


def loramoe_lbc(route_weight: torch.Tensor, task_types: torch.Tensor, alpha: float) -> torch.Tensor:
    """LoRAMoE's localized balancing constraint at one site: the routing weights summed over every
    position of each sequence (padding included) give importance [B, E]; for an example of task type 1
    the FIRST half of the experts is multiplied by 1 + alpha and the second half by 1 - alpha, for type 0
    the other way round; the loss is the squared coefficient of variation var / (mean^2 + 1e-10) of all
    B x E values (unbiased variance). The model sums it over every site and layer, times blc_weight."""
    importance = route_weight.float().sum(1)
    num = importance.shape[-1]
    first_half = torch.arange(num) < num // 2
    boosted = torch.where(task_types.view(-1, 1) == 1, first_half, ~first_half)
    values = (importance * torch.where(boosted, 1.0 + alpha, 1.0 - alpha)).flatten()
    if values.numel() == 1:
        return values.new_zeros(())
    return values.var() / (values.mean() ** 2 + 1e-10)


# ----------------------------------------------------------------------------------------------------
# MoSLoRA (no licence at the repository root: written from the behaviour of wutaiqiang/MoSLoRA
# commonsense_reasoning/peft/src/peft/tuners/lora.py, lora_use_mixer)
# ----------------------------------------------------------------------------------------------------


class MixerLoRALinear(nn.Module):
    """A MoSLoRA projection: the frozen output plus scaling * B(M(A(dropout x))) with a learnable r x r
    mixer M between the down- and up-projection (a bias-free linear layer, so the delta merges)."""

    def __init__(
        self, base: nn.Linear, a: torch.Tensor, mixer: torch.Tensor, b: torch.Tensor, scaling: float
    ):
        super().__init__()
        self.base, self.scaling = base, scaling
        self.a, self.m, self.b = (nn.Parameter(t.detach().clone()) for t in (a, mixer, b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (F.linear(F.linear(F.linear(x, self.a), self.m), self.b) * self.scaling).to(
            x.dtype
        )


# ----------------------------------------------------------------------------------------------------
# Trainable parameters of each release on a LLaMA shape, from the structures above
# ----------------------------------------------------------------------------------------------------


def site_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int) -> dict[str, tuple[int, int]]:
    """(in, out) of the seven LLaMA projections."""
    head_dim = hidden // heads
    return {
        "q": (hidden, hidden), "k": (hidden, kv_heads * head_dim), "v": (hidden, kv_heads * head_dim),
        "o": (hidden, hidden), "gate": (hidden, intermediate), "up": (hidden, intermediate),
        "down": (intermediate, hidden),
    }  # fmt: skip


def release_trainable_parameters(
    method: str, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int
) -> int:
    """Trainable parameters of the release's default configuration (RELEASE_DEFAULTS) on a LLaMA shape."""
    d = RELEASE_DEFAULTS[method]
    shapes = site_shapes(hidden, intermediate, heads, kv_heads)
    r = d["r"]
    lora = {site: r * (fin + fout) for site, (fin, fout) in shapes.items()}
    total = 0
    for layer in range(layers):
        if method == "dynmole" or method == "loramoe":  # per-site router + E experts per site
            e = d["experts"]
            total += sum(e * lora[s] + e * shapes[s][0] for s in d["targets"])
        elif method == "mola":  # four consecutive quarters of the layers get 2, 4, 6, 8 experts
            e = d["experts"][layer * len(d["experts"]) // layers]
            total += sum(e * lora[s] + e * shapes[s][0] for s in d["targets"])
        elif method == "mixlora":  # plain LoRA on attention, E LoRA triples + one router on the FFN
            e = d["experts"]
            total += sum(lora[s] for s in ("q", "k", "v", "o"))
            total += e * sum(lora[s] for s in ("gate", "up", "down")) + e * hidden
        elif method == "moslora":
            total += sum(lora[s] + r * r for s in d["targets"])
        else:
            raise ValueError(method)
    return total


def kaiming_bound(fan_in: int) -> float:
    """The bound of kaiming_uniform_(a=sqrt(5)) on a [*, fan_in] weight: 1 / sqrt(fan_in)."""
    return 1.0 / math.sqrt(fan_in)
