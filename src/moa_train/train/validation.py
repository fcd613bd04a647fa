"""Validation during training: the held-out validation split, the validation pass, the best checkpoint
and early stopping.

Options (``configs/train.yaml`` documents them):

* ``data.val_size``: an integer (records) or a fraction in (0, 1) of the training records held out as the
  validation split, chosen from ``data.seed`` (the same records every run); ``data.val_path``: a file (or
  list) of validation records instead. Validation records never overlap the held-out test split: a
  record whose (instruction, input) is also a test record is not used.
* ``trainer.eval_every_steps``: the validation pass runs every N optimizer steps and after the last one;
  it logs ``val/loss`` (mean token cross-entropy, the training loss without aux terms), with
  ``trainer.val_accuracy_records`` > 0 also ``val/accuracy`` (generation on the first N validation
  records, scored like the final evaluation), plus ``val/router/...``: the router statistics of the
  validation pass, counted apart (training telemetry is put aside and restored around it).
* ``trainer.best_metric`` (``val/loss`` | ``val/accuracy``) and ``trainer.best_mode`` (``min`` | ``max``):
  each improvement is saved to ``<run dir>/best/`` (a full checkpoint, never pruned);
  ``summary.json`` gets ``best_step`` and ``best_metric``.
* ``trainer.early_stopping.patience``: stop after that many validation passes in a row without an
  improvement larger than ``trainer.early_stopping.min_delta``; the run saves, and ``summary.json``
  records ``stopped_early: true`` and the last step.

The tracker's state (best value and step, passes without improvement) travels in every checkpoint
(``TrainState.extra["validation"]``), so a resumed run continues the same comparisons.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch

from moa_train.data import TrainCollator, encode_dataset, epoch_order, load_records
from moa_train.data.packing import check_flags
from moa_train.errors import MoATrainError
from moa_train.eval import evaluate_records
from moa_train.train.metrics import router_metrics
from moa_train.train.steps import loss_logits_kwargs, token_cross_entropy

METRICS = ("val/loss", "val/accuracy")
MODES = ("min", "max")
BEST_DIR = "best"

log = logging.getLogger(__name__)


def _get(node: Any, key: str, default: Any = None) -> Any:
    value = node.get(key, default) if node is not None else default
    return default if value is None else value


def check_settings(cfg: Any) -> None:
    """One-line errors for the validation options (called before any data is read or model loaded), and
    for data.packing / data.streaming."""
    check_flags(cfg)
    dc, tc = cfg.data, cfg.trainer
    size, path = dc.get("val_size"), dc.get("val_path")
    if size is not None and path is not None:
        raise MoATrainError("set data.val_size (held out from training) or data.val_path, not both")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int | float):
            raise MoATrainError(
                f"data.val_size={size!r} must be a record count (>= 1) or a fraction in (0, 1)"
            )
        if (isinstance(size, float) and not 0 < size < 1) or (isinstance(size, int) and size < 1):
            raise MoATrainError(
                f"data.val_size={size!r} must be a record count (>= 1) or a fraction in (0, 1)"
            )
    every = tc.get("eval_every_steps")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise MoATrainError(f"trainer.eval_every_steps={every!r} must be a step count >= 1 or null")
    validating = size is not None or path is not None
    if every is not None and not validating:
        raise MoATrainError(
            "trainer.eval_every_steps needs a validation split: set data.val_size=<records or fraction> "
            "or data.val_path=<file>"
        )
    records = tc.get("val_accuracy_records")
    if records is not None and (isinstance(records, bool) or not isinstance(records, int) or records < 0):
        raise MoATrainError(f"trainer.val_accuracy_records={records!r} must be a record count >= 0 or null")
    metric, mode = str(_get(tc, "best_metric", "val/loss")), str(_get(tc, "best_mode", "min"))
    if metric not in METRICS:
        raise MoATrainError(f"trainer.best_metric={metric!r} is not known; choose {' or '.join(METRICS)}")
    if mode not in MODES:
        raise MoATrainError(f"trainer.best_mode={mode!r} is not known; choose min or max")
    if metric == "val/accuracy" and not records:
        raise MoATrainError("trainer.best_metric=val/accuracy needs trainer.val_accuracy_records > 0")
    stopping = tc.get("early_stopping") or {}
    patience, delta = stopping.get("patience"), stopping.get("min_delta", 0.0)
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise MoATrainError(f"trainer.early_stopping.patience={patience!r} must be a count >= 1 or null")
    if delta is not None and (isinstance(delta, bool) or not isinstance(delta, int | float) or delta < 0):
        raise MoATrainError(f"trainer.early_stopping.min_delta={delta!r} must be a number >= 0")
    if patience is not None and every is None:
        raise MoATrainError(
            "trainer.early_stopping.patience needs trainer.eval_every_steps (and a validation split)"
        )


def _key(record: dict[str, Any]) -> str:
    """What a record asks: its conversation before the last reply (chat), else instruction and input."""
    messages = record.get("messages")
    if messages:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return json.dumps(messages[:last], sort_keys=True)
    return json.dumps([str(record.get("instruction", "")), str(record.get("input", ""))])


def split_validation(splits: dict[str, list], cfg: Any) -> dict[str, list]:
    """``splits`` with a ``val`` split: ``data.val_path`` records, or ``data.val_size`` training records
    held out (a permutation from ``data.seed``; the rest stay in training, in their order)."""
    check_settings(cfg)
    dc = cfg.data
    size, path = dc.get("val_size"), dc.get("val_path")
    if size is None and path is None:
        return splits
    test_keys = {_key(r) for r in splits.get("test", [])}
    train = splits["train"]
    if path is not None:
        paths = [path] if isinstance(path, str) else list(path)
        val = [r for p in paths for r in load_records(str(p), split="train")]
    else:
        count = int(size) if isinstance(size, int) else int(round(float(size) * len(train)))
        if not 1 <= count < len(train):
            raise MoATrainError(
                f"data.val_size={size} holds out {count} of the {len(train)} training records; "
                "it must leave at least one record on each side"
            )

        chosen = set(
            epoch_order(len(train), int(_get(dc, "seed", 0)) + 7919, 0)[:count]
        )  # not epoch 0's order
        val = [r for i, r in enumerate(train) if i in chosen]
        train = [r for i, r in enumerate(train) if i not in chosen]
    val = [r for r in val if _key(r) not in test_keys]
    if not val:
        raise MoATrainError(
            "the validation split is empty once records that are also test records are removed"
        )
    return {**splits, "train": train, "val": val}


@contextlib.contextmanager
def telemetry_apart(model: Any) -> Iterator[None]:
    """Put the training router telemetry aside, count the block's forwards on a clean slate, restore."""
    telemetries = [
        m.telemetry
        for m in model.base_model.modules()
        if hasattr(m, "telemetry") and type(m).__name__ == "Router"
    ]
    saved = [{k: b.clone() for k, b in t.named_buffers()} for t in telemetries]
    for t in telemetries:
        t.reset()
    try:
        yield
    finally:
        with torch.no_grad():
            for t, buffers in zip(telemetries, saved):
                for name, buffer in t.named_buffers():
                    buffer.copy_(buffers[name])


