"""The recipe's parts (schedule, optimizer groups, loss, batch plan, telemetry, logging) and short
end-to-end runs of the tiny model in this process."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import TINY, compose_config, train_in_process
from moa_train.data import load_splits
from moa_train.errors import MoATrainError
from moa_train.train.loggers import Backend, RunLogger, make_logger, read_metrics
from moa_train.train.metrics import RouterLog, router_metrics
from moa_train.train.recipe import BatchPlan, LRSchedule, build_optimizer, learning_rate, token_cross_entropy

NO_EVAL = ["final_eval.enabled=false"]

# ----------------------------------------------------------------------------------------------------
# Learning rate and optimizer
# ----------------------------------------------------------------------------------------------------


def test_cosine_schedule_warms_up_then_decays_to_min_lr() -> None:
    sched = LRSchedule("cosine", warmup=10, total=110, min_ratio=0.1)
    assert sched(0) == 0.0 and sched(5) == pytest.approx(0.5) and sched(10) == pytest.approx(1.0)
    assert sched(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert sched(110) == pytest.approx(0.1)
    after = [sched(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_constant_and_linear_schedules() -> None:
    constant = LRSchedule("constant", warmup=4, total=100, min_ratio=0.0)
    assert [constant(s) for s in (0, 2, 4, 99)] == [0.0, 0.5, 1.0, 1.0]
    linear = LRSchedule("linear", warmup=0, total=100, min_ratio=0.0)
    assert linear(0) == 1.0 and linear(50) == pytest.approx(0.5) and linear(100) == 0.0


def test_warmup_in_epochs_or_steps() -> None:
    epochs = OmegaConf.create({"name": "cosine", "warmup_epochs": 0.5, "warmup_steps": None, "min_lr": 0.0})
    assert LRSchedule.from_config(epochs, 1e-3, total=200, steps_per_epoch=100).warmup == 50
    steps = OmegaConf.create({"name": "cosine", "warmup_epochs": None, "warmup_steps": 7, "min_lr": 0.0})
    assert LRSchedule.from_config(steps, 1e-3, total=200, steps_per_epoch=100).warmup == 7
    both = OmegaConf.create({"name": "cosine", "warmup_epochs": 1, "warmup_steps": 7, "min_lr": 0.0})
    with pytest.raises(MoATrainError, match="not both"):
        LRSchedule.from_config(both, 1e-3, total=200, steps_per_epoch=100)


def test_lr_absolute_or_scaled_by_batch() -> None:
    assert learning_rate(OmegaConf.create({"lr": None, "blr": 6e-3}), 32) == pytest.approx(7.5e-4)
    assert learning_rate(OmegaConf.create({"lr": 2e-3, "blr": 6e-3}), 32) == 2e-3
    with pytest.raises(MoATrainError):
        learning_rate(OmegaConf.create({"lr": None, "blr": None}), 32)


def test_weight_decay_only_on_matrices() -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2, bias=False)
    )
    model[1].weight.requires_grad_(False)  # frozen parameters stay out of the optimizer
    opt_cfg = OmegaConf.create({"name": "adamw", "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.02})
    optimizer = build_optimizer(model, opt_cfg, lr=1e-3)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].bias)}
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_token_cross_entropy_is_the_summed_shifted_loss() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 3, 5]])
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="mean"
    )
    n_targets = int((labels[:, 1:] != -100).sum())
    assert token_cross_entropy(logits, labels) == pytest.approx(float(expected) * n_targets, rel=1e-6)


# ----------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from moa_train.models.base import load_tokenizer

    return load_tokenizer("smollm2")


def _plan(tokenizer, overrides: list[str], world: int = 1, rank: int = 0) -> BatchPlan:
    cfg = compose_config(TINY + overrides)
    return BatchPlan(cfg, tokenizer, world, rank, load_splits(cfg.data))


def test_batch_plan_shards_one_global_batch_over_processes(tokenizer) -> None:
    one = _plan(tokenizer, ["trainer.micro_batch_size=2", "trainer.effective_batch_size=4"])
    ranks = [
        _plan(tokenizer, ["trainer.micro_batch_size=2", "trainer.effective_batch_size=4"], 2, r)
        for r in (0, 1)
    ]
    assert one.accumulation == 2 and ranks[0].accumulation == 1
    for k in range(3):
        single = one.step(0, k)
        rows = {
            tuple(ids[m.bool()].tolist())
            for mb in single.micro_batches
            for ids, m in zip(mb["input_ids"], mb["attention_mask"])
        }
        split = {
            tuple(ids[m.bool()].tolist())
            for plan in ranks
            for mb in plan.step(0, k).micro_batches
            for ids, m in zip(mb["input_ids"], mb["attention_mask"])
        }
        assert rows == split and len(rows) == 4
        assert single.target_tokens == ranks[0].step(0, k).target_tokens == ranks[1].step(0, k).target_tokens


def test_data_order_follows_data_seed_not_init_seed(tokenizer) -> None:
    base = _plan(tokenizer, [])
    assert base.order(0) == _plan(tokenizer, ["seed=123"]).order(0)
    assert base.order(0) != _plan(tokenizer, ["data.seed=123"]).order(0)
    assert base.order(0) != base.order(1)  # a new order every epoch
    assert sorted(base.order(1)) == list(range(len(base.examples)))


def test_length_grouped_batches_have_similar_lengths(tokenizer) -> None:
    plain = _plan(tokenizer, ["trainer.micro_batch_size=4", "trainer.effective_batch_size=4"])
    grouped = _plan(
        tokenizer,
        ["trainer.micro_batch_size=4", "trainer.effective_batch_size=4", "data.group_by_length=true"],
    )
    assert sorted(grouped.order(0)) == sorted(plain.order(0)) and grouped.order(0) != plain.order(0)

    def padding(plan: BatchPlan) -> int:
        return sum(
            int((1 - mb["attention_mask"]).sum()) for k in range(50) for mb in plan.step(0, k).micro_batches
        )

    assert padding(grouped) < padding(plain)


def test_batch_plan_rejects_a_batch_that_does_not_divide(tokenizer) -> None:
    with pytest.raises(MoATrainError, match="multiple of"):
        _plan(tokenizer, ["trainer.micro_batch_size=3", "trainer.effective_batch_size=4"])


# ----------------------------------------------------------------------------------------------------
# Router telemetry
# ----------------------------------------------------------------------------------------------------

STATS = {
    "layers": [0, 1],
    "experts": ["q", "pa"],
    "tokens": 10,
    "mean_gate": [[0.2, 0.6], [0.5, float("nan")]],
    "active_frac": [[1.0, 0.5], [0.004, float("nan")]],
    "active_per_token": [1.5, 0.004],
    "entropy": [0.6, 0.0],
    "mean_threshold": [0.25, 0.3],
}


def test_router_metrics_per_layer_and_expert() -> None:
    m = router_metrics(STATS)
    assert m["router/L0/q/mean_gate"] == 0.2 and m["router/L0/pa/active_frac"] == 0.5
    assert "router/L1/pa/mean_gate" not in m  # layer 1 has no parallel adapter
    assert m["router/L0/gate_cv"] == pytest.approx(0.2 / 0.4)  # std 0.2 over mean 0.4
    assert m["router/L0/gate_max_over_mean"] == pytest.approx(1.5)
    assert m["router/L0/load_cv"] == pytest.approx(0.25 / 0.75)
    assert m["router/L0/load_max_over_mean"] == pytest.approx(1.0 / 0.75)
    assert m["router/active_per_token"] == pytest.approx((1.5 + 0.004) / 2)
    assert m["router/mean_threshold"] == pytest.approx(0.275)
    assert m["router/entropy"] == pytest.approx(0.3)


class _FakeModel:
    def __init__(self) -> None:
        self.reads = 0

    def router_stats(self, reset: bool = False) -> dict:
        self.reads += 1
        return STATS


def test_dead_expert_warning_after_n_quiet_intervals(tmp_path: Path, caplog) -> None:
    cfg = compose_config(TINY + ["trainer.dead_expert_intervals=3", "trainer.heatmap_every_steps=2"])
    logger = RunLogger(Backend(), tmp_path)
    tc = cfg.trainer
    telemetry = RouterLog(
        tmp_path, logger, heatmap_every=tc.heatmap_every_steps, dead_threshold=tc.dead_expert_threshold,
        dead_intervals=tc.dead_expert_intervals,
    )  # fmt: skip
    model = _FakeModel()
    with caplog.at_level(logging.WARNING, logger="moa_train.train.recipe"):
        for step in (1, 2):
            telemetry.router(model, step)
        assert not [r for r in caplog.records if "dead expert" in r.message]
        telemetry.router(model, 3)
    warnings = [r.message for r in caplog.records if "dead expert" in r.message]
    assert len(warnings) == 1 and "layer 1 expert q" in warnings[0]
    assert (tmp_path / "router" / "heatmap-step-2.png").is_file()  # every 2 steps
    assert not (tmp_path / "router" / "heatmap-step-3.png").exists()
    logger.close()
    assert read_metrics(tmp_path)[0]["router/heatmap"].endswith("heatmap-step-2.png")


# ----------------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------------


class _Broken(Backend):
    name = "broken"

    def log(self, metrics, step):
        raise ConnectionError("network down")


def test_a_failing_logger_never_stops_training(tmp_path: Path, caplog) -> None:
    logger = RunLogger(_Broken(), tmp_path)
    with caplog.at_level(logging.WARNING):
        logger.log({"train/loss": 1.0}, 1)
        logger.log({"train/loss": 0.5}, 2)
    logger.close()
    assert [r["train/loss"] for r in read_metrics(tmp_path)] == [1.0, 0.5]  # the mirror keeps going
    assert sum("switching it off" in r.message for r in caplog.records) == 1


def test_wandb_without_key_logs_offline(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = OmegaConf.create({"name": "wandb", "project": "moa_train_test", "mode": "auto"})
    logger = make_logger(cfg, tmp_path, {"seed": 0})
    assert logger.backend.name == "wandb"
    logger.log({"train/loss": 2.0}, 1)
    logger.close()
    assert list((tmp_path / "wandb").glob("offline-run-*")), "expected an offline W&B run"
    assert read_metrics(tmp_path) == [{"step": 1, "train/loss": 2.0}]


# ----------------------------------------------------------------------------------------------------
# End to end (tiny random Llama, in this process)
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """8 steps, log every 2, checkpoints every 4 (keep 2), TensorBoard, a short final evaluation."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    train_in_process(run_dir, TINY + ["logger=tensorboard", "trainer.keep_last=1"])
    return run_dir


