"""moa-export: plain-LoRA checkpoints -> PEFT LoRA / merged model with equal logits; routed ones refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from moa_train import MoAConfig, get_moa_model
from moa_train.cli.export import export
from moa_train.cli.main import export_main as main
from moa_train.core.model import MoAModel
from moa_train.errors import MoATrainError
from moa_train.models.base import load_base_model
from tiny_models import char_tokenizer

ARCH = {
    "model_type": "llama",
    "vocab_size": 104,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
LORA = {"router": {"kind": "none"}, "pa_size": 0, "prompt_len": 0, "lora_rank": 4, "lora_alpha": 8}
CONFIGS = {
    "lora": LORA,  # the LoRA baseline
    "moslora": {**LORA, "lora_mixer": True, "lora_targets": ["q", "v", "up", "down"]},
    "rank_pattern": {**LORA, "lora_rank_pattern": {"down": 2}, "lora_layers": [1]},
}
IDS = torch.tensor([[5, 17, 40, 41, 60, 9, 33], [0, 0, 7, 8, 9, 10, 11]])
MASK = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])


def make_checkpoint(root: Path, config: dict[str, Any]) -> tuple[Path, dict[str, Any], MoAModel]:
    tok_dir = root / "tokenizer"
    char_tokenizer().save_pretrained(tok_dir)
    node = {"name": "tiny_char", "source": "tiny_random", "arch": ARCH, "tokenizer": str(tok_dir)}
    node |= {"dtype": "float32", "init_seed": 0}
    base, _ = load_base_model(node)
    model = get_moa_model(base, MoAConfig.from_dict(config))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1)
        for param in model.adapter_state_dict().values():
            param.normal_(0.0, 0.3)  # fresh B = 0 would make every export trivially equal
    ckpt = root / "run" / "final"
    model.save_pretrained(ckpt, extra_config={"model": node})
    return ckpt, node, model.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_peft_and_merged_exports_give_the_same_logits(tmp_path: Path, variant: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt, node, model = make_checkpoint(tmp_path, CONFIGS[variant])
    expected = logits(model)
    with model.disable_adapters():
        assert not torch.allclose(logits(model), expected, atol=1e-3)  # the adapters matter

    export(ckpt.parent, "peft", tmp_path / "peft")  # a run dir: -> final/
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp_path / "peft").iterdir()
    }
    peft_model = PeftModel.from_pretrained(load_base_model(node)[0], tmp_path / "peft").eval()
    torch.testing.assert_close(logits(peft_model), expected, atol=1e-5, rtol=1e-5)

    export(ckpt, "merged", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n or ".moa." in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({}, "block router"),  # the Soft MoA default: token-level gates
        ({**LORA, "router": {"kind": "swiglu", "granularity": "instance"}}, "per input"),
        ({**LORA, "prompt_len": 3}, "prompt experts"),
        ({**LORA, "pa_size": 8}, "parallel adapters"),
        ({**LORA, "lora_experts": 2}, "per-token router"),
    ],
)
def test_routed_configurations_are_refused_with_the_alternative(
    tmp_path: Path, config: dict, reason: str
) -> None:
    ckpt, _, _ = make_checkpoint(tmp_path, config)
    with pytest.raises(MoATrainError, match=reason) as info:
        export(ckpt, "merged", tmp_path / "out")
    assert "moa-eval" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_bad_inputs_get_one_error_line_and_nothing_is_overwritten(tmp_path: Path, capsys: Any) -> None:
    ckpt, _, _ = make_checkpoint(tmp_path, LORA)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    cases = {
        "checkpoint not found": [f"checkpoint={tmp_path / 'nope'}", "format=peft", f"out={tmp_path / 'a'}"],
        "format='gguf' is not known": [f"checkpoint={ckpt}", "format=gguf", f"out={tmp_path / 'b'}"],
        "already exists and is not empty": [f"checkpoint={ckpt}", "format=merged", f"out={taken}"],
        "needs out=...": [f"checkpoint={ckpt}", "format=peft"],
        "unknown config key 'bogus'": [
            f"checkpoint={ckpt}",
            "format=peft",
            f"out={tmp_path / 'c'}",
            "bogus=1",
        ],
        "did you mean format?": [f"checkpoint={ckpt}", "formt=peft", f"out={tmp_path / 'd'}"],
    }
    for expected, argv in cases.items():
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], (expected, err)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"] and (taken / "keep.txt").read_text() == "mine"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left behind
    with pytest.raises(SystemExit) as exited:  # Hydra's --help exits 0 after printing
        main(["--help"])
    assert exited.value.code in (0, None) and "format=peft|merged" in capsys.readouterr().out
