"""torch.compile: every method's forward + loss is one graph, and compiled loss / gradients / telemetry /
aux losses equal eager (fp32 tolerance), with and without non-reentrant gradient checkpointing.

The 0-break checks use torch._dynamo.explain (tracing only, a few seconds per configuration). The
equality checks compile with the "aot_eager" backend — the same dynamo graphs, functionalisation,
autograd and checkpoint partitioning as Inductor, without C++ code generation (Inductor takes minutes
per model on a 2-core CPU); the Inductor runs of the same checks are marked slow.
"""

from __future__ import annotations

import json

import pytest
import torch

from core_helpers import randomize_adapters
from moa_train import MoAConfig, MoAModel
from moa_train.core.compile import DYNAMO_SETTINGS, compile_decoding, compile_model
from moa_train.errors import MoATrainError
from moa_train.train.steps import target_positions, token_cross_entropy
from tiny_models import tiny_model

AUX = dict(load_balance_coef=0.1, z_loss_coef=0.01, entropy_coef=0.01)  # every aux loss on
SITE = dict(kind="linear", bias=True, activation="softmax", **AUX)
HOMOGENEOUS = dict(lora_experts=4, pa_size=0, prompt_len=0, router=dict(kind="none"))
CONFIGS = {
    "soft_swiglu": dict(router=dict(kind="swiglu", **AUX)),
    "soft_linear": dict(router=dict(kind="linear", **AUX)),
    "sparse": dict(router=dict(kind="swiglu", selection="threshold", **AUX)),  # dense masked path (auto)
    "instance": dict(router=dict(kind="swiglu", granularity="instance", **AUX)),
    "molora": dict(**HOMOGENEOUS, site_router=dict(SITE)),
    "topk": dict(**HOMOGENEOUS, site_router=dict(SITE, selection="topk", top_k=2)),
    "adamole": dict(**HOMOGENEOUS, site_router=dict(SITE, selection="adamole")),
    "prompt": dict(lora_targets=[], pa_size=0, prompt_len=10, router=dict(kind="none")),
}
# The whole matrix (every configuration x checkpointing, traced and compiled) takes ~3 min on 2 CPU cores, so
# the default suite runs a subset that still covers every router, selection and expert kind once: traced
# (~2-7 s each) or compiled with fullgraph=True (which also fails on any break; ~6-10 s each).
FAST_EXPLAIN = {
    ("soft_linear", False),
    ("sparse", True),
    ("instance", False),
    ("adamole", False),
    ("prompt", False),
}
FAST_EQUAL = {("soft_swiglu", True), ("sparse", False)}  # the rest, topk included, in make test-slow


def matrix(fast: set[tuple[str, bool]]) -> list:
    """Every (configuration, checkpointing) pair; those outside ``fast`` are marked slow."""
    return [
        pytest.param(n, gc, marks=() if (n, gc) in fast else (pytest.mark.slow,), id=f"{n}{'-gc' * gc}")
        for n in CONFIGS
        for gc in (False, True)
    ]


def build(name: str, checkpointing: bool) -> MoAModel:
    model = MoAModel(tiny_model(), MoAConfig(**CONFIGS[name])).train()
    randomize_adapters(model)  # no expert is a no-op, every gate is live
    if checkpointing:
        model.gradient_checkpointing_enable()
    return model


def batch() -> dict[str, torch.Tensor]:
    """Two sequences, one left-padded; the prompt (labels -100) is what instance routers pool."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 16), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    labels = ids.masked_fill(torch.arange(16) < 6, -100)
    # the positions whose next token is a target: found outside the compiled forward, as training does
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "positions": target_positions(labels)}


def loss_of(model: MoAModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss (train/steps.py): the LM head on the target positions only, the mean token
    cross-entropy, plus the aux losses."""
    labels, positions = inputs["labels"], inputs["positions"]
    out = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        use_cache=False,
        logits_to_keep=positions,
    )
    return (
        token_cross_entropy(out.logits, labels, positions) / (labels[:, 1:] != -100).sum() + model.aux_loss()
    )


@pytest.mark.parametrize(("name", "checkpointing"), matrix(FAST_EXPLAIN))
def test_forward_and_loss_are_one_graph(name: str, checkpointing: bool) -> None:
    model = build(name, checkpointing)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(DYNAMO_SETTINGS):
        report = torch._dynamo.explain(loss_of)(model, batch())
    reasons = [r.reason.strip().splitlines()[0] for r in report.break_reasons]
    assert (report.graph_count, report.graph_break_count) == (1, 0), reasons


def run_step(model: MoAModel, forward) -> tuple[torch.Tensor, dict, dict, dict]:
    """Loss, aux losses, gradients and router telemetry of one forward + backward."""
    model.zero_grad(set_to_none=True)
    model.reset_router_stats()
    loss = forward(model, batch())
    aux = {k: v.detach().clone() for k, v in model.aux_losses().items()}
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), aux, grads, model.router_stats()


