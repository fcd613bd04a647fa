"""Write docs/support_matrix.md and the README's support table from tests/core/test_families.py.

    python scripts/support_matrix.py           # run every family check (slow ones too), write both
    python scripts/support_matrix.py --check   # exit 1 if the pages do not match the collected tests

A cell is ✅ only when every test behind it passed in the run that wrote the page; the page lists each
test with its outcome. ``--check`` (run by tests/models/test_support_matrix.py) collects the tests without
running them and verifies that the page lists exactly those tests and that its tables are what this
script renders from the listed outcomes, i.e. that the page is current and not edited by hand.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests" / "core" / "test_families.py"
DOC = ROOT / "docs" / "support_matrix.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- support-matrix:begin -->", "<!-- support-matrix:end -->"
LIST_HEADER = "## Every test behind the tables"
CHECKS = {  # the checks that make a method ✅ for a family
    "test_identity_at_init": "identity at init",
    "test_training_lowers_the_loss": "training lowers the loss",
    "test_save_reload_gives_identical_logits": "save/reload: identical logits",
    "test_kv_cache_greedy_equals_full_forward": "KV-cache greedy = full forward",
}
METHODS = {"soft_moa": "Soft MoA", "sparse_moa": "Sparse MoA", "lora": "LoRA"}
CONFIGS = {
    "llama": "llama3_2_1b, smollm2_135m, ...",
    "gemma2": "gemma2_2b",
    "gemma3_text": "gemma3_1b",
    "phi3": "phi3_mini",
    "gpt_neox": "pythia_1_4b",
    "olmo2": "olmo2_1b",
    "granite": "granite3_2b",
    "smollm3": "smollm3_3b",
    "qwen3_moe": "qwen3_30b_a3b",
    "mixtral": "mixtral_8x7b",
    "olmoe": "olmoe_1b_7b",
}


def _pytest(*args: str) -> subprocess.CompletedProcess:
    env_python = sys.executable
    return subprocess.run(
        [env_python, "-m", "pytest", str(TESTS), "-p", "no:cacheprovider", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )


def collect() -> list[str]:
    """The test ids of tests/core/test_families.py, slow ones included, e.g. test_x[llama-soft_moa]."""
    result = _pytest("--collect-only", "-q", "-m", "")
    ids = [line.split("::", 1)[1] for line in result.stdout.splitlines() if "::" in line]
    if result.returncode != 0 or not ids:
        sys.exit(f"error: collecting {TESTS.name} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return ids


def run() -> dict[str, str]:
    """Run every test; {test id: "passed" | "failed" | "skipped: <reason>"}."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        _pytest("-q", "-m", "", f"--junitxml={report}")
        return read_reports([report])


def read_reports(paths: list[Path]) -> dict[str, str]:
    """Outcomes from pytest JUnit XML reports of tests/core/test_families.py (e.g. shards run in parallel)."""
    outcomes = {}
    for path in paths:
        for case in ET.parse(path).getroot().iter("testcase"):
            if not case.get("classname", "").endswith("test_families"):
                continue
            status = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    status = "failed"
                elif child.tag == "skipped":
                    status = "skipped: " + (child.get("message") or "").removeprefix("Skipped: ")
            outcomes[case.get("name")] = status
    return outcomes


def _split(test_id: str) -> tuple[str, list[str]]:
    name, _, params = test_id.partition("[")
    return name, params.rstrip("]").split("-") if params else []


def _families_info() -> dict[str, dict[str, str]]:
    """Per family of the tests: its LoRA sites, what a normed block router reads, the prompt traits."""
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "core")]
    from test_families import lora_targets

    from family_models import FAMILY_CONFIGS, family_model
    from moa_train import get_moa_model
    from moa_train.core.families import FAMILIES

    info = {}
    for family in FAMILY_CONFIGS:
        table = FAMILIES[family]
        sites = []
        for site in lora_targets(family):
            fused = table.fused.get(site)
            sites.append(f"{site} ({fused.path.rsplit('.', 1)[-1]} slice)" if fused else site)
        model = get_moa_model(
            family_model(family), dict(lora_targets=[], prompt_len=2, pa_size=0, router=dict(kind="none"))
        )
        moa = next(layer.moa for layer in model.base_model.modules() if hasattr(layer, "moa"))
        view = moa._attn_view
        traits = ["scale from the attention"]
        if view.softcap:
            traits.append("logit soft-cap")
        if view.k_norm is not None:
            traits.append("k norm per head" if view.k_norm_per_head else "full-width k norm")
        if family in ("gemma2", "gemma3_text"):
            traits.append("sliding layers (slots position-free)")
        norm = f"`{table.attn_norm}(h)`" if table.attn_norm else "h itself (no pre-attention norm)"
        info[family] = {
            "sites": ", ".join(sites),
            "router": f"residual h (default); normed: {norm}",
            "prompt": ", ".join(traits),
            "pa": "beside the MoE block" if table.moe_experts else "beside the MLP",
        }
    return info