class Tracker:
    """Best value, its step, and passes without improvement; saved as ``TrainState.extra["validation"]``."""

    def __init__(self, cfg: Any, saved: dict[str, Any] | None = None) -> None:
        tc = cfg.trainer
        stopping = tc.get("early_stopping") or {}
        self.metric = str(_get(tc, "best_metric", "val/loss"))
        self.mode = str(_get(tc, "best_mode", "min"))
        self.patience = stopping.get("patience")
        self.min_delta = float(stopping.get("min_delta") or 0.0)
        saved = saved or {}
        self.best: float | None = saved.get("best")
        self.best_step: int | None = saved.get("best_step")
        self.bad: int = int(saved.get("bad", 0))

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad}

    def update(self, metrics: dict[str, float], step: int) -> tuple[bool, bool]:
        """(improved, stop now) after a validation pass at ``step``."""
        value = metrics.get(self.metric)
        if value is None or math.isnan(value):
            raise MoATrainError(f"trainer.best_metric={self.metric} was not computed by the validation pass")
        sign = 1.0 if self.mode == "min" else -1.0
        improved = self.best is None or sign * (self.best - value) > self.min_delta
        if improved:
            self.best, self.best_step, self.bad = float(value), step, 0
        else:
            self.bad += 1
        return improved, self.patience is not None and self.bad >= int(self.patience)


def validation_loss(
    model: Any,
    examples: list[dict[str, list[int]]],
    collate: Any,
    micro_batch: int,
    autocast: Any,
    device: Any,
) -> dict[str, float]:
    """Mean token cross-entropy over all validation examples (every process computes the whole split, so no
    collective is needed and FSDP ranks run the same forwards), and the validation router statistics."""
    was_training = model.training
    model.eval()
    total, targets = torch.zeros((), device=device), 0
    with telemetry_apart(model), torch.no_grad():
        for start in range(0, len(examples), micro_batch):
            batch = {k: t.to(device) for k, t in collate(examples[start : start + micro_batch]).items()}
            keep, positions = loss_logits_kwargs(model, batch["labels"])  # the LM head on targets only
            with autocast:
                out = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    instance_mask=(batch["labels"] == -100) & batch["attention_mask"].bool(), use_cache=False,
                    **keep,
                )  # fmt: skip
            total += token_cross_entropy(out.logits, batch["labels"], positions)
            targets += int((batch["labels"][:, 1:] != -100).sum())
        stats = model.router_stats()
    model.train(was_training)
    metrics = {"val/loss": float(total) / max(targets, 1)}
    if stats.get("experts") and stats.get("tokens"):
        metrics.update({f"val/{k}": v for k, v in router_metrics(stats).items() if k.count("/") == 1})
    return metrics


