"""moa_train.eval: batched generation, scoring, router analysis, moa-eval outputs and errors.

Tiny random Llama models and a character-level tokenizer keep every test on CPU in seconds; the
real LLM-Adapters test files (20-record slices in tests/fixtures/llm_adapters) run through the whole pipeline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from moa_train import MoAConfig, get_moa_model
from moa_train.data.answers import rule_for
from moa_train.errors import MoATrainError
from moa_train.eval import (
    DecodingConfig,
    evaluate_records,
    generate,
    load_eval_records,
    load_llm_adapters_file,
    markdown_table,
    resolve_checkpoint,
    run_from_config,
)
from moa_train.eval.router_analysis import processed_sequences
from moa_train.eval.scoring import resolve_max_new_tokens
from tiny_models import CHARS, char_tokenizer

REPO = Path(__file__).resolve().parents[2]
# 20-record slices of every LLM-Adapters test file (origin: tests/fixtures/llm_adapters/README.md)
LLM_ADAPTERS = REPO / "tests" / "fixtures" / "llm_adapters"
# -- tiny models -------------------------------------------------------------------------------------------


ARCH = {
    "model_type": "llama",
    "vocab_size": len(CHARS) + 4,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tiny_llama(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in {**ARCH, **overrides}.items() if k != "model_type"}
    config = AutoConfig.for_model("llama", **fields)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def randomise_adapters(model: torch.nn.Module, seed: int = 1, std: float = 0.3) -> None:
    """Fresh adapters are (near) no-ops; random values make every expert and gate matter."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for param in model.adapter_state_dict().values():
            param.normal_(0.0, std)


def moa_config(variant: str) -> MoAConfig:
    if variant == "sparse":
        router = {"kind": "swiglu", "selection": "threshold", "max_threshold": 0.5}
        return MoAConfig(lora_rank=4, pa_size=8, prompt_len=0, router=router)
    return MoAConfig(lora_rank=4, pa_size=8, prompt_len=3, router={"kind": "swiglu"})


def tiny_moa(variant: str = "soft", seed: int = 0) -> torch.nn.Module:
    model = get_moa_model(tiny_llama(seed), moa_config(variant))
    randomise_adapters(model)
    return model.eval()


def records_of(n: int, dataset: str = "toy", answer: str = "1") -> list[dict[str, Any]]:
    """Prompts of clearly different lengths, so batches need real left padding."""
    return [
        {
            "instruction": f"Add {i} and " + "x" * (7 * i % 23),
            "input": "",
            "answer": answer,
            "dataset": dataset,
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tok() -> Any:
    return char_tokenizer()


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the spin-waits of
    two threads make each forward ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- batched generation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "soft", "sparse"])
def test_batched_greedy_equals_unbatched(tok: Any, kind: str) -> None:
    model = tiny_llama() if kind == "plain" else tiny_moa(kind)
    records = records_of(7)
    greedy = DecodingConfig.from_any("greedy")
    one = generate(model, tok, records, decoding=greedy, batch_size=1, max_new_tokens=12)
    many = generate(model, tok, records, decoding=greedy, batch_size=4, max_new_tokens=12)
    assert len({len(p) for p in one.prompt_ids}) > 3  # the batch really mixes lengths
    assert many.generated_ids == one.generated_ids
    assert many.texts == one.texts
    assert all(len(g) == 12 for g in one.generated_ids)  # a random model never says EOS here


def test_generation_stops_at_eos_and_counts_tokens(tok: Any) -> None:
    model = tiny_llama()
    with torch.no_grad():  # make EOS the most likely next token everywhere
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
        model.lm_head.bias[tok.eos_token_id] = 1e4
    out = generate(model, tok, records_of(3), decoding=DecodingConfig(), batch_size=2, max_new_tokens=9)
    assert out.generated_ids == [[tok.eos_token_id]] * 3
    assert out.texts == [""] * 3
    stats = out.throughput.as_dict()
    assert stats["generated_tokens"] == 3 and stats["decode_tokens"] == 0
    assert stats["prefill_tokens"] == sum(len(p) for p in out.prompt_ids)