def test_run_dir_layout(tiny_run: Path) -> None:
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "final/adapter_model.safetensors"):
        assert (tiny_run / name).is_file(), name
    assert [p.name for p in sorted((tiny_run / "checkpoints").iterdir())] == ["step-8"]  # keep_last=1
    assert OmegaConf.load(tiny_run / "config.yaml").name == "tiny"
    assert sorted(p.name for p in (tiny_run / "router").glob("*.png")) == [
        "heatmap-step-4.png",
        "heatmap-step-8.png",
    ]


def test_checkpoint_holds_adapters_model_node_and_training_state(tiny_run: Path) -> None:
    ckpt = tiny_run / "checkpoints" / "step-8"
    files = {p.name for p in ckpt.iterdir()}
    assert files == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "scheduler.json",
        "scaler.json",
        "rng-rank0.safetensors",
        "rng-rank0.json",
        "trainer_state.json",
    }  # fmt: skip -- safetensors + JSON only: no pickles
    adapter_config = json.loads((ckpt / "adapter_config.json").read_text())
    assert adapter_config["model"]["name"] == "tiny_random"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["step_in_epoch"] == 8 and state["tokens_seen"] > 0
    moments = load_file(str(ckpt / "optimizer.safetensors"))
    assert any(k.endswith("exp_avg_sq") for k in moments) and all(
        v.dtype == torch.float32 for v in moments.values()
    )
    assert json.loads((ckpt / "scheduler.json").read_text())["last_epoch"] == 8


