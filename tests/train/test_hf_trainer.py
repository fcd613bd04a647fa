"""MoA inside transformers.Trainer and TRL's SFTTrainer / DPOTrainer (moa_train.train.hf_trainer), on a tiny model."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from moa_train import MoAConfig, get_moa_model
from moa_train.core.model import MoAModel
from moa_train.train.hf_trainer import MoAReference, MoATrainer, moa_trainer
from tiny_models import char_tokenizer, tiny_model

datasets = pytest.importorskip("datasets")


def moa(seed: int = 0) -> MoAModel:
    config = MoAConfig.from_dict({"router": {"kind": "linear", "load_balance_coef": 0.5}})
    model = get_moa_model(tiny_model(seed=seed), config)
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # non-zero B so that the adapters change the logits
        for name, param in model.adapter_state_dict().items():
            if name.endswith("lora_B") or ".B" in name:
                param.normal_(0, 0.02)
    return model


def lm_dataset(tok: Any, n: int = 8) -> Any:
    rows = []
    for i in range(n):
        ids = tok(f"{i} + {i} = {2 * i}")["input_ids"]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids, "note": "dropped"})
    return datasets.Dataset.from_list(rows)


class KeepLogs(TrainerCallback):
    """What a report_to logger receives."""

    def __init__(self, into: list[dict]) -> None:
        self.into = into

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        self.into.append(dict(logs or {}))


def args(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="steps",
        disable_tqdm=True,
        **extra,
    )


def test_forward_signature_names_the_usual_arguments() -> None:
    params = inspect.signature(MoAModel.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "position_ids", "instance_mask"} <= set(params)
    model = moa()
    ids = torch.tensor([[5, 6, 7]])
    with model.disable_adapter():  # PEFT's spelling, next to disable_adapters()
        plain = model(input_ids=ids).logits
    assert torch.equal(plain, tiny_model()(input_ids=ids).logits)
    assert not torch.allclose(model(ids).logits, plain)


def test_trainer_four_steps_adapter_only_checkpoints_round_trip(tmp_path: Path) -> None:
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

    tok = char_tokenizer()
    model = moa()
    before = {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}
    logged: list[dict] = []
    trainer = MoATrainer(
        model=model,
        args=TrainingArguments(**args(tmp_path, max_steps=4, save_steps=2, gradient_accumulation_steps=2)),
        train_dataset=lm_dataset(tok),  # no remove_unused_columns workaround: "note" is dropped
        data_collator=DataCollatorForSeq2Seq(tok, padding=True),
    )
    trainer.add_callback(KeepLogs(logged))  # appended after MoACallback, like a report_to logger
    trainer.train()
    assert trainer.state.global_step == 4
    # the aux loss entered the loss and, with the router telemetry, the loggers' view of each log line
    train_logs = [row for row in logged if "loss" in row]
    assert len(train_logs) == 4 and all(row["aux_loss"] > 0 for row in train_logs)
    assert all("router/entropy" in row and "aux/load_balance" in row for row in train_logs)
    # checkpoints: the adapter files only (Trainer's optimizer / rng / args files are Trainer's)
    for step in (2, 4):
        ckpt = tmp_path / "out" / f"checkpoint-{step}"
        names = {p.name for p in ckpt.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names
        assert not names & {"model.safetensors", "pytorch_model.bin"}
        assert set(load_file(ckpt / "adapter_model.safetensors")) == set(model.adapter_state_dict())
    trained = model.adapter_state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in before)
    loaded = MoAModel.from_pretrained(tiny_model(), tmp_path / "out" / "checkpoint-4")
    ids = torch.tensor([[5, 9, 12, 40, 41]])
    model.eval()
    assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)
    # resuming reads the adapter files back (a fresh model, trained two more steps from step 4)
    fresh = moa(seed=3)
    again = MoATrainer(
        model=fresh,
        args=TrainingArguments(**args(tmp_path, max_steps=6, save_steps=2, gradient_accumulation_steps=2)),
        train_dataset=lm_dataset(tok),
        data_collator=DataCollatorForSeq2Seq(tok, padding=True),
    )
    again.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    assert again.state.global_step == 6


def test_aux_loss_is_added_once_per_optimizer_step(tmp_path: Path) -> None:
    """With gradient accumulation the aux term is averaged over micro-batches, as the CE is."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tok = char_tokenizer()
    model = moa()
    trainer = MoATrainer(
        model=model,
        args=TrainingArguments(**args(tmp_path, max_steps=1, gradient_accumulation_steps=2)),
        train_dataset=lm_dataset(tok, 4),
        data_collator=DataCollatorForSeq2Seq(tok, padding=True),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    items = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()) * 2)  # tokens of both micro-batches
    for num_items in (None, items):
        plain = Trainer.compute_loss(trainer, model, dict(batch), num_items_in_batch=num_items).detach()
        total = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items).detach()
        aux = model.aux_loss().detach()
        assert float(aux) > 0
        # Trainer divides the loss by the 2 accumulation steps itself, unless the model already normalised
        # it over both micro-batches (num_items_in_batch): then the aux term comes divided already
        normalised = num_items is not None and trainer.model_accepts_loss_kwargs
        assert float(total - plain) == pytest.approx(float(aux) / (2 if normalised else 1), rel=1e-4)