def test_decoding_presets_load_and_run(tok: Any) -> None:
    paper = DecodingConfig.from_any("paper")
    assert (paper.do_sample, paper.temperature, paper.top_p, paper.top_k, paper.seed) == (
        True,
        0.1,
        0.75,
        0,
        1,
    )
    assert DecodingConfig.from_any("llm_adapters").num_beams == 4
    assert DecodingConfig.from_any(None) == DecodingConfig.from_any("greedy") == DecodingConfig()
    model = tiny_llama()
    records = records_of(4)
    first = generate(model, tok, records, decoding=paper, batch_size=2, max_new_tokens=6)
    again = generate(model, tok, records, decoding=paper, batch_size=2, max_new_tokens=6)
    assert first.generated_ids == again.generated_ids  # the fixed seed makes sampling reproducible
    beams = generate(
        model, tok, records, decoding=DecodingConfig.from_any("llm_adapters"), batch_size=2, max_new_tokens=6
    )
    assert all(1 <= len(g) <= 6 for g in beams.generated_ids)
    with pytest.raises(MoATrainError, match="decoding preset 'fast' not found"):
        DecodingConfig.from_any("fast")
    with pytest.raises(MoATrainError, match="unknown decoding field"):
        DecodingConfig.from_any({"beams": 2})


# -- scoring --------------------------------------------------------------------------------------------------


class ScriptedLM(torch.nn.Module):
    """A 'model' whose generate() writes a scripted reply per prompt: tests scoring and ordering exactly."""

    def __init__(self, tokenizer: Any, replies: dict[str, str]) -> None:
        super().__init__()
        self.tokenizer, self.replies = tokenizer, replies
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.batches: list[int] = []

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, **kw: Any):
        self.batches.append(input_ids.shape[0])
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tokenizer.decode(ids[mask.bool()].tolist())
            key = next(k for k in self.replies if f"Instruction:\n{k}\n" in prompt)
            reply = self.tokenizer(self.replies[key], add_special_tokens=False)["input_ids"][:max_new_tokens]
            rows.append(reply + [self.tokenizer.eos_token_id] + [0] * (max_new_tokens - len(reply)))
        width = max(len(r) for r in rows)
        new = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], 1)


