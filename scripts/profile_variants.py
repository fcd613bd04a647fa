#!/usr/bin/env python
"""Where does variant B spend more time than variant A? torch.profiler on the moa-bench setup.

    python scripts/profile_variants.py peft_lora_r16 soft_moa            # one training step each
    python scripts/profile_variants.py sparse_moa soft_moa --decode      # greedy decoding (16 new tokens)
    python scripts/profile_variants.py peft_lora_r16_compiled soft_moa_compiled --layers 2   # torch.compile
    (with TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE=1 Inductor's generated kernels show one by one)

Both variants are built on one shared frozen base (as moa-bench does), warmed up, then profiled
``--reps`` times; the per-(operator, input shapes) self CPU time (median over reps) of B minus A is
printed, largest first. The table is what docs/benchmarks.md's "What limits the ratios" was read from.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

try:
    from moa_train.bench import runner as bench
except ImportError:  # not installed: use the checkout's src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from moa_train.bench import runner as bench


def profile_ops(run, reps: int) -> dict[tuple[str, str], tuple[float, int]]:
    """{(op, input shapes): (median self CPU ms, calls)} of ``reps`` profiled calls of ``run``."""
    from torch.profiler import ProfilerActivity, profile

    samples: dict[tuple[str, str], list[tuple[float, int]]] = {}
    for _ in range(reps):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            run()
        rep: dict[tuple[str, str], tuple[float, int]] = {}
        for event in prof.key_averages(group_by_input_shape=True):
            # a compiled graph's name is its hash: one row for Inductor's generated code of either variant
            name = re.sub(r"CompiledFxGraph \w+", "CompiledFxGraph (generated kernels)", event.key)
            # Inductor kernels (TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE=1): graph_<i>_<fused ops>_<j> -> fused ops
            name = re.sub(r"^graph_\d+_(.*?)_\d+$", r"\1", name)
            key = (name, str(event.input_shapes)[:100])
            ms, calls = rep.get(key, (0.0, 0))
            rep[key] = (ms + event.self_cpu_time_total / 1000, calls + event.count)
        for key, value in rep.items():
            samples.setdefault(key, []).append(value)
    return {k: (statistics.median(ms for ms, _ in v), v[0][1]) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("a", help="reference variant (e.g. peft_lora_r16)")
    parser.add_argument("b", help="variant to explain (e.g. soft_moa)")
    parser.add_argument(
        "--decode", action="store_true", help="profile greedy decoding instead of a training step"
    )
    parser.add_argument("--model", default="smollm2", choices=bench.MODELS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()

    setup = bench.Setup(args.model, "cpu", args.batch, args.seq, "bfloat16", args.layers, 0)
    base, tokenizer, _ = bench.build_base(setup)
    batch = bench.make_batch(tokenizer, base.config.vocab_size, args.batch, args.seq, 0, "cpu")
    prompt = {k: v[:, : min(64, args.seq)] for k, v in batch.items() if k != "labels"}
    pad = base.config.pad_token_id or 0
    runners = {n: bench.Runner(n, bench.attach(base, n), "cpu") for n in (args.a, args.b)}

    def job(name: str):
        if args.decode:
            return lambda: runners[name].generate_time(prompt, 16, pad)
        return lambda: runners[name].step(batch)

    for _ in range(2):  # warm-up: kernels, allocator, prompt caches
        for name in runners:
            job(name)()
    ops = {name: profile_ops(job(name), args.reps) for name in runners}
    a, b = ops[args.a], ops[args.b]
    print(f"self CPU total: {args.a} {sum(v[0] for v in a.values()):.1f} ms, "
          f"{args.b} {sum(v[0] for v in b.values()):.1f} ms")  # fmt: skip
    print(f"{'B - A (ms)':>10}  {'A ms / calls':>16}  {'B ms / calls':>16}  operator, input shapes")
    none = (0.0, 0)
    order = sorted(set(a) | set(b), key=lambda k: -(b.get(k, none)[0] - a.get(k, none)[0]))
    # the largest excesses of B, then those of A (what B saves)
    for key in order[: args.top] + order[-(args.top // 3) :][::-1]:
        (ms_a, n_a), (ms_b, n_b) = a.get(key, none), b.get(key, none)
        print(f"{ms_b - ms_a:10.2f}  {ms_a:9.2f} / {n_a:<5}  {ms_b:9.2f} / {n_b:<5}  {key[0]}, {key[1]}")


if __name__ == "__main__":
    main()
