"""save_pretrained -> from_pretrained into a fresh base reproduces the logits; files hold adapters only."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from core_helpers import randomize_adapters
from moa_train import MoAConfig, MoAModel, MoATrainError, RouterConfig, get_moa_model
from tiny_models import tiny_model

IDS = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(8))
CONFIGS = {
    "soft": MoAConfig(),
    "sparse": MoAConfig(prompt_len=0, router=RouterConfig(kind="swiglu", selection="threshold")),
    "molora": MoAConfig(pa_size=0, prompt_len=0, lora_experts=4, router=RouterConfig(kind="none")),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_save_load_roundtrip(tmp_path, name: str) -> None:
    model = get_moa_model(tiny_model(seed=0), CONFIGS[name])
    randomize_adapters(model, 0.3)
    with torch.no_grad():
        expected = model(IDS).logits
    model.save_pretrained(tmp_path, extra_config={"model": {"name": "tiny"}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors and all(".moa." in k for k in tensors)  # no base weight in the file
    assert sum(t.numel() for t in tensors.values()) == model.num_trainable_parameters()
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["model"] == {"name": "tiny"} and config["moa_config"]["lora_rank"] == 8
    loaded = MoAModel.from_pretrained(tiny_model(seed=0), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, expected)


def test_loading_into_a_mismatched_base_is_a_one_line_error(tmp_path) -> None:
    model = get_moa_model(tiny_model(), MoAConfig())
    model.save_pretrained(tmp_path)
    wider = tiny_model(layers=3)
    with pytest.raises(MoATrainError, match="does not fit this model") as info:
        MoAModel.from_pretrained(wider, tmp_path)
    assert "\n" not in str(info.value)
    with pytest.raises(MoATrainError, match="no adapter_config.json"):
        MoAModel.from_pretrained(tiny_model(), tmp_path / "missing")
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(MoATrainError, match="not valid JSON"):
        MoAModel.from_pretrained(tiny_model(), tmp_path)