def test_evaluate_records_scores_each_record_in_input_order(tok: Any) -> None:
    records = [
        {"instruction": "q1 long long long", "answer": "true", "dataset": "boolq"},
        {"instruction": "q2", "answer": "false", "dataset": "boolq"},
        {"instruction": "q3 medium", "answer": "12", "dataset": "gsm8k"},
        {"instruction": "q4", "answer": "-3.5", "dataset": "gsm8k"},
        {"instruction": "q5 a bit longer", "answer": "C", "dataset": "AQuA"},
        {"instruction": "q6", "answer": "B", "dataset": "AQuA"},
    ]
    replies = {
        "q1 long long long": "the correct answer is true",
        "q2": "true, I think",  # wrong
        "q3 medium": "3 * 4 = 12",
        "q4": "it is -3.5000",
        "q5 a bit longer": "(C) because",
        "q6": "Answer: (B)",  # faithful rule reads the A of "Answer" -> wrong
    }
    model = ScriptedLM(tok, replies)
    result = evaluate_records(model, tok, records, decoding="greedy", batch_size=2)
    assert [p["correct"] for p in result["predictions"]] == [True, False, True, True, True, False]
    assert [p["extracted"] for p in result["predictions"]] == ["true", "true", 12.0, -3.5, "C", "A"]
    assert result["datasets"]["boolq"] == {
        **result["datasets"]["boolq"],
        "accuracy": 0.5,
        "n": 2,
        "correct": 1,
    }
    assert result["datasets"]["gsm8k"]["accuracy"] == 1.0
    assert result["datasets"]["AQuA"]["accuracy"] == 0.5
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["mean_accuracy"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert [result["datasets"][d]["max_new_tokens"] for d in ("boolq", "gsm8k", "AQuA")] == [32, 256, 256]
    assert model.batches == [2, 2, 2]  # one generate call per dataset batch, never mixing datasets
    strict = evaluate_records(model, tok, records, batch_size=4, letter_rule="final")
    assert strict["predictions"][5]["correct"] is True
    assert "router" not in result  # a plain model has no router statistics


def test_max_new_tokens_budget() -> None:
    label, numeric = rule_for("boolq"), rule_for("gsm8k")
    assert resolve_max_new_tokens("boolq", label, [], None) == 32
    assert resolve_max_new_tokens("gsm8k", numeric, [], None) == 256
    assert resolve_max_new_tokens("arithmetic_2_digit_addition", rule_for("x", "numeric"), [], None) == 16
    assert resolve_max_new_tokens("gsm8k", numeric, [], None, {"math": 512}) == 256  # capped
    assert resolve_max_new_tokens("gsm8k", numeric, [], None, {"math": 512}, cap=None) == 512
    assert resolve_max_new_tokens("gsm8k", numeric, [], 7) == 7
    assert resolve_max_new_tokens("gsm8k", numeric, [], {"gsm8k": 9, "boolq": 3}) == 9
    assert resolve_max_new_tokens("gsm8k", numeric, [{"eval_max_new_tokens": 20}], None) == 20
    with pytest.raises(MoATrainError, match=">= 1"):
        resolve_max_new_tokens("gsm8k", numeric, [], 0)


# -- router analysis ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["soft", "sparse"])
def test_router_analysis_counts_real_tokens_and_ignores_padding(tok: Any, variant: str) -> None:
    model = tiny_moa(variant)
    model.set_telemetry(False)  # as the trainer leaves it: the analysis pass must still collect
    records = records_of(5)
    one = evaluate_records(
        model, tok, records, batch_size=1, max_new_tokens=6, collect_router=True, router_case=2
    )
    many = evaluate_records(
        model, tok, records, batch_size=5, max_new_tokens=6, collect_router=True, router_case=2
    )
    stats, stats_b = one["router"]["toy"], many["router"]["toy"]
    n_prompt = sum(len(tok(_prompt(r))["input_ids"]) for r in records)
    assert stats["processed_tokens"] == stats["tokens"] == stats_b["tokens"]
    assert model._state.collect_stats is False  # the caller's telemetry setting is restored
    # every prompt token plus every generated token but the last (which is never fed back)
    assert stats["tokens"] == n_prompt + len(records) * (6 - 1)
    assert len(stats["mean_gate"]) == 2 and len(stats["mean_gate"][0]) == len(stats["experts"])
    for key in ("mean_gate", "active_frac"):  # padding in the batched pass changes nothing
        assert torch.allclose(torch.tensor(stats[key]), torch.tensor(stats_b[key]), atol=1e-5)
    assert stats["inter_expert_std"] == pytest.approx(stats_b["inter_expert_std"], abs=1e-5)
    assert 0.0 < stats["inter_expert_std"] < 0.5
    if variant == "sparse":
        assert stats["mean_threshold"] is not None
        assert any(f < 1.0 for row in stats["active_frac"] for f in row)  # some experts are switched off
    else:
        assert all(f == 1.0 for row in stats["active_frac"] for f in row)  # sigmoid gates are never 0
    cases = one["router_cases"]
    assert [c["index"] for c in cases] == [0, 1]
    for case, other in zip(cases, many["router_cases"]):
        assert case["tokens"] == other["tokens"]
        assert torch.allclose(torch.tensor(case["gates"]), torch.tensor(other["gates"]), atol=1e-4)
    gates = torch.tensor(cases[0]["gates"])  # [layers, tokens, experts]
    assert gates.shape == (2, len(cases[0]["tokens"]), len(stats["experts"]))
    # the inter-expert std of example 0 recomputed from its saved per-token gate vectors
    per_token = gates.std(-1, unbiased=False).mean()
    assert one["router_cases"][0]["prompt_tokens"] == len(tok(_prompt(records[0]))["input_ids"])
    assert per_token.item() > 0


def _prompt(record: dict[str, Any]) -> str:
    from moa_train.data.template import build_prompt

    return build_prompt(record["instruction"], record.get("input"))


def test_router_gates_match_generation_gates(tok: Any) -> None:
    """The teacher-forced analysis pass sees the same gates as the KV-cached generation did."""
    model = tiny_moa("soft")
    record = records_of(2)[1]
    out = generate(model, tok, [record], decoding=DecodingConfig(), batch_size=1, max_new_tokens=5)
    with torch.no_grad(), model.capture_gates() as during:
        ids = torch.tensor([out.prompt_ids[0]])
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    result = evaluate_records(model, tok, [record], max_new_tokens=5, router_case=1)
    case = torch.tensor(result["router_cases"][0]["gates"])  # [L, T, E]
    layers = case.shape[0]
    prefill = torch.stack([g[0] for g in during[:layers]])  # [L, T_prompt, E]
    assert torch.allclose(case[:, : prefill.shape[1]], prefill, atol=1e-4)
    step1 = torch.stack([g[0, 0] for g in during[layers : 2 * layers]])  # first decoding step, per layer
    assert torch.allclose(case[:, prefill.shape[1]], step1, atol=1e-4)


# -- data files ------------------------------------------------------------------------------------------------


def _write(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_llm_adapters_file_and_missing_fields(tmp_path: Path) -> None:
    good = _write(
        tmp_path / "boolq" / "test.json",
        [{"instruction": "q", "input": "", "output": "o", "answer": "true"}] * 3,
    )
    records = load_llm_adapters_file(good, limit=2)
    assert len(records) == 2 and records[0]["dataset"] == "boolq"
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text('{"instruction": "a", "answer": "1"}\n{"instruction": "b", "answer": "2"}\n')
    assert [r["dataset"] for r in load_llm_adapters_file(jsonl)] == ["mine", "mine"]
    bad = _write(
        tmp_path / "bad.json", [{"instruction": "q", "answer": "1"}, {"instruction": "q2", "output": "x"}]
    )
    with pytest.raises(MoATrainError, match=r"bad.json: record 1 has no 'answer' field"):
        load_llm_adapters_file(bad)
    with pytest.raises(MoATrainError, match="not found"):
        load_llm_adapters_file(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(MoATrainError, match="not valid JSON"):
        load_llm_adapters_file(tmp_path / "broken.json")


def test_preset_records_from_data_dir_and_files(tmp_path: Path) -> None:
    item = {"instruction": "q", "input": "", "output": "", "answer": "4"}
    _write(tmp_path / "AddSub" / "test.json", [item] * 5)
    _write(tmp_path / "gsm8k" / "test.json", [item] * 5)
    cfg = {"name": "math", "data_dir": str(tmp_path), "datasets": ["AddSub", "gsm8k"], "limit": 3}
    assert [r["dataset"] for r in load_eval_records(cfg)] == ["AddSub"] * 3 + ["gsm8k"] * 3
    with pytest.raises(MoATrainError, match="SVAMP/test.json"):
        load_eval_records({**cfg, "datasets": ["SVAMP"]})
    assert len(load_eval_records({**cfg, "datasets": ["AddSub", "SVAMP"], "skip_missing": True})) == 3
    with pytest.raises(MoATrainError, match="eval.data_dir"):
        load_eval_records({"name": "math6", "data_dir": None, "datasets": ["AddSub"]})
    named = load_eval_records({"files": [{"path": str(tmp_path / "AddSub" / "test.json"), "name": "mine"}]})
    assert {r["dataset"] for r in named} == {"mine"}


# -- moa-eval end to end -----------------------------------------------------------------------------------------


def model_node(tok_dir: Path, **arch: Any) -> dict[str, Any]:
    return {
        "name": "tiny_char",
        "source": "tiny_random",
        "arch": {**ARCH, **arch},
        "tokenizer": str(tok_dir),
        "dtype": "float32",
        "init_seed": 0,
    }


def make_checkpoint(root: Path, tok: Any, variant: str = "soft") -> tuple[Path, dict[str, Any]]:
    """A trained-looking checkpoint: random adapters on the tiny_random base its config names."""
    from moa_train.models.base import load_base_model

    tok_dir = root / "tokenizer"
    tok.save_pretrained(tok_dir)
    node = model_node(tok_dir)
    base, _ = load_base_model(node)
    model = get_moa_model(base, moa_config(variant))
    randomise_adapters(model)
    ckpt = root / "run" / "final"
    model.save_pretrained(ckpt, extra_config={"model": node})
    return ckpt, node


def eval_cfg(tmp_path: Path, **top: Any) -> Any:
    """The composed moa-eval config for a custom preset (what `moa-eval eval=custom ...` builds)."""
    preset = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "eval" / "custom.yaml"))
    base = OmegaConf.load(REPO / "configs" / "eval.yaml")
    base.pop("defaults")
    base.pop("hydra")
    cfg = OmegaConf.merge(
        base,
        {
            "model": {"name": "unused", "source": "hub", "name_or_path": "/nonexistent"},
            "eval": preset,
            "decoding": OmegaConf.load(REPO / "configs" / "decoding" / "greedy.yaml"),
            "logger": {"name": "none"},
        },
    )
    return OmegaConf.merge(cfg, top)


def toy_files(tmp_path: Path) -> list[str]:
    boolq = [
        {
            "instruction": f"Is {i} even? Answer format: true/false",
            "input": "",
            "output": "",
            "answer": "true",
        }
        for i in range(5)
    ]
    math_ = [
        {"instruction": f"What is {i} + {i}?", "input": "", "output": "", "answer": str(2 * i)}
        for i in range(4)
    ]
    return [
        str(_write(tmp_path / "data" / "boolq" / "test.json", boolq)),
        str(_write(tmp_path / "data" / "gsm8k" / "test.json", math_)),
    ]


def test_moa_eval_writes_results_predictions_router_files(tmp_path: Path, tok: Any, capsys: Any) -> None:
    ckpt, node = make_checkpoint(tmp_path, tok)
    files = toy_files(tmp_path)
    cfg = eval_cfg(
        tmp_path,
        checkpoint=str(ckpt.parent),
        eval={"files": files},
        batch_size=3,
        max_new_tokens=5,
        router_case=2,
    )
    results = run_from_config(cfg)
    out = Path(results["output_dir"])
    assert out == ckpt / "eval" / "custom"  # run dir -> final/, results next to the checkpoint
    saved = json.loads((out / "results.json").read_text())
    assert saved["schema_version"] == 1 and saved["backend"] == "generate"
    assert (
        saved["checkpoint"] == str(ckpt) and saved["model"]["name"] == "tiny_char"
    )  # base from the checkpoint
    assert set(saved["datasets"]) == {"boolq", "gsm8k"}
    for row in saved["datasets"].values():
        assert {"accuracy", "n", "correct", "answer_type", "max_new_tokens", "throughput"} <= set(row)
        assert row["max_new_tokens"] == 5
    assert saved["mean_accuracy"] == pytest.approx(sum(r["accuracy"] for r in saved["datasets"].values()) / 2)
    tp = saved["throughput"]
    for key in (
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "seconds_per_example",
        "decode_seconds_per_example",
    ):
        assert tp[key] > 0
    assert tp["examples"] == saved["n"] == 9
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 9
    assert set(preds[0]) >= {"instruction", "input", "generation", "extracted", "gold", "correct"}
    assert sum(p["correct"] for p in preds) == saved["correct"]
    router = json.loads((out / "router_stats.json").read_text())
    assert set(router) == {"boolq", "gsm8k"} and router["boolq"]["tokens"] > 0
    for name in ("boolq", "gsm8k"):
        png = out / saved["files"]["heatmaps"][name]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    cases = json.loads((out / "router_cases.json").read_text())
    assert len(cases["cases"]) == 2 and cases["experts"] == router["boolq"]["experts"]
    printed = capsys.readouterr().out
    assert "| boolq | 5 |" in printed and "**mean**" in printed
    assert (out / "eval_config.yaml").is_file()


def test_moa_eval_base_model_alone_and_model_override(tmp_path: Path, tok: Any) -> None:
    ckpt, node = make_checkpoint(tmp_path, tok)
    files = toy_files(tmp_path)[:1]
    out_dir = tmp_path / "base_eval"
    cfg = eval_cfg(
        tmp_path, model=node, checkpoint=None, output_dir=str(out_dir), eval={"files": files, "limit": 2}
    )
    results = run_from_config(cfg)
    assert results["checkpoint"] is None and results["n"] == 2
    assert (out_dir / "results.json").is_file() and not (out_dir / "router_stats.json").exists()
    # an explicit model= wins over the checkpoint's record: a wider base does not fit the adapters
    wide = model_node(Path(node["tokenizer"]), hidden_size=48)
    cfg = eval_cfg(tmp_path, model=wide, checkpoint=str(ckpt), eval={"files": files})
    cfg.hydra = {"overrides": {"task": ["model=tiny_wide", f"checkpoint={ckpt}"]}}
    with pytest.raises(MoATrainError, match="does not fit"):
        run_from_config(cfg)
    # ... while model.* field overrides apply on top of the checkpoint's own base model
    cfg.hydra = {"overrides": {"task": ["model.dtype=float32"]}}
    cfg.output_dir = str(tmp_path / "ok")
    assert run_from_config(cfg)["model"]["arch"]["hidden_size"] == ARCH["hidden_size"]


def test_moa_eval_errors_are_one_line(tmp_path: Path, tok: Any) -> None:
    files = toy_files(tmp_path)
    with pytest.raises(MoATrainError, match="checkpoint not found"):
        run_from_config(eval_cfg(tmp_path, checkpoint=str(tmp_path / "missing"), eval={"files": files}))
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(MoATrainError, match="not a checkpoint"):
        run_from_config(eval_cfg(tmp_path, checkpoint=str(tmp_path / "empty_run"), eval={"files": files}))
    ckpt, node = make_checkpoint(tmp_path, tok)
    bad = _write(tmp_path / "bad" / "test.json", [{"instruction": "q"}])
    with pytest.raises(MoATrainError, match="has no 'answer' field") as info:
        run_from_config(eval_cfg(tmp_path, checkpoint=str(ckpt), eval={"files": [str(bad)]}))
    assert "\n" not in str(info.value)


def test_resolve_checkpoint_prefers_final_then_newest_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (5, 40, 100):
        _write(run / "checkpoints" / f"step-{step}" / "adapter_config.json", {})
    (run / "checkpoints" / "step-200").mkdir()  # incomplete: no adapter_config.json
    assert resolve_checkpoint(run) == run / "checkpoints" / "step-100"
    _write(run / "final" / "adapter_config.json", {})
    assert resolve_checkpoint(run) == run / "final"
    assert resolve_checkpoint(run / "checkpoints" / "step-5") == run / "checkpoints" / "step-5"


def test_wandb_logging_is_offline_safe(tmp_path: Path, tok: Any, monkeypatch: Any) -> None:
    import wandb

    from moa_train.eval.outputs import log_to_wandb

    results = {
        "eval": "custom",
        "datasets": {"boolq": {"n": 2, "accuracy": 0.5}},
        "mean_accuracy": 0.5,
        "files": {},
    }
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_id = log_to_wandb(
        results, tmp_path, {"wandb": True, "mode": "offline", "project": "t", "dir": str(tmp_path)}, None
    )
    assert run_id and list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))

    def broken(**_: Any) -> None:
        raise wandb.errors.CommError("no network")

    monkeypatch.setattr(wandb, "init", broken)
    assert log_to_wandb(results, tmp_path, {"wandb": True, "mode": "online"}, "abc") is None
    assert log_to_wandb(results, tmp_path, None, None) is None


