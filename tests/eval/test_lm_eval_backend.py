"""lm-eval back-end: local task YAMLs (tests/fixtures/lm_eval) run offline on the in-memory MoA model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lm_eval")

from moa_train import MoAConfig, get_moa_model  # noqa: E402
from moa_train.errors import MoATrainError  # noqa: E402
from moa_train.eval.lm_eval_backend import run_lm_eval, summarize_task  # noqa: E402
from tiny_models import CHARS, char_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "tests" / "fixtures" / "lm_eval"
DOCS = [json.loads(line) for line in (TASKS / "tiny_qa.jsonl").read_text().splitlines()]


def tiny_moa() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(CHARS) + 4,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        model = get_moa_model(LlamaForCausalLM(config), MoAConfig(lora_rank=4, pa_size=8, prompt_len=3))
        for param in model.adapter_state_dict().values():
            param.normal_(0.0, 0.3)  # fresh adapters are no-ops; random ones change every score
    return model.eval()


@pytest.fixture(autouse=True)
def repo_cwd_one_thread(monkeypatch: Any) -> Any:
    """The task YAMLs name their data relative to the repository root; tiny models run best on 1 thread."""
    monkeypatch.chdir(REPO)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def continuation_logprob(model: torch.nn.Module, tok: Any, context: str, continuation: str) -> float:
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(context + continuation, add_special_tokens=False)["input_ids"][len(ctx) :]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
    return sum(logprobs[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_multiple_choice_scores_come_from_the_adapted_model() -> None:
    model, tok = tiny_moa(), char_tokenizer()
    out = run_lm_eval(
        model,
        tok,
        ["moa_tiny_mc"],
        include_path=str(TASKS),
        include_defaults=False,
        batch_size=4,
        log_samples=True,
    )
    row = out["tasks"]["moa_tiny_mc"]
    assert row["metric"] == "acc,none" and row["n"] == len(DOCS)
    predicted = []
    for sample in sorted(out["samples"]["moa_tiny_mc"], key=lambda s: s["doc_id"]):
        doc = DOCS[sample["doc_id"]]
        context = f"Question: {doc['question']}\nAnswer:"
        ours = [continuation_logprob(model, tok, context, " " + c) for c in doc["choices"]]
        theirs = [resp[0] for resp in sample["filtered_resps"]]
        assert theirs == pytest.approx(ours, abs=1e-4)
        with model.disable_adapters():
            base = [continuation_logprob(model, tok, context, " " + c) for c in doc["choices"]]
        assert base != pytest.approx(theirs, abs=1e-3)  # the adapters really took part
        predicted.append(int(torch.tensor(ours).argmax()))
    expected = sum(p == d["label"] for p, d in zip(predicted, DOCS)) / len(DOCS)
    assert row["accuracy"] == pytest.approx(expected)


def test_generate_until_task_uses_model_generate() -> None:
    model, tok = tiny_moa(), char_tokenizer()
    out = run_lm_eval(
        model, tok, ["moa_tiny_gen"], include_path=str(TASKS), include_defaults=False, log_samples=True
    )
    row = out["tasks"]["moa_tiny_gen"]
    assert row["metric"] == "exact_match,none" and row["n"] == len(DOCS)
    sample = next(s for s in out["samples"]["moa_tiny_gen"] if s["doc_id"] == 0)
    context = f"Question: {DOCS[0]['question']}\nAnswer:"
    ids = torch.tensor([tok(context, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        gen = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
        )
    ours = tok.decode(gen[0, ids.shape[1] :].tolist(), skip_special_tokens=True).split("\n")[0]
    assert sample["filtered_resps"][0] == ours


def test_moa_eval_lm_eval_preset_writes_results_json(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from moa_train.eval import run_from_config

    tok_dir = tmp_path / "tok"
    char_tokenizer().save_pretrained(tok_dir)
    node = {
        "name": "tiny",
        "source": "tiny_random",
        "tokenizer": str(tok_dir),
        "arch": {
            "model_type": "llama",
            "vocab_size": len(CHARS) + 4,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
    }
    root = OmegaConf.load(REPO / "configs" / "eval.yaml")
    root.pop("defaults")
    root.pop("hydra")
    preset = OmegaConf.load(REPO / "configs" / "eval" / "lm_eval.yaml")
    preset.merge_with(
        {"tasks": ["moa_tiny_mc"], "include_path": str(TASKS), "include_defaults": False, "limit": 4}
    )
    cfg = OmegaConf.merge(
        root,
        {"model": node, "eval": preset, "decoding": {"name": "greedy"}, "logger": {"name": "none"}},
        {"output_dir": str(tmp_path / "out"), "batch_size": 2},
    )
    results = run_from_config(cfg)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["backend"] == "lm_eval" and saved["eval"] == "lm_eval"
    assert saved["datasets"]["moa_tiny_mc"]["n"] == 4
    assert saved["mean_accuracy"] == results["mean_accuracy"] == saved["datasets"]["moa_tiny_mc"]["accuracy"]
    assert saved["lm_eval"]["config"]["tasks"] == ["moa_tiny_mc"]


def test_unknown_task_and_missing_include_path_are_one_line_errors() -> None:
    model, tok = tiny_moa(), char_tokenizer()
    with pytest.raises(MoATrainError, match="task\\(s\\) not found: no_such_task"):
        run_lm_eval(model, tok, ["no_such_task"], include_path=str(TASKS), include_defaults=False)
    with pytest.raises(MoATrainError, match="include_path not found"):
        run_lm_eval(model, tok, ["moa_tiny_mc"], include_path="/nonexistent/tasks")
    with pytest.raises(MoATrainError, match="eval.tasks"):
        run_lm_eval(model, tok, [])


def test_summarize_task_prefers_accuracy_and_drops_stderr() -> None:
    row = summarize_task(
        "t", {"alias": "t", "acc_norm,none": 0.4, "acc,none": 0.3, "acc_stderr,none": 0.1}, 10
    )
    assert row == {
        "accuracy": 0.3,
        "metric": "acc,none",
        "n": 10,
        "metrics": {"acc_norm,none": 0.4, "acc,none": 0.3},
    }
    with pytest.raises(MoATrainError, match="no numeric metric"):
        summarize_task("t", {"alias": "t"}, 1)
