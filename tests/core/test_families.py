"""The support matrix: every family of tests/family_models.py with Soft MoA, Sparse MoA and LoRA.

Each test is named ``test_<check>`` and parametrized by family (and method); scripts/support_matrix.py
turns their outcomes into docs/support_matrix.md. References are independent of the injection code:
merged weights written into the family's own (fused) projections, the family's own eager attention
called with the prompt keys, the family's own expert loop with merged expert weights.
"""

from __future__ import annotations

import sys

import pytest
import torch

from core_helpers import randomize_adapters
from family_models import DENSE_FAMILIES, FAMILY_CONFIGS, MOE_FAMILIES, family_config, family_model
from moa_train import MoAModel, get_moa_model
from moa_train.errors import MoATrainError

FAMILIES = list(FAMILY_CONFIGS)
IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def lora_targets(family: str) -> list[str]:
    """Every LoRA site the family has (a MoE base: attention + its routed experts)."""
    if family in MOE_FAMILIES:
        return ["q", "k", "v", "o", "experts"]
    if family == "gpt_neox":  # a plain (non-gated) MLP
        return ["q", "k", "v", "o", "up", "down"]
    return ["q", "k", "v", "o", "up", "gate", "down"]


def method(name: str, family: str) -> dict:
    """Soft MoA / Sparse MoA: LoRA on the attention (and dense FFN) sites, the prompt expert and the
    parallel adapter (on an MoE base: beside the MoE block), one block router; LoRA: every site."""
    attention_ffn = [t for t in lora_targets(family) if t != "experts"]
    if name == "lora":
        return dict(lora_targets=lora_targets(family), pa_size=0, prompt_len=0, router=dict(kind="none"))
    router = dict(kind="swiglu") if name == "soft_moa" else dict(kind="swiglu", selection="threshold")
    return dict(lora_targets=attention_ffn, lora_rank=4, pa_size=8, prompt_len=4, router=router)


METHODS = ["soft_moa", "sparse_moa", "lora"]
# The default suite trains / reloads / decodes Soft MoA on every family and LoRA (routed experts
# included) on the MoE bases; the other (family, method) pairs of these checks are marked slow.
FAST = {(f, "soft_moa") for f in FAMILIES} | {(f, "lora") for f in MOE_FAMILIES}
# FSDP and compile (slow): Soft MoA on the dense families, LoRA with routed experts on the MoE bases.
SCALE = [(f, "lora" if f in MOE_FAMILIES else "soft_moa") for f in FAMILIES]


def matrix(fast: set[tuple[str, str]] | None = None, pairs: list | None = None) -> list:
    """(family, method) parameters with ids ``family-method``; those outside ``fast`` are marked slow."""
    pairs = pairs or [(f, n) for f in FAMILIES for n in METHODS]
    slow = () if fast is None else (pytest.mark.slow,)
    return [
        pytest.param(f, n, marks=() if fast is not None and (f, n) in fast else slow, id=f"{f}-{n}")
        for f, n in pairs
    ]


def no_pa(cfg: dict) -> dict:
    return {**cfg, "pa_size": 0}


# ---- identity at init ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("family", "name"), matrix(FAST))
def test_identity_at_init(family: str, name: str) -> None:
    base = family_model(family)
    with torch.no_grad():
        fast = base(IDS).logits
        if family in MOE_FAMILIES:  # LoRA'd experts run the eager per-expert loop: exact against it
            base.config._experts_implementation = "eager"
        reference = base(IDS).logits
    model = get_moa_model(base, no_pa(method(name, family)))  # B = 0 and prompt gates 0: exact
    with torch.no_grad():
        logits = model(IDS).logits
    assert torch.equal(logits, reference)
    torch.testing.assert_close(logits, fast, rtol=0, atol=1e-5)  # and the default grouped_mm experts
    if name != "lora":  # with the parallel adapter: near zero (Xavier gain 1e-4), not exactly
        model = get_moa_model(family_model(family), method(name, family))
        with torch.no_grad():
            assert 0 < (model(IDS).logits - reference).abs().max().item() < 1e-3