def _mark(statuses: list[str]) -> str:
    if not statuses:
        return "—"
    if all(s == "passed" for s in statuses):
        return "✅"
    if any(s == "failed" for s in statuses):
        return "❌"
    return "⏭"


def render(outcomes: dict[str, str]) -> tuple[str, str]:
    """(docs/support_matrix.md, the README table) for ``outcomes`` {test id: status}."""
    by = {}
    for test_id, status in outcomes.items():
        name, params = _split(test_id)
        by.setdefault(name, {})[tuple(params)] = status
    info = _families_info()
    families = list(info)

    def cell(test: str, *key: str) -> str:
        found = by.get(test, {}).get(tuple(key))
        return _mark([found] if found else [])

    def method_cell(family: str, method: str) -> str:
        return _mark([by[t][(family, method)] for t in CHECKS if (family, method) in by.get(t, {})])

    head = (
        "| family | model configs | "
        + " | ".join(METHODS.values())
        + " | LoRA on routed experts | FSDP 2 proc. | compile | 4-bit base |"
    )
    rule = "|" + "---|" * (head.count("|") - 1)
    rows = []
    for f in families:
        routed = _mark(
            [
                by[t][(f,)]
                for t in ("test_routed_expert_lora_equals_merged_expert_weights",)
                if (f,) in by.get(t, {})
            ]
        )
        scaled = [
            _mark([v for k, v in by.get(test, {}).items() if k[0] == f])
            for test in (
                "test_fsdp_two_processes_equal_one",
                "test_compile_traces_without_graph_breaks_where_the_base_does",
                "test_4bit_base_trains",
            )
        ]
        methods = " | ".join(method_cell(f, m) for m in METHODS)
        rows.append(f"| {f} | {CONFIGS.get(f, '')} | {methods} | {routed} | {' | '.join(scaled)} |")
    table = "\n".join([head, rule, *rows])

    site_head = "| family | LoRA sites | block router reads | prompt expert follows | prompt = family eager attention | parallel adapter |"
    site_rows = [
        f"| {f} | {i['sites']} | {i['router']} | {i['prompt']} | "
        f"{cell('test_prompt_expert_equals_the_family_eager_attention_over_the_prompt', f)} | {i['pa']} |"
        for f, i in info.items()
    ]
    sites = "\n".join([site_head, "|" + "---|" * 6, *site_rows])

    listing = [f"- `{t}`: {outcomes[t]}" for t in sorted(outcomes)]
    doc = f"""# Supported base models

Generated by `python scripts/support_matrix.py` from `tests/core/test_families.py` (do not edit by hand;
`tests/models/test_support_matrix.py` fails when this page and the tests disagree). Every family is tested on
a tiny random-init model built offline from its transformers config class (`tests/family_models.py`);
the `*_arch` model configs give the real shapes for dry runs (`moa-train model=<name>_arch dry_run=true`).

✅ every test behind the cell passed · ❌ a test failed · ⏭ skipped (the reason is listed below) ·
— not applicable. A method is ✅ for a family when these pass: {", ".join(CHECKS.values())}.
Soft MoA and Sparse MoA put LoRA on the attention (and dense FFN) sites, the prompt expert and a
parallel adapter under one block router; LoRA puts plain LoRA on every site, on an MoE base its
routed experts included. FSDP: 2 CPU processes give the gradients of 1. compile: `torch.compile` of
the forward + loss has no graph break where the base has none (the MoE bases' own expert loops break
the graph, so those cells are skipped). 4-bit: an nf4 bitsandbytes base (CPU backend) trains (the
MoE bases' 3-D expert tensors are not bitsandbytes layers and stay unquantized).

{table}

Dry runs on the real shapes (meta device, no download) print the trainable parameters, e.g. LoRA on the
attention and on every routed expert of Qwen3-30B-A3B, and Soft MoA on Phi-3-mini:

```bash
moa-train model=qwen3_30b_a3b_arch experts=lora_only router=none 'moa.lora_targets=[q,k,v,o,experts]' dry_run=true
moa-train model=phi3_mini_arch experts=moa_soft dry_run=true
```

On an MoE base, `gate`, `up` and `down` name no site (the FFN is the MoE block): use `experts` for
LoRA on the routed experts and `pa_size` for a parallel adapter beside the block.

## Sites, router input and the prompt expert per family

{sites}

- Fused projections (Phi-3 `qkv_proj` / `gate_up_proj`, GPT-NeoX's per-head interleaved
  `query_key_value`): a LoRA on q, k, v, gate or up adapts only that slice's rows
  (`test_lora_equals_merged_weights`: the same logits as the merged weight delta written into
  those rows).
- The prompt expert's keys/values come from the frozen k/v projections (their fused slices included)
  through the family's k norm; its scores use the attention's own scale and logit soft-cap. Its
  slots have no position, so sliding windows do not hide them; attention sinks (gpt-oss) are refused
  in one line.
- MoE bases: LoRA target `experts` gives every routed expert its own low-rank deltas on its fused
  gate/up and down weights, applied inside the expert computation (an experts implementation
  registered with transformers) and routed by the base's own router
  (`test_routed_expert_lora_equals_merged_expert_weights`); the base's router aux loss is left as it
  is and reported as `aux/base_router` when its config sets `output_router_logits`.
- Not supported, each refused in one line: a `gate` site on GPT-NeoX (its MLP is not gated),
  `gate`/`up`/`down` on an MoE block (use `experts` or a parallel adapter), `ffn_experts` on fused or
  non-gated MLPs, the prompt expert with attention sinks.

The FSDP, compile and 4-bit checks run Soft MoA on the dense families and LoRA (routed experts
included) on the MoE bases.

{LIST_HEADER}

{chr(10).join(listing)}
"""
    return doc, table