def test_sft_trainer_two_steps(tmp_path: Path) -> None:
    trl = pytest.importorskip("trl")
    tok = char_tokenizer()
    model = moa()
    data = datasets.Dataset.from_list(
        [{"prompt": f"{i} + {i} =", "completion": f" {2 * i}"} for i in range(8)]
    )
    trainer = moa_trainer(trl.SFTTrainer)(
        model=model,
        args=trl.SFTConfig(**args(tmp_path, max_steps=2, save_steps=2), max_length=32),
        train_dataset=data,
        processing_class=tok,
    )
    before = {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not torch.equal(before[k], v) for k, v in model.adapter_state_dict().items())
    names = {p.name for p in (tmp_path / "out" / "checkpoint-2").iterdir()}
    assert "adapter_model.safetensors" in names and "model.safetensors" not in names
    assert all(
        torch.isfinite(torch.tensor(row["loss"])) for row in trainer.state.log_history if "loss" in row
    )


def test_dpo_trainer_two_steps_reference_is_the_base(tmp_path: Path) -> None:
    trl = pytest.importorskip("trl")
    tok = char_tokenizer()
    model = moa()
    data = datasets.Dataset.from_list(
        [{"prompt": f"{i} + {i} =", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1}"} for i in range(8)]
    )
    # SFT first, then DPO on the same model (the docs' recipe): each trainer installs its own fused head
    sft = datasets.Dataset.from_list([{"prompt": "1 + 1 =", "completion": " 2"}] * 2)
    sft_args = trl.SFTConfig(**args(tmp_path / "sft", max_steps=1), max_length=32, bf16=False)
    moa_trainer(trl.SFTTrainer)(model=model, args=sft_args, train_dataset=sft, processing_class=tok)
    trainer = moa_trainer(trl.DPOTrainer)(
        model=model,
        args=trl.DPOConfig(**args(tmp_path, max_steps=2, save_steps=2), max_length=32, bf16=False),
        train_dataset=data,
        processing_class=tok,
    )
    assert isinstance(trainer.ref_model, MoAReference)
    ids = torch.tensor([[5, 9, 12, 40]])
    with torch.no_grad():
        ref = trainer.ref_model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
        assert torch.equal(ref, plain) and not torch.allclose(model(input_ids=ids).logits, plain)
    logged: list[dict] = []
    trainer.add_callback(KeepLogs(logged))
    trainer.train()
    assert trainer.state.global_step == 2
    train_logs = [row for row in logged if "loss" in row]
    assert len(train_logs) == 2 and all(row["aux_loss"] > 0 and "router/entropy" in row for row in train_logs)
    names = {p.name for p in (tmp_path / "out" / "checkpoint-2").iterdir()}
    assert "adapter_model.safetensors" in names and "model.safetensors" not in names
