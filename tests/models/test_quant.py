"""model.quantization=nf4|fp4|int8: a frozen bitsandbytes base (CPU backend), fp32 adapters, every expert.

Default suite: the prompt expert's keys/values through the quantized k/v projections against a plain
torch reference on the dequantized weights, and a short nf4 run of every expert type. Slow: ~30 steps
on a 4-bit base (loss falls), save, reload with identical logits, and `moa-eval checkpoint=`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import TINY, run_cli, train_in_process

pytest.importorskip("bitsandbytes")

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# LoRA on q,k,v,o,down + parallel adapter + prompt under the Soft MoA router: every expert type
EVERY_EXPERT = ["experts=all", "router=soft_swiglu"]


def _tiny(quantization: str | None) -> tuple[torch.nn.Module, object]:
    from moa_train.models.base import load_base_model, place_base

    cfg = OmegaConf.load(CONFIGS / "model" / "tiny_random.yaml")
    cfg.quantization = quantization
    base, tokenizer = load_base_model(cfg)
    place_base(base, torch.device("cpu"), torch.float32)
    return base, tokenizer


def _dequantized(linear: torch.nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    weight = linear.weight
    if type(weight).__name__ == "Params4bit":
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    return (weight.float() * linear.state.SCB.float()[:, None] / 127.0).float()  # int8 row-wise


@pytest.mark.parametrize("quantization", ["nf4", "fp4", "int8"])
def test_prompt_keys_values_come_from_the_quantized_projections(quantization: str) -> None:
    from moa_train.core.experts.prompt import PromptExpert
    from moa_train.core.families import AttentionView

    base, _ = _tiny(quantization)
    attn = base.model.layers[0].self_attn
    assert type(attn.k_proj).__name__ in ("Linear4bit", "Linear8bitLt")
    heads, head_dim = (
        base.config.num_attention_heads,
        base.config.hidden_size // base.config.num_attention_heads,
    )
    prompt = PromptExpert(base.config.hidden_size, heads, length=5)
    view = AttentionView(attn, (attn.k_proj, None), (attn.v_proj, None), head_dim)
    keys_t, values = prompt._keys_values(view, heads, head_dim, torch.float32)
    # reference: plain F.linear on the dequantized weights, repeated over the kv groups
    groups = heads // base.config.num_key_value_heads
    ref_k = F.linear(prompt.vectors, _dequantized(attn.k_proj)).unflatten(-1, (-1, head_dim))
    ref_v = F.linear(prompt.vectors, _dequantized(attn.v_proj)).unflatten(-1, (-1, head_dim))
    ref_k = (ref_k.repeat_interleave(groups, dim=1).permute(1, 2, 0) * attn.scaling).float()
    ref_v = ref_v.repeat_interleave(groups, dim=1).permute(1, 0, 2).float()
    tolerance = 1e-4 if quantization != "int8" else 0.05  # int8 matmul quantizes the input rows too
    torch.testing.assert_close(keys_t, ref_k, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(values, ref_v, rtol=tolerance, atol=tolerance)


def test_nf4_base_trains_every_expert_and_records_its_quantization(tmp_path: Path) -> None:
    args = [*TINY, *EVERY_EXPERT, "model.quantization=nf4", "final_eval.enabled=false", "trainer.max_steps=2"]
    summary = train_in_process(tmp_path / "run", args)
    assert summary["status"] == "completed"
    from safetensors.torch import load_file

    names = list(load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors")))
    for kind in (".moa.lora.", ".moa.pa.", ".moa.prompt.", ".moa.router."):
        assert any(kind in n for n in names), f"no {kind} tensors saved"
    saved = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert saved["model"]["quantization"] == "nf4"  # moa-eval checkpoint= rebuilds this base


@pytest.mark.slow
def test_4bit_base_learns_saves_reloads_and_evaluates(tmp_path: Path) -> None:
    from moa_train import MoAConfig, get_moa_model
    from moa_train.core.model import MoAModel
    from moa_train.train.loggers import read_metrics

    # ~30 steps with every expert type on a 4-bit base: the loss falls
    args = [
        *TINY, *EVERY_EXPERT, "model.quantization=nf4", "final_eval.enabled=false", "trainer.max_steps=30",
        "trainer.log_every_steps=5", "optimizer.lr=1e-2",
    ]  # fmt: skip
    run = tmp_path / "run"
    train_in_process(run, args)
    losses = [r["train/loss"] for r in read_metrics(run) if "train/loss" in r]
    assert len(losses) >= 5 and losses[-1] < losses[0] - 0.05, losses

    # the trained adapters load onto a fresh 4-bit base
    MoAModel.from_pretrained(_tiny("nf4")[0], run / "final")
    # reload: a fresh 4-bit base + saved (non-zero) adapters give the saved model's logits exactly
    torch.manual_seed(0)
    base, _ = _tiny("nf4")
    moa = OmegaConf.to_container(OmegaConf.load(run / "config.yaml").moa, resolve=True)
    model = get_moa_model(base, MoAConfig.from_dict(moa))
    with torch.no_grad():
        for p in model.adapter_state_dict().values():
            p.normal_(0, 0.02)
    model.save_pretrained(tmp_path / "saved")
    ids = torch.tensor([[1, 20, 300, 4000, 17, 9]])
    expected = model(input_ids=ids).logits
    again, _ = _tiny("nf4")
    reloaded = MoAModel.from_pretrained(again, tmp_path / "saved")
    assert torch.equal(reloaded(input_ids=ids).logits, expected)

    # moa-eval rebuilds the recorded 4-bit base from the checkpoint
    result = run_cli(
        "moa-eval", f"checkpoint={run / 'final'}", "eval=heldout", "eval.limit=4", f"output_dir={tmp_path / 'eval'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["model"]["quantization"] == "nf4" and results["n"] == 4
    # an override changes the rebuilt base
    plain = run_cli(
        "moa-eval", f"checkpoint={run / 'final'}", "eval=heldout", "eval.limit=4", "model.quantization=null",
        f"output_dir={tmp_path / 'plain'}", cwd=tmp_path,
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert json.loads((tmp_path / "plain" / "results.json").read_text())["model"]["quantization"] is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.quantization=q3"], "model.quantization='q3' is not known"),
        (["model.quantization=4"], "model.quantization=4 is not known"),
        (["model=llama3_1_8b_arch", "model.quantization=nf4"], "model.meta_device=false"),
    ],
)
def test_bad_quantization_values_fail_before_loading(compose, overrides: list[str], message: str) -> None:
    import re

    from moa_train.cli.validate import validate
    from moa_train.errors import MoATrainError

    with pytest.raises(MoATrainError, match=re.escape(message)):
        validate(compose([*TINY, *overrides]), "train")