# ---- LoRA = merged weights, fused projections per slice ---------------------------------------------------
# Test-side description of each family's (fused) projections: site -> (module path, rows of its output).
def _rows(family: str, site: str, layer: torch.nn.Module) -> tuple[str, torch.Tensor]:
    hd, heads, kv = 16, 4, 2
    out = 192 if family == "gpt_neox" else 256 if family == "phi3" and site in ("gate", "up") else 0
    if family == "phi3" and site in ("q", "k", "v"):
        start = {"q": 0, "k": heads * hd, "v": heads * hd + kv * hd}[site]
        size = heads * hd if site == "q" else kv * hd
        return "self_attn.qkv_proj", torch.arange(start, start + size)
    if family == "phi3" and site in ("gate", "up"):
        half = out // 2
        return "mlp.gate_up_proj", torch.arange(half) + (half if site == "up" else 0)
    if family == "gpt_neox" and site in ("q", "k", "v"):
        part = "qkv".index(site)  # rows [head, (q, k, v), head_dim]
        return "attention.query_key_value", torch.arange(out).view(heads, 3, hd)[:, part].reshape(-1)
    if family == "gpt_neox":
        path = {"o": "attention.dense", "up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"}[site]
        return path, torch.arange(layer.get_submodule(path).out_features)
    attn = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
    path = f"self_attn.{attn[site]}" if site in attn else f"mlp.{site}_proj"
    return path, torch.arange(layer.get_submodule(path).out_features)


def _layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    inner = getattr(model, "model", None) or model.gpt_neox
    return inner.layers


@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_lora_equals_merged_weights(family: str) -> None:
    """A LoRA on a site (a slice of a fused projection included) is its weight delta on exactly those rows."""
    cfg = method("lora", family)
    model = get_moa_model(family_model(family), cfg)
    randomize_adapters(model, 0.2)
    merged = family_model(family)
    with torch.no_grad():
        for layer, moa_layer in zip(_layers(merged), _layers(model.base_model)):
            for site, expert in moa_layer.moa.lora.items():
                path, rows = _rows(family, site, layer)
                weight = layer.get_submodule(path).weight
                weight[rows] += expert.merged_weight()
        torch.testing.assert_close(model(IDS).logits, merged(IDS).logits, rtol=1e-5, atol=1e-5)


