"""Ratios to the baselines measured in the same run, the targets they are held to, and the markdown table."""

from __future__ import annotations

from moa_train.bench.variants import BASELINE, COMPILED, COMPILED_BASELINE

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