def _listed(doc: str) -> dict[str, str]:
    section = doc.split(LIST_HEADER, 1)[-1]
    return dict(re.findall(r"^- `([^`]+)`: (.+)$", section, flags=re.M))


def _readme_with(table: str) -> str:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"error: README.md has no {BEGIN} ... {END} block; add one where the table goes")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def check() -> list[str]:
    """What is out of date (empty: nothing)."""
    if not DOC.is_file():
        return [f"{DOC.relative_to(ROOT)} is missing"]
    current = DOC.read_text()
    listed = _listed(current)
    problems = []
    collected = set(collect())
    if set(listed) != collected:
        new, gone = sorted(collected - set(listed)), sorted(set(listed) - collected)
        problems.append(f"tests not on the page: {new[:5]}; on the page but gone: {gone[:5]}")
        return problems
    doc, table = render(listed)
    if doc != current:
        problems.append(f"{DOC.relative_to(ROOT)} is not what the script renders from its test list")
    if _readme_with(table) != README.read_text():
        problems.append("README.md's support table differs from docs/support_matrix.md")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="verify the pages instead of writing them")
    parser.add_argument(
        "--reports",
        nargs="+",
        type=Path,
        help="pytest --junitxml reports to read instead of running the tests",
    )
    args = parser.parse_args()
    if args.check:
        problems = check()
        for problem in problems:
            print(f"error: {problem}; run: python scripts/support_matrix.py", file=sys.stderr)
        sys.exit(1 if problems else 0)
    outcomes = read_reports(args.reports) if args.reports else run()
    missing = set(collect()) - set(outcomes)
    if missing:
        sys.exit(
            f"error: {len(missing)} tests did not report (e.g. {sorted(missing)[0]}); see pytest's output"
        )
    doc, table = render(outcomes)
    DOC.write_text(doc)
    README.write_text(_readme_with(table))
    failed = sorted(t for t, s in outcomes.items() if s == "failed")
    print(f"wrote {DOC.relative_to(ROOT)} and README.md: {len(outcomes)} tests, {len(failed)} failed")


if __name__ == "__main__":
    main()