def test_metrics_jsonl_and_tensorboard_agree(tiny_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = [r for r in read_metrics(tiny_run) if "train/loss" in r]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/aux_loss"):
        assert all(math.isfinite(r[key]) for r in records), key
    last = records[-1]
    for key in ("router/L0/q/mean_gate", "router/L1/pa/active_frac", "router/load_cv", "router/gate_max_over_mean",
                "router/active_per_token", "router/entropy", "router/L0/entropy"):  # fmt: skip
        assert key in last, key
    events = EventAccumulator(str(tiny_run / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(
        [r["train/loss"] for r in records]
    )
    assert len(events.Images("router/heatmap")) == 2
    assert events.Scalars("eval/tuned_accuracy")


def test_final_eval_reports_base_and_tuned(tiny_run: Path) -> None:
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 8
    assert 0.0 <= summary["base_accuracy"] <= 1.0 and 0.0 <= summary["tuned_accuracy"] <= 1.0
    assert summary["eval_records"] == 8


def test_gradient_accumulation_equals_one_big_batch(tmp_path: Path) -> None:
    """Loss normalisation by the global target count: 2 x 2 accumulated == 4 in one micro-batch."""
    common = (
        TINY
        + NO_EVAL
        + ["trainer.max_steps=3", "trainer.effective_batch_size=4", "trainer.save_every_steps=null"]
    )
    train_in_process(tmp_path / "a", common + ["trainer.micro_batch_size=2"])
    train_in_process(tmp_path / "b", common + ["trainer.micro_batch_size=4"])
    a = load_file(str(tmp_path / "a" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "adapter_model.safetensors"))
    lora_b = [v for n, v in a.items() if ".lora." in n and v.abs().sum() == 0]
    assert len(lora_b) == 0, "LoRA B starts at 0: the run must have moved every adapter"
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_keeps_adapters_fp32_and_checkpointing_matches(tmp_path: Path) -> None:
    common = TINY + NO_EVAL + ["trainer.max_steps=2", "trainer.save_every_steps=null"]
    summary = train_in_process(tmp_path / "bf16", common + ["trainer.precision=bf16"])
    assert math.isfinite(summary["train/loss"])
    weights = load_file(str(tmp_path / "bf16" / "final" / "adapter_model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float32}
    train_in_process(tmp_path / "plain", common)
    train_in_process(tmp_path / "ckpt", common + ["trainer.gradient_checkpointing=true"])
    plain = load_file(str(tmp_path / "plain" / "final" / "adapter_model.safetensors"))
    ckpt = load_file(str(tmp_path / "ckpt" / "final" / "adapter_model.safetensors"))
    for name in plain:
        torch.testing.assert_close(plain[name], ckpt[name], rtol=1e-5, atol=1e-7, msg=name)