def test_markdown_table() -> None:
    results = {
        "n": 3,
        "mean_accuracy": 0.25,
        "datasets": {
            "a": {"n": 1, "accuracy": 0.0, "throughput": {"seconds_per_example": 0.5}},
            "b": {"n": 2, "accuracy": 0.5},
        },
    }
    table = markdown_table(results)
    assert table.splitlines()[2] == "| a | 1 | 0.00 | 0.500 |"
    assert table.splitlines()[-1] == "| **mean** | 3 | **25.00** | |"


# -- the real LLM-Adapters test files --------------------------------------------------------------------------------


def test_real_llm_adapters_files_through_the_pipeline(tmp_path: Path, tok: Any) -> None:
    """20 real items of every test file: loading, answer types, generation, extraction, outputs."""
    ckpt, _ = make_checkpoint(tmp_path, tok, variant="sparse")
    files = sorted(str(p) for p in LLM_ADAPTERS.glob("*/test.json"))
    assert len(files) == 15, f"the LLM-Adapters fixtures under {LLM_ADAPTERS} are incomplete"
    cfg = eval_cfg(
        tmp_path, checkpoint=str(ckpt), eval={"files": files, "limit": 20}, batch_size=20, max_new_tokens=8
    )
    results = run_from_config(cfg)
    names = {Path(f).parent.name for f in files}
    assert set(results["datasets"]) == names and results["n"] == 20 * len(names)
    types = {name: row["answer_type"] for name, row in results["datasets"].items()}
    assert types["boolq"] == types["piqa"] == types["ARC-Easy"] == "label"
    assert types["gsm8k"] == types["SVAMP"] == "numeric" and types["AQuA"] == types["mathqa"] == "letter"
    out = Path(results["output_dir"])
    assert len(list(out.glob("router_heatmap_*.png"))) == len(names)
    assert all(math.isfinite(r["accuracy"]) for r in results["datasets"].values())