def validation_accuracy(cfg: Any, model: Any, tokenizer: Any, records: list[dict], autocast: Any) -> float:
    """Generation accuracy on the first ``trainer.val_accuracy_records`` validation records, with the
    final evaluation's decoding settings and the evaluator moa-eval uses (telemetry off)."""
    records = records[: int(cfg.trainer.val_accuracy_records)]
    if any(not str(r.get("answer", "")).strip() for r in records):
        raise MoATrainError(
            "trainer.val_accuracy_records > 0 needs validation records with an 'answer' field; "
            "set trainer.val_accuracy_records=0 (val/loss only)"
        )
    ec = cfg.final_eval
    was_training = model.training
    model.eval()
    model.set_telemetry(False)
    try:
        with torch.no_grad(), autocast:
            result = evaluate_records(
                model, tokenizer, records, decoding=ec.decoding, batch_size=int(ec.batch_size),
                max_new_tokens=ec.get("max_new_tokens"), template=str(cfg.data.get("template") or "alpaca"),
            )  # fmt: skip
    finally:
        model.set_telemetry(True)
        model.train(was_training)
    return float(result["accuracy"])


class ValidationLoop:
    """What the training loop calls: ``after_step`` runs a due validation pass, logs it, saves ``best/`` on
    an improvement and says whether early stopping ends the run; ``summary`` gives the summary fields."""

    def __init__(
        self,
        cfg: Any,
        run_dir: Any,
        tokenizer: Any,
        splits: dict[str, list],
        state: Any,
        autocast: Any,
        device: Any,
    ) -> None:
        self.cfg, self.run_dir, self.tokenizer, self.autocast, self.device = (
            cfg,
            run_dir,
            tokenizer,
            autocast,
            device,
        )
        tc, dc = cfg.trainer, cfg.data
        self.every = tc.get("eval_every_steps")
        self.records = splits.get("val") or []
        self.enabled = self.every is not None and bool(self.records)
        saved = state.extra.get("validation") or {}
        self.tracker = Tracker(cfg, saved)
        self.micro_batch = int(tc.micro_batch_size)
        # a run resumed from its last (or early-stopping) checkpoint reports the pass that checkpoint saw
        self.stopped_early = bool(saved.get("stopped_early", False))
        self.last: dict[str, float] = dict(saved.get("last") or {})
        if not self.enabled:
            return

        self.examples, _ = encode_dataset(
            self.records, tokenizer, int(dc.max_len), bool(dc.get("train_on_inputs", False)),
            template=str(dc.get("template") or "alpaca"),
        )  # fmt: skip
        if not self.examples:
            raise MoATrainError(f"no validation record fits data.max_len={dc.max_len}; raise data.max_len")
        self.collate = TrainCollator(tokenizer.pad_token_id)

    def after_step(self, model: Any, state: Any, total_steps: int, logger: Any, save_best: Any) -> bool:
        """Run the validation pass if due at ``state.step``; True when early stopping ends the run here."""
        if not self.enabled or (state.step % int(self.every) and state.step != total_steps):
            return False
        metrics = validation_loss(
            model, self.examples, self.collate, self.micro_batch, self.autocast, self.device
        )
        if self.cfg.trainer.get("val_accuracy_records"):
            metrics["val/accuracy"] = validation_accuracy(
                self.cfg, model, self.tokenizer, self.records, self.autocast
            )
        self.last = {k: v for k, v in metrics.items() if k in METRICS}
        improved, stop = self.tracker.update(metrics, state.step)
        self.stopped_early = stop and state.step < total_steps
        state.extra["validation"] = {
            **self.tracker.state(),
            "last": self.last,
            "stopped_early": self.stopped_early,
        }
        metrics["val/best"] = self.tracker.best
        if logger is not None:
            logger.log(metrics, state.step)
        log.info(
            "step %d  %s %.4f  (best %.4f at step %d)", state.step, self.tracker.metric,
            metrics[self.tracker.metric], self.tracker.best, self.tracker.best_step,
        )  # fmt: skip
        if improved:
            save_best(self.run_dir / BEST_DIR)
        if self.stopped_early:
            log.warning(
                "early stopping at step %d: %s has not improved by more than %g for %d validation passes",
                state.step, self.tracker.metric, self.tracker.min_delta, self.tracker.bad,
            )  # fmt: skip
            return True
        return False

    def summary(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        return {
            "best_metric_name": self.tracker.metric,
            "best_metric": self.tracker.best,
            "best_step": self.tracker.best_step,
            "best_checkpoint": str(self.run_dir / BEST_DIR),
            "stopped_early": self.stopped_early,
            **self.last,  # the last pass's val/loss (and val/accuracy)
        }