def assert_compiled_equals_eager(name: str, checkpointing: bool, backend: str) -> None:
    model = build(name, checkpointing)
    eager = run_step(model, loss_of)
    torch._dynamo.reset()
    compile_model(model, backend=backend)
    for _ in range(2):  # the second call runs the cached graph: telemetry must not double count either
        compiled = run_step(model, loss_of)
        torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
        assert compiled[1].keys() == eager[1].keys()
        for key in eager[1]:
            torch.testing.assert_close(compiled[1][key], eager[1][key], rtol=1e-5, atol=1e-6)
        assert compiled[2].keys() == eager[2].keys() and len(eager[2]) > 0
        for key, grad in eager[2].items():  # fp32 tolerance on the tensor's scale (Inductor reorders sums)
            scale = float(grad.abs().max())
            torch.testing.assert_close(compiled[2][key], grad, rtol=1e-4, atol=1e-6 + 1e-5 * scale, msg=key)
        assert compiled[3]["tokens"] == eager[3]["tokens"]
        assert eager[3]["tokens"] > 0 or not eager[3]["layers"]  # a config without routers has no telemetry
        for key in ("mean_gate", "active_frac", "active_per_token", "entropy", "mean_threshold"):
            if key not in eager[3]:  # no router, no statistics
                continue
            torch.testing.assert_close(
                torch.tensor(compiled[3][key] or []), torch.tensor(eager[3][key] or []), equal_nan=True
            )
    if CONFIGS[name].get("router", {}).get("kind") != "none" or CONFIGS[name].get("site_router"):
        assert eager[1], "aux losses were on"


@pytest.mark.parametrize(("name", "checkpointing"), matrix(FAST_EQUAL))
def test_compiled_loss_and_gradients_equal_eager(name: str, checkpointing: bool) -> None:
    assert_compiled_equals_eager(name, checkpointing, "aot_eager")


def test_a_new_number_of_target_positions_runs_the_compiled_forward_without_a_graph_break() -> None:
    """Micro-batches differ in how many positions have a target: torch marks that length dynamic after
    its first change (one recompile), and every length gives the eager loss."""
    model = build("soft_swiglu", False)
    inputs = batch()
    cases = []
    for first in (6, 10, 3, 12):  # answers starting at different places: 10, 6, 13, 4 target positions
        labels = inputs["input_ids"].masked_fill(torch.arange(16) < first, -100)
        cases.append({**inputs, "labels": labels, "positions": target_positions(labels)})
    eager = [loss_of(model, case).detach() for case in cases]
    torch._dynamo.reset()
    compile_model(model, backend="aot_eager")  # fullgraph=True: a break would raise
    for case, expected in zip(cases, eager, strict=True):
        torch.testing.assert_close(loss_of(model, case).detach(), expected, rtol=1e-5, atol=1e-6)
    assert len({len(c["positions"]) for c in cases}) == 4


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "checkpointing"), [("soft_swiglu", False), ("sparse", True), ("topk", False)]
)
def test_inductor_equals_eager(name: str, checkpointing: bool) -> None:
    assert_compiled_equals_eager(name, checkpointing, "inductor")


def test_gather_path_is_refused_in_one_line() -> None:
    cfg = dict(CONFIGS["sparse"], sparse_impl="gather")
    model = MoAModel(tiny_model(), MoAConfig(**cfg))
    with pytest.raises(MoATrainError, match=r"sparse_impl=gather.*sparse_impl=auto") as err:
        compile_model(model)
    assert "\n" not in str(err.value)
    with pytest.raises(MoATrainError, match="compile_mode"):
        compile_model(MoAModel(tiny_model(), MoAConfig()), mode="fastest")


def greedy(model: MoAModel, **kwargs) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, **kwargs
        )


@pytest.mark.parametrize("name", ["soft_swiglu", pytest.param("sparse", marks=pytest.mark.slow)])
def test_compiled_greedy_decoding_with_kv_cache_equals_eager(name: str) -> None:
    model = MoAModel(tiny_model(), MoAConfig(**CONFIGS[name])).eval()
    randomize_adapters(model, scale=0.1)
    model.set_telemetry(False)  # as moa-eval decodes
    eager = greedy(model)
    torch._dynamo.reset()
    compile_decoding(model, backend="aot_eager")  # fullgraph: a break would raise
    assert torch.equal(greedy(model), eager)
    compiled_frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch.equal(greedy(model), eager)  # the decode step's graph is reused, not retraced
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled_frames


def test_instance_router_decoding_is_refused_in_one_line() -> None:
    model = MoAModel(tiny_model(), MoAConfig(**CONFIGS["instance"])).eval()
    with pytest.raises(MoATrainError, match="granularity=instance") as err:
        compile_decoding(model)
    assert "\n" not in str(err.value)


def test_trainer_compile_options_are_validated_before_anything_runs(compose) -> None:
    from moa_train.cli.validate import validate

    validate(compose(["experiment=tiny", "trainer.compile=true", "router=sparse"]))  # dense masked: fine
    gather = compose(["experiment=tiny", "trainer.compile=true", "router=sparse", "+moa.sparse_impl=gather"])
    with pytest.raises(MoATrainError, match="trainer.compile=true cannot compile moa.sparse_impl=gather"):
        validate(gather)
    with pytest.raises(MoATrainError, match="compile_mode"):
        validate(compose(["experiment=tiny", "trainer.compile_mode=fastest"]))


@pytest.mark.slow
def test_moa_train_tiny_compiled_runs_end_to_end(tmp_path) -> None:
    """`moa-train experiment=tiny trainer.compile=true` (Inductor; minutes of C++ builds on 2 CPU cores)."""
    from conftest import run_cli

    proc = run_cli(
        "moa-train", "experiment=tiny", "trainer.compile=true", f"hydra.run.dir={tmp_path}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["compile_seconds"] > 0 and summary["train_seconds"] > 0