def test_run_settings_follow_the_training_run(tmp_path: Path) -> None:
    from moa_train.eval.checkpoints import find_run_config, resolve_run_settings

    run = tmp_path / "run"
    _write(run / "final" / "adapter_config.json", {})
    _write(run / "checkpoints" / "step-10" / "adapter_config.json", {})
    assert find_run_config(run / "final") is None
    OmegaConf.save({"trainer": {"precision": "bf16"}, "final_eval": {"batch_size": 64}}, run / "config.yaml")
    run_cfg = find_run_config(run / "final")
    assert find_run_config(run / "checkpoints" / "step-10") == run_cfg
    auto = OmegaConf.create({"batch_size": "auto", "precision": "auto"})
    assert resolve_run_settings(auto, run_cfg) == resolve_run_settings(auto, run_cfg)
    assert (
        resolve_run_settings(auto, run_cfg).batch_size,
        resolve_run_settings(auto, run_cfg).precision,
    ) == (64, "bf16")
    assert (resolve_run_settings(auto, None).batch_size, resolve_run_settings(auto, None).precision) == (
        16,
        "fp32",
    )
    explicit = OmegaConf.create({"batch_size": 3, "precision": "fp32"})
    assert resolve_run_settings(explicit, run_cfg).batch_size == 3
    with pytest.raises(MoATrainError, match="precision='int8'"):
        resolve_run_settings(OmegaConf.create({"precision": "int8"}), None)


