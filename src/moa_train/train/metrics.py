"""Training metrics: on-device loss sums read at log time (``Meter``) and router telemetry per log
interval (``RouterLog``: per layer x expert scalars, dead-expert warnings, heat-maps)."""

from __future__ import annotations

import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class Meter:
    """On-device sums between log intervals; read (one sync) only when logging."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.last_loss: float | None = None
        self._reset()

    def _reset(self) -> None:
        self.ce = torch.zeros((), device=self.device)
        self.aux = torch.zeros((), device=self.device)
        self.aux_parts: dict[str, torch.Tensor] = {}
        self.micro_steps = 0
        self.tokens = 0
        self.targets = 0
        self.since = time.perf_counter()

    def add(self, ce: torch.Tensor, aux: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        self.ce += ce.detach()
        self.aux += aux.detach()
        for name, value in parts.items():
            self.aux_parts[name] = self.aux_parts.get(name, 0) + value.detach()
        self.micro_steps += 1

    def read(self, accelerator: Any, lr: float, grad_norm: torch.Tensor | None) -> dict[str, float]:
        ce = accelerator.reduce(self.ce, "sum") if accelerator.num_processes > 1 else self.ce
        seconds = max(time.perf_counter() - self.since, 1e-9)
        n = max(self.micro_steps, 1)
        metrics = {
            "train/loss": float(ce) / max(self.targets, 1),  # mean token CE over the interval
            "train/lr": lr,
            "train/tokens_per_s": self.tokens / seconds,
            "train/aux_loss": float(self.aux) / n,  # weighted, as added to the loss
        }
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        for name, value in self.aux_parts.items():
            metrics[f"train/aux/{name}"] = float(value) / n  # unweighted, mean per forward
        self.last_loss = metrics["train/loss"]
        self._reset()
        return metrics


class RouterLog:
    """Router statistics per log interval: per layer x expert metrics, dead-expert warnings (an expert
    active on fewer than ``dead_threshold`` of the tokens for ``dead_intervals`` intervals) and a
    layer x expert heat-map of mean gates every ``heatmap_every`` steps (PNG + logger; 0: at the end only)."""

    def __init__(
        self,
        run_dir: Path,
        logger: Any,
        *,
        heatmap_every: int | None = 0,
        dead_threshold: float = 0.01,
        dead_intervals: int = 5,
    ) -> None:
        self.run_dir, self.logger = run_dir, logger
        self.heatmap_every = int(heatmap_every or 0)
        self.dead_threshold = float(dead_threshold)
        self.dead_intervals = int(dead_intervals)
        self.quiet: dict[tuple[int, str], int] = {}
        self.last_heatmap = 0  # heat-maps at the first log step at or after each multiple of the period

    def router(self, model: Any, step: int, final: bool = False) -> dict[str, float]:
        stats = model.router_stats(reset=True)  # every rank resets; rank 0's statistics are logged
        if self.logger is None or not stats.get("experts") or not stats.get("tokens"):
            return {}
        metrics = router_metrics(stats)
        self._watch_dead(stats, step)
        # every heatmap_every_steps, and always at the end of training (a short run gets one too)
        due = self.heatmap_every and step // self.heatmap_every > self.last_heatmap
        if due or final:
            self.last_heatmap = step // self.heatmap_every if self.heatmap_every else step
            # deferred: matplotlib loads only when a heatmap is drawn
            from moa_train.eval.plots import save_heatmap

            path = self.run_dir / "router" / f"heatmap-step-{step}.png"
            save_heatmap(
                stats["mean_gate"], stats["layers"], stats["experts"], path, f"mean gate, step {step}"
            )
            self.logger.log_image("router/heatmap", path, step)
        return metrics

    def _watch_dead(self, stats: dict[str, Any], step: int) -> None:
        for layer, row in zip(stats["layers"], stats["active_frac"]):
            for expert, active in zip(stats["experts"], row):
                if math.isnan(active):
                    continue
                key = (layer, expert)
                self.quiet[key] = self.quiet.get(key, 0) + 1 if active < self.dead_threshold else 0
                if self.quiet[key] == self.dead_intervals:
                    log.warning(
                        "dead expert: layer %d expert %s has been active on < %.1f%% of tokens for %d "
                        "log intervals (step %d)",
                        layer, expert, 100 * self.dead_threshold, self.dead_intervals, step,
                    )  # fmt: skip


def router_metrics(stats: dict[str, Any]) -> dict[str, float]:
    """Flatten ``router_stats()`` into ``router/...`` scalars.

    Per layer: each expert's mean gate and active fraction; the spread of the gate mass
    (``gate_cv``, ``gate_max_over_mean``) and of the token load = active fraction (``load_cv``,
    ``load_max_over_mean``); active experts per token, router entropy, mean threshold. The
    un-prefixed ``router/<name>`` keys average over layers (max/mean: the worst layer).
    """
    out: dict[str, float] = {}
    per_layer: dict[str, list[float]] = {}
    thresholds = stats.get("mean_threshold") or [None] * len(stats["layers"])
    for i, layer in enumerate(stats["layers"]):
        gates, loads = [], []
        for expert, gate, active in zip(stats["experts"], stats["mean_gate"][i], stats["active_frac"][i]):
            if math.isnan(gate):
                continue  # this layer has no such expert
            out[f"router/L{layer}/{expert}/mean_gate"] = gate
            out[f"router/L{layer}/{expert}/active_frac"] = active
            gates.append(gate)
            loads.append(active)
        values = {
            "gate_cv": _cv(gates),
            "gate_max_over_mean": _max_over_mean(gates),
            "load_cv": _cv(loads),
            "load_max_over_mean": _max_over_mean(loads),
            "active_per_token": stats["active_per_token"][i],
            "entropy": stats["entropy"][i],
            "mean_threshold": thresholds[i],
        }
        for name, value in values.items():
            if value is not None and not math.isnan(value):
                out[f"router/L{layer}/{name}"] = value
                per_layer.setdefault(name, []).append(value)
    for name, values in per_layer.items():
        out[f"router/{name}"] = max(values) if name.endswith("max_over_mean") else statistics.fmean(values)
    return out


def _cv(values: list[float]) -> float:
    mean = statistics.fmean(values) if values else 0.0
    return statistics.pstdev(values) / mean if len(values) > 1 and mean > 0 else 0.0


def _max_over_mean(values: list[float]) -> float:
    mean = statistics.fmean(values) if values else 0.0
    return max(values) / mean if mean > 0 else 0.0
