"""Helpers of scripts/gpu_check.sh: environment report, KV-cache decoding check, merge into one JSON.

    python scripts/gpu_check.py env --device cuda --out env.json
    python scripts/gpu_check.py generate --device cuda --out generate.json
    python scripts/gpu_check.py kit-source .device_kit/core/manifest.json
    python scripts/gpu_check.py merge <work dir> <out.json> --device cuda

``env``: Python, torch, CUDA, the GPU, the versions of the packages moa_train uses, and every requirement of
moa_train (and of the kit's wheels) that the environment does not meet: on a lent machine the image
provides most of them, so a version the image has but moa_train was not tested with shows up here first.

``generate``: SmolLM2-135M (the converted default model where it is cached; else random weights of its
architecture on CUDA, a tiny random Llama on CPU) with Soft MoA adapters set to non-zero values, greedy ``generate()`` with the KV cache, then one full forward over
prompt + generated tokens: each generated token must be the argmax of the full forward at its position
(teacher forcing), which checks the cached decode path (router, prompt expert, LoRA, PA) against the
uncached one. In fp32 every token must agree; in bf16 a token may differ only where the full forward's
two best logits are closer than the cached-vs-full logit difference (a rounding tie).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path
from typing import Any

PROMPTS = ["Below is a question. What is 23 + 58?\nAnswer:", "Name three colours of the rainbow:"]


def generate_check(device: str, new_tokens: int) -> dict[str, Any]:
    """bf16 (what the issue asks) and fp32 (exact): cached greedy decode vs teacher-forced full forward."""
    results = {dtype: _generate_once(device, new_tokens, dtype) for dtype in ("bfloat16", "float32")}
    # fp32 must agree token for token; bf16 may only differ where the full forward's top-2 logits are
    # closer than the cached-vs-full logit difference (a rounding tie, not a different computation)
    passed = results["float32"]["tokens_equal"] == results["float32"]["tokens_compared"]
    passed = passed and results["bfloat16"]["mismatches_outside_ties"] == 0
    return {"device": device, "new_tokens": new_tokens, "passed": passed, **results}


def _generate_once(device: str, new_tokens: int, dtype_name: str) -> dict[str, Any]:
    import torch
    from omegaconf import OmegaConf

    from moa_train import MoAConfig, get_moa_model
    from moa_train.models.base import load_base_model, smollm2_dir

    dtype = getattr(torch, dtype_name)
    configs = Path(__file__).resolve().parents[1] / "configs"
    try:
        smollm2_dir(convert=False)
        model_name = "smollm2_135m"
    except Exception:  # not converted here (a lent GPU machine never is): the same check on random weights
        model_name = "smollm2_135m_arch" if device.startswith("cuda") else "tiny_random"
    model_cfg = OmegaConf.load(configs / "model" / f"{model_name}.yaml")
    model_cfg.dtype = dtype_name
    base, tokenizer = load_base_model(model_cfg)
    base.to(device=device, dtype=dtype)
    moa = OmegaConf.merge(
        OmegaConf.load(configs / "experts" / "moa_soft.yaml"),
        {"router": OmegaConf.load(configs / "router" / "soft_swiglu.yaml")},
    )
    torch.manual_seed(0)
    model = get_moa_model(base, MoAConfig.from_dict(OmegaConf.to_container(moa, resolve=True))).eval()
    with torch.no_grad():  # trained-looking adapters: zero-initialised experts would test nothing
        for param in model.adapter_state_dict().values():
            param.normal_(0.0, 0.05)
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True).to(device)
    prompt_len = batch["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        sequences = out.sequences
        mask = torch.cat([batch["attention_mask"], torch.ones_like(sequences[:, prompt_len:])], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: the positions generate() uses
        full = model(input_ids=sequences, attention_mask=mask, position_ids=positions).logits
        full = full[:, prompt_len - 1 : -1].float()
    cached = torch.stack(out.logits, dim=1).float()  # [B, new, vocab]
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    gap = (cached - full).abs().amax(-1)  # per position: the largest cached-vs-full logit difference
    full[..., eos] = float("-inf")  # min_new_tokens keeps generate() from choosing EOS: the same here
    generated = sequences[:, prompt_len:]
    equal = generated == full.argmax(-1)
    top2 = full.topk(2, dim=-1).values
    tie = (top2[..., 0] - top2[..., 1]) <= 2 * gap
    return {
        "model": model_name,
        "tokens_compared": int(equal.numel()),
        "tokens_equal": int(equal.sum()),
        "mismatches_outside_ties": int((~equal & ~tie).sum()),
        "max_logit_diff": round(float(gap.max()), 5),
    }


# the packages whose versions a reader of the JSON wants next to the numbers
VERSIONS = ("torch", "transformers", "accelerate", "peft", "bitsandbytes", "hydra-core", "omegaconf", "datasets",
            "numpy", "pyarrow", "safetensors", "tokenizers", "huggingface-hub", "triton", "moa_train")  # fmt: skip


def unmet_requirements(roots: list[str], left_out: frozenset[str] = frozenset()) -> list[str]:
    """Requirements (no extras) of ``roots`` and of their requirements that this environment does not meet;
    a missing package named in ``left_out`` (a kit group that did not travel) is not one."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    installed = {
        canonicalize_name(d.metadata["Name"]): d.version
        for d in metadata.distributions()
        if d.metadata["Name"]
    }
    unmet, seen, queue = [], set(), [canonicalize_name(r) for r in roots]
    while queue:
        name = queue.pop()
        if name in seen or name not in installed:
            continue
        seen.add(name)
        for line in metadata.requires(name) or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = canonicalize_name(req.name)
            version = installed.get(dep)
            if version is None and dep not in left_out:
                unmet.append(f"{name} needs {req} (not installed)")
            elif (
                version is not None
                and req.specifier
                and not req.specifier.contains(version, prereleases=True)
            ):
                unmet.append(f"{name} needs {req} (found {version})")
            queue.append(dep)
    return sorted(set(unmet))