def test_heldout_preset_needs_a_training_run(tmp_path: Path, tok: Any) -> None:
    preset = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "eval" / "heldout.yaml"))
    with pytest.raises(MoATrainError, match="checkpoint=<run dir>"):
        load_eval_records(preset, None)
    # the default preset on a checkpoint without a run config: one line listing the presets
    ckpt, _ = make_checkpoint(tmp_path, tok)
    cfg = eval_cfg(tmp_path, checkpoint=str(ckpt), eval=preset)
    with pytest.raises(
        MoATrainError, match=r"eval=<preset> \(bigbench, commonsense8, custom, heldout"
    ) as info:
        run_from_config(cfg)
    assert "\n" not in str(info.value)
    with pytest.raises(MoATrainError, match="eval.limit=auto only works with eval.data=run"):
        load_eval_records({**preset, "data": None, "split": "test"}, None)
    # a run whose data has no held-out records: the presets that can score it
    train = _write(tmp_path / "train.json", [{"instruction": "q", "output": "a", "answer": "a"}])
    run = OmegaConf.create(
        {"data": {"name": "mine", "source": "json", "train_path": str(train), "test_path": None}}
    )
    with pytest.raises(
        MoATrainError, match=r"data mine has an empty 'test' split; choose the data with eval=<preset>"
    ):
        load_eval_records(preset, run)