# ---- the prompt expert follows the family's attention ------------------------------------------------------
def _capture_attention(attn: torch.nn.Module, hidden: torch.Tensor) -> tuple:
    """Run the family's attention module on ``hidden`` and capture the query/key/value and keyword
    arguments it hands to its attention function (with identity rotary embeddings for the prompt)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    seen = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        seen.update(query=query, key=key, value=value, kwargs=kwargs)
        return torch.zeros_like(query).transpose(1, 2), None

    ALL_ATTENTION_FUNCTIONS.register("capture_test", capture)
    impl, attn.config._attn_implementation = attn.config._attn_implementation, "capture_test"
    try:
        rot = getattr(attn, "rotary_ndims", None) or 16
        ones = hidden.new_ones(1, hidden.shape[1], rot)
        attn(hidden_states=hidden, attention_mask=None, position_embeddings=(ones, torch.zeros_like(ones)))
    finally:
        attn.config._attn_implementation = impl
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_expert_equals_the_family_eager_attention_over_the_prompt(family: str) -> None:
    """The prompt expert of a layer = the family's own eager attention (its scale, soft-cap, k norm, fused
    k/v slices) of the layer's queries over the prompt's keys/values, times the per-head gate."""
    cfg = dict(lora_targets=[], prompt_len=5, pa_size=0, router=dict(kind="none"))  # no k/v LoRA hooks
    model = get_moa_model(family_model(family), cfg)
    randomize_adapters(model, 0.5)
    for layer in _layers(model.base_model):
        attn, moa = layer.get_submodule("attention" if family == "gpt_neox" else "self_attn"), layer.moa
        query = torch.randn(2, 4, 7, 16, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            got = moa.prompt_delta(attn, query)  # [B, T, heads, hd]
            prompt = _capture_attention(attn, moa.prompt.vectors[None])
            eager = sys.modules[type(attn).__module__].eager_attention_forward
            kwargs = {k: v for k, v in prompt["kwargs"].items() if k in ("scaling", "softcap", "dropout")}
            expected, _ = eager(attn, query, prompt["key"], prompt["value"], None, **kwargs)
            expected = expected * moa.prompt.head_gate[0][None, None, :, None]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ---- training, save / reload, decoding ---------------------------------------------------------------------
@pytest.mark.parametrize(("family", "name"), matrix(FAST))
def test_training_lowers_the_loss(family: str, name: str) -> None:
    model = get_moa_model(family_model(family), method(name, family)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(4):
        out = model(input_ids=IDS, labels=IDS)
        loss = out.loss + model.aux_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses


@pytest.mark.parametrize(("family", "name"), matrix(FAST))
def test_save_reload_gives_identical_logits(family: str, name: str, tmp_path) -> None:
    model = get_moa_model(family_model(family), method(name, family))
    randomize_adapters(model, 0.3)
    model.save_pretrained(tmp_path)
    again = MoAModel.from_pretrained(family_model(family), tmp_path)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, again(IDS).logits)


@pytest.mark.parametrize(("family", "name"), matrix(FAST))
def test_kv_cache_greedy_equals_full_forward(family: str, name: str) -> None:
    model = get_moa_model(family_model(family), method(name, family))
    randomize_adapters(model, 0.3)
    prompt = IDS[:1, :6]
    with torch.no_grad():
        generated = model.generate(
            prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None
        )
        logits = model(generated).logits
    assert torch.equal(logits[0, prompt.shape[1] - 1 : -1].argmax(-1), generated[0, prompt.shape[1] :])


# ---- MoE bases ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_routed_expert_lora_equals_merged_expert_weights(family: str) -> None:
    """LoRA on the routed experts = the base's own experts (its eager loop, its router) with each
    expert's weights plus that expert's B A."""
    model = get_moa_model(family_model(family), dict(method("lora", family), lora_targets=["experts"]))
    randomize_adapters(model, 0.2)
    merged = family_model(family)
    with torch.no_grad():
        for layer, moa_layer in zip(_layers(merged), _layers(model.base_model)):
            routed = moa_layer.moa.lora["experts"]
            layer.mlp.experts.gate_up_proj += routed.merged("gate_up")
            layer.mlp.experts.down_proj += routed.merged("down")
        torch.testing.assert_close(model(IDS).logits, merged(IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_base_router_aux_loss_is_intact_and_reported(family: str) -> None:
    base = family_model(family)
    with torch.no_grad():
        expected = base(IDS, labels=IDS)
    model = get_moa_model(base, method("soft_moa", family))
    with torch.no_grad():
        out = model(IDS, labels=IDS)
    assert out.aux_loss is not None and torch.equal(out.aux_loss, expected.aux_loss)
    assert torch.allclose(out.loss, expected.loss, atol=1e-3)  # the PA's near-zero init
    # reported beside moa_train's router losses; in aux_loss() only when the base did not add it itself
    assert torch.equal(model.aux_losses()["base_router"], expected.aux_loss)
    assert model.aux_loss().item() == pytest.approx(0.0)
    with torch.no_grad():
        model(IDS)  # no labels (how moa-train calls it): the base's coefficient applies here
    coef = base.config.router_aux_loss_coef
    assert model.aux_loss().item() == pytest.approx(coef * expected.aux_loss.item(), rel=1e-5)


# ---- what is not supported fails in one line -----------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "cfg", "message"),
    [
        ("gpt_neox", dict(lora_targets=["gate"]), "GPT-NeoX's MLP is not gated"),
        ("mixtral", dict(lora_targets=["down"]), "use lora target 'experts'"),
        ("llama", dict(lora_targets=["experts"]), "has no routed experts"),
        ("phi3", dict(lora_targets=[], ffn_experts=4, router=dict(kind="none")), "fused gate_up_proj"),
        ("gpt_neox", dict(lora_targets=[], ffn_experts=4, router=dict(kind="none")), "gated MLP"),
    ],
)
def test_unsupported_sites_fail_in_one_line(family: str, cfg: dict, message: str) -> None:
    with pytest.raises(MoATrainError, match=message) as err:
        get_moa_model(family_model(family), cfg)
    assert "\n" not in str(err.value)


def test_attention_sinks_refuse_the_prompt_expert_in_one_line() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gpt_oss", vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"], sliding_window=4,
    )  # fmt: skip
    with pytest.raises(MoATrainError, match="attention sinks") as err:
        get_moa_model(AutoModelForCausalLM.from_config(config), dict(lora_targets=[], prompt_len=4))
    assert "\n" not in str(err.value)
    # its attention sites and routed experts are fine
    model = get_moa_model(AutoModelForCausalLM.from_config(config), method("lora", "mixtral"))
    with torch.no_grad():
        model(IDS)


def test_a_model_without_decoder_layers_fails_in_one_line() -> None:
    class Tiny(torch.nn.Module):
        config = family_config("llama")

        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    with pytest.raises(MoATrainError, match="no list of decoder layers") as err:
        get_moa_model(Tiny(), dict(lora_targets=["q"]))
    assert "\n" not in str(err.value)


def test_routed_lora_runs_the_experts_on_their_tokens_only() -> None:
    """Experts no token is routed to get no gradient (the delta sits inside the base's expert loop)."""
    model = get_moa_model(family_model("qwen3_moe"), method("lora", "qwen3_moe")).train()
    randomize_adapters(model, 0.2)
    layer = _layers(model.base_model)[0]
    picked = []
    layer.mlp.gate.register_forward_hook(lambda module, args, out: picked.append(out[2]))
    model(input_ids=IDS[:1, :1], labels=IDS[:1, :1]).loss.backward()  # one token: top-2 of 4 experts
    hit = set(picked[0].flatten().tolist())
    assert len(hit) == 2
    for e, grad in enumerate(layer.moa.lora["experts"].gate_up_A.grad):
        assert (grad.abs().sum() > 0) == (e in hit), e


# ---- slow: FSDP (2 processes on CPU) and torch.compile -------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("family", "name"), matrix(pairs=SCALE))
def test_fsdp_two_processes_equal_one(family: str, name: str, tmp_path) -> None:
    """FSDP2 over 2 CPU processes (each runs half the batch): gathered gradients = one process."""
    import json
    import subprocess
    from pathlib import Path

    worker = Path(__file__).with_name("family_fsdp_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(worker), str(tmp_path), family, name], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["grads_compared"] > 0
        assert report["grad_gap"] < 1e-5, report


def _graph_breaks(model, ids: torch.Tensor) -> tuple[int, list[str]]:
    from moa_train.core.compile import DYNAMO_SETTINGS

    torch._dynamo.reset()
    with torch._dynamo.config.patch(DYNAMO_SETTINGS):
        report = torch._dynamo.explain(lambda: model(input_ids=ids, labels=ids, use_cache=False).loss)()
    return report.graph_break_count, [r.reason.strip().splitlines()[0] for r in report.break_reasons]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "name"), matrix(pairs=SCALE))