def left_out_of_kit(manifests: list[Path]) -> dict[str, str]:
    """package -> kit group, for the groups of these kits that did not travel (no folder beside core/)."""
    out = {}
    for manifest in manifests:
        root = manifest.resolve().parent.parent
        data = json.loads(manifest.read_text())
        for name, info in data.get("packages", {}).items():
            if not any((root / info["group"]).glob("*.whl")):
                out[name] = info["group"]
        out.update(data.get("groups_not_built", {}))  # a kit built with fewer --groups
    return out


def environment(device: str, manifests: list[Path]) -> dict[str, Any]:
    """What ran: Python, package versions, the accelerator, and moa_train's unmet requirements."""
    from importlib import metadata

    import torch

    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info: dict[str, Any] = {
        "python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
        "versions": versions, "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
    }  # fmt: skip
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    nccl=".".join(map(str, torch.cuda.nccl.version())))  # fmt: skip
    import moa_train  # the kit's (or the environment's) moa_train: say which

    info["moa_train_path"] = str(Path(moa_train.__file__).parent)
    left_out = left_out_of_kit(manifests)
    info["kit_groups_left_out"] = sorted(set(left_out.values()))  # e.g. loggers: no step needs them
    info["unmet_requirements"] = unmet_requirements(["moa_train"], frozenset(left_out))
    info["passed"] = device == "cpu" or torch.cuda.is_available()
    return info