def test_instance_router_analysis_pools_over_the_prompt_like_generation(tok: Any) -> None:
    base = tiny_llama()
    model = get_moa_model(
        base, MoAConfig(lora_rank=4, pa_size=8, prompt_len=0, router={"granularity": "instance"})
    )
    randomise_adapters(model)
    record = records_of(3)[2]
    out = generate(model, tok, [record], decoding=DecodingConfig(), batch_size=1, max_new_tokens=4)
    ids = torch.tensor([out.prompt_ids[0]])
    with torch.no_grad(), model.capture_gates() as during:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))  # the prefill forward of generation
    result = evaluate_records(model, tok, [record], max_new_tokens=4, router_case=1)
    case = torch.tensor(result["router_cases"][0]["gates"])  # [L, T, E]: one vector per sequence
    assert torch.allclose(case[:, 0], torch.stack([g[0, 0] for g in during]), atol=1e-5)
    assert torch.allclose(case, case[:, :1].expand_as(case))


def test_homogeneous_site_routers_get_per_token_analysis_from_their_ffn_down_router(tok: Any) -> None:
    # MoLoRA-style: 3 LoRA experts per site, one router per site -> several router outputs per layer
    cfg = MoAConfig(
        lora_targets=["q", "down"],
        lora_rank=2,
        lora_experts=3,
        pa_size=0,
        prompt_len=0,
        router={"kind": "none"},
    )
    model = get_moa_model(tiny_llama(), cfg)
    randomise_adapters(model)
    result = evaluate_records(model, tok, records_of(3), max_new_tokens=3, collect_router=True, router_case=1)
    stats = result["router"]["toy"]
    assert stats["tokens"] == stats["processed_tokens"] > 0
    assert stats["experts"] == ["down.e0", "down.e1", "down.e2"]
    # the inter-expert std and router_case come from the same router as the stats: the down site's
    record = records_of(3)[0]
    out = generate(model, tok, [record], decoding=DecodingConfig(), batch_size=1, max_new_tokens=3)
    ids = torch.tensor(processed_sequences(out))  # what the analysis forward re-reads
    with torch.no_grad(), model.capture_gates(primary_only=True) as down:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    with torch.no_grad(), model.capture_gates() as every:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    layers = len(stats["layers"])
    assert len(down) == layers and len(every) == 2 * layers  # q and down routers per layer
    assert all(torch.equal(d, e) for d, e in zip(down, every[1::2]))  # down runs after q in a layer
    std = torch.stack([g[0].std(-1, unbiased=False).mean() for g in down]).mean()
    assert result["router_cases"][0]["index"] == 0
    assert 0.0 < stats["inter_expert_std"] < 1.0
    single = evaluate_records(model, tok, [record], max_new_tokens=3, collect_router=True)["router"]["toy"]
    assert single["inter_expert_std"] == pytest.approx(float(std), abs=1e-5)