def test_compile_traces_without_graph_breaks_where_the_base_does(family: str, name: str) -> None:
    base_breaks, _ = _graph_breaks(family_model(family).train(), IDS)
    if base_breaks:
        pytest.skip(f"the {family} base itself has {base_breaks} graph breaks")
    model = get_moa_model(family_model(family), method(name, family)).train()
    breaks, reasons = _graph_breaks(model, IDS)
    assert breaks == 0, reasons


def test_unload_returns_the_untouched_base() -> None:
    for family in ("gpt_neox", "mixtral"):
        base = family_model(family)
        with torch.no_grad():
            reference = base(IDS).logits
        model = get_moa_model(base, dict(method("soft_moa", family), lora_targets=lora_targets(family)))
        randomize_adapters(model, 0.3)
        plain = model.unload()
        assert not any(".moa." in n for n, _ in plain.named_parameters())
        assert not plain.config._attn_implementation.startswith("moa_")
        with torch.no_grad():
            assert torch.equal(plain(IDS).logits, reference)


# ---- the real shapes: *_arch model configs, dry runs ----------------------------------------------------------
# One size per family; the base counts are the published parameter counts of these checkpoints.
ARCH = {
    "gemma2_2b_arch": 2_614_341_888,
    "gemma3_1b_arch": 999_885_952,
    "phi3_mini_arch": 3_821_079_552,
    "pythia_1_4b_arch": 1_414_647_808,
    "olmo2_1b_arch": 1_484_916_736,
    "granite3_2b_arch": 2_533_539_840,
    "smollm3_3b_arch": 3_075_098_624,
    "qwen3_30b_a3b_arch": 30_532_122_624,
    "mixtral_8x7b_arch": 46_702_792_704,
    "olmoe_1b_7b_arch": 6_919_161_856,
}