def kit_source(manifest: Path) -> bool:
    """Warn when the kit's moa_train wheel was built from other sources than this checkout's."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from device_kit import tree_hash

    built = json.loads(manifest.read_text()).get("source", {}).get("tree_hash")
    if built and built != tree_hash():
        print(f"  WARNING: the kit's moa_train wheel was built from other sources ({built}) than this checkout "
              f"({tree_hash()}): rebuild it with scripts/device_kit.sh")  # fmt: skip
        return False
    return True


def merge(work: Path, out: Path, device: str, seconds: float) -> dict[str, Any]:
    """One JSON: environment, each step's status and time, and what each step wrote."""
    steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines() if line.strip()]
    for step in steps:
        for name in ("result.json", "summary.json"):
            path = work / step["name"] / name
            if path.is_file():
                step["result"] = json.loads(path.read_text())
        log = work / f"{step['name']}.log"
        if step["status"] == "failed" and log.is_file():
            step["log_tail"] = log.read_text(errors="replace").splitlines()[-25:]
        if not step["reason"]:
            del step["reason"]
    env = next((s.get("result") for s in steps if s["name"] == "env"), None) or {}
    report = {
        "device": device, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": env.get("gpu"), "versions": env.get("versions"), "python": platform.python_version(),
        "seconds": seconds, "steps": steps, "passed": all(s["status"] != "failed" for s in steps),
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(out)
    return report


def headline(step: dict[str, Any]) -> str:
    """One line of numbers per step for the table (the JSON holds everything)."""
    result = step.get("result") or {}
    name = step["name"]
    if step["status"] != "passed":
        return step.get("reason", "")
    if name == "env":
        v = result.get("versions") or {}
        unmet = len(result.get("unmet_requirements") or [])
        return f"{result.get('gpu') or 'no GPU'}; torch {v.get('torch')}, transformers {v.get('transformers')}; {unmet} unmet requirement(s)"
    if name in ("bench", "compiled"):  # step time and decode speed as ratios to PEFT LoRA (same process)
        eager = result.get("ratio_vs_peft_lora") or {}
        compiled = result.get("ratio_vs_compiled_peft_lora") or {}
        parts = []
        for key, table in (("soft_moa", eager), ("sparse_moa", eager), ("soft_moa_compiled", compiled)):
            ratio = (table.get(key) or {}).get("step_s")
            if ratio is not None:
                parts.append(f"{key} step x{ratio:.2f}")
        decode = (eager.get("soft_moa") or {}).get("decode_tokens_per_s")
        if decode is not None and name == "bench":
            parts.append(f"soft_moa decode x{decode:.2f}")
        return ("vs PEFT LoRA: " + ", ".join(parts)) if parts else ""
    if name == "generate" and result:
        bf16 = result.get("bfloat16") or {}
        return f"bf16 {bf16.get('tokens_equal')}/{bf16.get('tokens_compared')} tokens equal, {bf16.get('mismatches_outside_ties')} outside ties"
    if name == "serve":  # serving tokens/s per variant at the lowest and highest concurrency
        levels = (result.get("args") or {}).get("concurrency") or []
        cells = []
        for variant, rows in (result.get("results") or {}).items():
            rates = [(rows.get(f"c{c}") or {}).get("tokens_per_s") for c in (levels[:1] + levels[-1:])]
            if all(r is not None for r in rates) and levels:
                cells.append(f"{variant} {'/'.join(f'{r:.0f}' for r in rates)}")
        return (f"tokens/s at concurrency {levels[0]}/{levels[-1]}: " + ", ".join(cells)) if cells else ""
    if "train/loss" in result:  # a moa-train run's summary.json
        mem = result.get("peak_memory_mb")
        return (f"{result.get('step')} steps, loss {result['train/loss']:.3f}, "
                f"{result.get('train/tokens_per_s', 0):.0f} tok/s" + (f", peak {mem:.0f} MB" if mem else ""))  # fmt: skip
    return step.get("reason", "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="helpers of scripts/gpu_check.sh")
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env")
    env.add_argument("--device", default="cuda")
    env.add_argument("--out", type=Path, required=True)
    env.add_argument("--manifest", type=Path, action="append", default=[], help="a kit's core/manifest.json")
    gen = sub.add_parser("generate")
    gen.add_argument("--device", default="cuda")
    gen.add_argument("--new-tokens", type=int, default=24)
    gen.add_argument("--out", type=Path, required=True)
    kit = sub.add_parser("kit-source")
    kit.add_argument("manifest", type=Path)
    mer = sub.add_parser("merge")
    mer.add_argument("work", type=Path)
    mer.add_argument("out", type=Path)
    mer.add_argument("--device", default="cuda")
    mer.add_argument("--seconds", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.command in ("env", "generate"):
        if args.command == "env":
            result = environment(args.device, args.manifest)
        else:
            result = generate_check(args.device, args.new_tokens)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        return 0 if result["passed"] else 1
    if args.command == "kit-source":
        return 0 if kit_source(args.manifest) else 1
    report = merge(args.work, args.out, args.device, args.seconds)
    print(f"\n{'step':<20} {'status':<8} {'seconds':>8}  result")
    for step in report["steps"]:
        print(f"{step['name']:<20} {step['status']:<8} {step['seconds']:>8.1f}  {headline(step)}")
    print(
        f"{'all' if report['passed'] else 'NOT all'} steps passed in {args.seconds:.0f} s; written: {args.out}"
    )
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