def test_heldout_reproduces_a_bf16_runs_final_evaluation_exactly(tmp_path: Path, capsys: Any) -> None:
    """What the quickstart promises: `moa-eval checkpoint=<run>` (no other argument: eval=heldout is the
    default) gives the accuracy training printed, on the run's own held-out split, and says so."""
    from conftest import compose_config, train_in_process
    from moa_train.cli.validate import validate

    run_dir = tmp_path / "run"
    overrides = ["experiment=tiny", "trainer.precision=bf16", "trainer.max_steps=4", "final_eval.base=false"]
    overrides += ["final_eval.max_records=16", "final_eval.batch_size=5", "final_eval.max_new_tokens=6"]
    summary = train_in_process(run_dir, overrides)
    cfg = compose_config([f"checkpoint={run_dir}"], config_name="eval", hydra=True)
    validate(cfg, "eval")  # what moa-eval checks first: limit=auto and split=auto are valid values
    results = run_from_config(cfg)
    assert "eval=heldout: split 'test' of data=" in capsys.readouterr().out
    assert results["data"].endswith("16 records = its final evaluation)")
    assert (results["precision"], results["batch_size"], results["n"]) == ("bf16", 5, 16)
    assert results["accuracy"] == summary["tuned_accuracy"]
    trained = [
        json.loads(line) for line in (run_dir / "final_eval_predictions.jsonl").read_text().splitlines()
    ]
    ours = [
        json.loads(line)
        for line in (Path(results["output_dir"]) / "predictions.jsonl").read_text().splitlines()
    ]
    assert [p["generation"] for p in ours] == [p["generation"] for p in trained]
    assert all(p["generated_tokens"] <= 6 for p in ours)


def test_model_generation_defaults_do_not_leak_into_the_protocol(tok: Any) -> None:
    model = tiny_llama()
    records = records_of(3)
    clean = generate(model, tok, records, decoding=DecodingConfig(), batch_size=3, max_new_tokens=10)
    model.generation_config.repetition_penalty = 5.0  # as a hub model's generation_config might ship
    model.generation_config.no_repeat_ngram_size = 2
    again = generate(model, tok, records, decoding=DecodingConfig(), batch_size=3, max_new_tokens=10)
    assert again.generated_ids == clean.generated_ids


def test_presets_compose_and_bigbench_reads_the_embedded_held_out_splits() -> None:
    from conftest import compose_config

    for preset in ("commonsense8", "math6", "heldout", "bigbench", "custom", "lm_eval"):
        cfg = compose_config([f"eval={preset}"], config_name="eval")
        assert cfg.eval.name == preset and cfg.decoding.name == "greedy" and cfg.checkpoint is None
    cfg = compose_config(["eval=bigbench", "eval.limit=2"], config_name="eval")
    assert set(cfg.eval.data) == {"arith_mix", "commonsense_mix"}
    records = load_eval_records(OmegaConf.to_container(cfg.eval, resolve=True))
    assert [r["dataset"] for r in records] == ["arith_mix"] * 2 + ["commonsense_mix"] * 2
    assert [r["answer_type"] for r in records] == ["numeric"] * 2 + ["label"] * 2