def _lora_count(arch: dict, targets: list[str], rank: int) -> int:
    """r (in + out) per LoRA site and layer, from the shapes alone (fused slices: the slice's rows)."""
    hidden, layers = arch["hidden_size"], arch["num_hidden_layers"]
    heads = arch["num_attention_heads"]
    kv = arch.get("num_key_value_heads") or heads
    hd = arch.get("head_dim") or hidden // heads
    inter = arch.get("moe_intermediate_size") or arch["intermediate_size"]
    experts = arch.get("num_experts") or arch.get("num_local_experts") or 0
    size = {
        "q": hidden + heads * hd,
        "k": hidden + kv * hd,
        "v": hidden + kv * hd,
        "o": heads * hd + hidden,
        "up": hidden + inter,
        "gate": hidden + inter,
        "down": inter + hidden,
        "experts": experts * ((hidden + 2 * inter) + (inter + hidden)),  # gate_up and down of each expert
    }
    return layers * rank * sum(size[t] for t in targets)


@pytest.mark.parametrize(
    "name",
    [  # the default suite: a fused-projection, a non-gated and an MoE base; the others are slow
        pytest.param(
            n,
            marks=()
            if n in ("phi3_mini_arch", "pythia_1_4b_arch", "qwen3_30b_a3b_arch")
            else pytest.mark.slow,
        )
        for n in sorted(ARCH)
    ],
)
def test_arch_configs_have_the_published_parameter_counts_and_dry_run_lora_counts(name: str, compose) -> None:
    from omegaconf import OmegaConf

    from moa_train.models.base import load_base_model
    from moa_train.train.recipe import dry_run

    cfg = compose([f"model={name}", "experts=lora_only", "router=none", "dry_run=true"])
    base, _ = load_base_model(cfg.model)
    assert sum(p.numel() for p in base.parameters()) == ARCH[name]
    assert {p.device.type for p in base.parameters()} == {"meta"}
    arch = OmegaConf.to_container(cfg.model.arch)
    targets = lora_targets(arch["model_type"])
    listed = "[" + ",".join(targets) + "]"
    cfg = compose(
        [f"model={name}", "experts=lora_only", "router=none", f"moa.lora_targets={listed}", "dry_run=true"]
    )
    assert dry_run(cfg)["trainable_params"] == _lora_count(arch, targets, int(cfg.moa.lora_rank))


@pytest.mark.slow
@pytest.mark.parametrize(("family", "name"), matrix(pairs=SCALE))
def test_4bit_base_trains(family: str, name: str) -> None:
    """An nf4 base (bitsandbytes, CPU backend; the MoE bases' 3-D experts stay unquantized) trains."""
    pytest.importorskip("bitsandbytes")
    from moa_train.models.base import _quantize_built, quantization_config

    quantized = _quantize_built(
        family_model(family),
        quantization_config({"quantization": "nf4"}, torch.float32),
        torch.float32,
        "eager",
    )
    assert any(type(m).__name__ == "Linear4bit" for m in quantized.modules())
    model = get_moa_model(quantized, method(name, family)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=IDS, labels=IDS).loss + model.aux_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
