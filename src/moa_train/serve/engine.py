"""Batched generation for served requests: one ``model.generate`` call per batch of requests.

Requests that arrive together share every forward (left padding; Hugging Face ``generate`` derives the
position ids from the attention mask, so a padded row sees the positions it would see alone). What
differs per request is handled per row around ``generate``:

* ``_RowSampler`` (a logits processor) picks each row's next token: the arg-max for greedy rows, or a
  temperature / top-p draw from the row's own ``torch.Generator`` (a seeded request gets the same tokens
  in any batch). It hands ``generate`` a one-hot score row, so ``generate`` runs in greedy mode and only
  keeps the KV cache, the masks and the positions.
* ``_RowTracker`` (a stopping criterion) records each row's tokens after every step, streams the new
  text, and ends a row on EOS, its own ``max_new_tokens``, a stop string or a cancel. Ended rows are
  padded by ``generate`` and no longer touch the request.

A router (instance-level routers included) sees each row's real tokens only: the MoA hooks mask the
padding out of the routing, so a request's gates, and therefore its greedy answer, do not depend on
the other requests in the batch.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria

from moa_train.errors import MoATrainError
from moa_train.eval.generation import eos_token_ids, left_pad, model_device, pad_token_id


class QueueFull(MoATrainError):
    """The engine's queue of waiting requests is full (the server answers 503)."""


class EngineStopped(MoATrainError):
    """The engine is shutting down and takes no new requests."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes. ``temperature=0`` is greedy (the default)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: every answer gets exactly max_new_tokens

    def check(self) -> SamplingParams:
        if self.max_new_tokens < 1:
            raise MoATrainError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise MoATrainError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MoATrainError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise MoATrainError("stop strings must be non-empty strings")
        return self


@dataclass
class Request:
    """One generation: prompt token ids in, tokens / text / finish reason out.

    ``on_text(delta)`` is called from the engine's thread with each new piece of text (streaming); the
    pieces joined are exactly ``text``. ``on_done(request)`` is called once at the end.
    """

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    router: bool = False
    on_text: Callable[[str], None] | None = None
    on_done: Callable[[Request], None] | None = None
    # results
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # stop | length | cancelled | error
    error: str | None = None
    router_summary: dict[str, Any] | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    _sent: int = 0  # characters of text already streamed

    def cancel(self) -> None:
        self.cancelled = True


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches ``top_p`` (nucleus sampling)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop = cumulative - sorted_logits.softmax(-1) >= top_p  # tokens after the nucleus is complete
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


class _RowSampler(LogitsProcessor):
    def __init__(self, requests: Sequence[Request]) -> None:
        self.requests = requests
        self.generators: list[torch.Generator | None] = []
        for request in requests:
            gen = None
            if request.params.temperature > 0:
                gen = torch.Generator()
                if request.params.seed is not None:
                    gen.manual_seed(int(request.params.seed))
                else:
                    gen.seed()
            self.generators.append(gen)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        chosen = scores.argmax(-1)
        for row, (request, gen) in enumerate(zip(self.requests, self.generators)):
            if gen is None:
                continue
            logits = scores[row].float().cpu() / request.params.temperature
            probs = _top_p_filter(logits, request.params.top_p).softmax(-1)
            chosen[row] = torch.multinomial(probs, 1, generator=gen).item()
        onehot = torch.full_like(scores, float("-inf"))
        return onehot.scatter(-1, chosen[:, None], 0.0)


class _RowTracker(StoppingCriteria):
    """Called by ``generate`` after every step: per-row bookkeeping, streaming and stopping."""

    def __init__(
        self,
        requests: Sequence[Request],
        tokenizer: Any,
        eos_ids: Sequence[int],
        gates: list[torch.Tensor] | None,
        mask: torch.Tensor,
    ) -> None:
        self.requests, self.tokenizer, self.eos_ids = requests, tokenizer, set(eos_ids)
        self.active = [True] * len(requests)
        self.gates, self.mask = gates, mask
        self.gate_sums: list[torch.Tensor] | None = None  # per layer [B, E]
        self.gate_counts = torch.zeros(len(requests))

    def _collect_gates(self) -> None:
        """Add each active row's gates of the forward that just ran: gate x tokens, and the tokens."""
        if not self.gates:
            return
        forward, self.gates[:] = list(self.gates), []
        prefill = self.gate_sums is None
        active = torch.tensor(self.active, dtype=torch.float32)[:, None]
        counts = self.mask.sum(1) if prefill else torch.ones(len(self.requests))
        sums = []
        for weights in forward:
            w = weights.detach().float().cpu()
            if prefill and w.shape[1] == self.mask.shape[1]:  # per-token gates: the real tokens only
                sums.append((w * self.mask[:, :, None]).sum(1) * active)
            else:  # one decode step, or one gate for the whole prompt (instance routers)
                sums.append(w.mean(1) * counts[:, None] * active)
        self.gate_sums = sums if prefill else [a + b for a, b in zip(self.gate_sums, sums)]
        self.gate_counts += counts * active[:, 0]

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        self._collect_gates()
        last = input_ids[:, -1].tolist()
        for row, request in enumerate(self.requests):
            if not self.active[row]:
                continue
            token = last[row]
            request.tokens.append(token)
            reason = None
            if token in self.eos_ids and not request.params.ignore_eos:
                reason = "stop"
            elif request.cancelled:
                reason = "cancelled"
            elif len(request.tokens) >= request.params.max_new_tokens:
                reason = "length"
            text = self.tokenizer.decode(request.tokens, skip_special_tokens=True)
            cut = _find_stop(text, request.params.stop)
            if cut is not None:
                text, reason = text[:cut], "stop"
            if reason is not None:
                request.text, request.finish_reason = text, reason
                self.active[row] = False
            else:
                request.text = text
                _stream(request, _safe_prefix(text, request.params.stop))
        return torch.tensor([not a for a in self.active], dtype=torch.bool, device=input_ids.device)

    def summaries(self, names: Sequence[tuple[int, list[str]]]) -> list[dict[str, Any] | None]:
        if self.gate_sums is None:
            return [None] * len(self.requests)
        out = []
        for row in range(len(self.requests)):
            count = float(self.gate_counts[row].clamp_min(1.0))
            table = [(layer_sum[row] / count).tolist() for layer_sum in self.gate_sums]
            layers = [i for i, _ in names][: len(table)]
            experts = names[0][1] if names and len(names[0][1]) == len(table[0]) else None
            out.append(
                {
                    "layers": layers,
                    "experts": experts or [f"e{i}" for i in range(len(table[0]))],
                    "mean_gate": [[round(v, 4) for v in r] for r in table],
                    "tokens": int(self.gate_counts[row]),
                }
            )
        return out


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stops if s in text]
    return min(hits) if hits else None


def _safe_prefix(text: str, stops: Sequence[str]) -> str:
    """The part of ``text`` that can be streamed now: no half-decoded character at the end, and no tail
    that could still become the start of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":  # an incomplete UTF-8 sequence decodes as U+FFFD
        end -= 1
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:k]):
                end -= k
                break
    return text[:end]


def _stream(request: Request, safe: str) -> None:
    """Send the part of ``safe`` not sent yet (what was sent is always a prefix of the final text)."""
    if len(safe) > request._sent:
        if request.on_text is not None:
            request.on_text(safe[request._sent :])
        request._sent = len(safe)


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS and those of the generation config of the model that generates (a MoA or PEFT
    wrapper's base model, or the model itself: a plain HF model's ``base_model`` is its decoder stack)."""
    ids = eos_token_ids(model, tokenizer)
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    for value in extra if isinstance(extra, list | tuple) else [extra]:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


class Engine:
    """Runs requests on a loaded model: directly (:meth:`run_batch`) or through a queue served by one
    worker thread that batches whatever is waiting (:meth:`submit`, :meth:`start`, :meth:`stop`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_batch_size: int = 16,
        max_queue: int = 64,
        batch_wait_s: float = 0.01,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1:
            raise MoATrainError("max_batch_size and max_queue must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue, self.batch_wait_s = max_batch_size, max_queue, batch_wait_s
        self.autocast = autocast or contextlib.nullcontext
        self.eos_ids = _eos_ids(model, tokenizer)
        if hasattr(model, "set_telemetry"):  # router_stats() counters: nothing here reads them (speed)
            model.set_telemetry(False)
        self.pad_id = pad_token_id(tokenizer)
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.stats = {"batches": 0, "requests": 0, "generated_tokens": 0, "max_batch": 0}

    # -- direct use -----------------------------------------------------------------------------------
    def run_batch(self, requests: Sequence[Request]) -> None:
        """Generate every request of ``requests`` in one ``generate`` call (results written into them)."""
        if not requests:
            return
        try:
            self._generate(requests)
        except Exception as exc:  # a failed batch fails its requests, never the engine
            for request in requests:
                if request.finish_reason is None:
                    request.finish_reason, request.error = "error", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            for request in requests:
                if request.finish_reason is None:
                    request.finish_reason = "cancelled" if request.cancelled else "length"
                _stream(request, request.text)
                if request.on_done is not None:
                    request.on_done(request)
                request.done.set()

    def _generate(self, requests: Sequence[Request]) -> None:
        ids, mask, _ = left_pad([r.prompt_ids for r in requests], self.pad_id)
        device = model_device(self.model)
        want_router = any(r.router for r in requests) and hasattr(self.model, "capture_gates")
        capture = self.model.capture_gates(primary_only=True) if want_router else contextlib.nullcontext(None)
        config = GenerationConfig(
            max_new_tokens=max(r.params.max_new_tokens for r in requests),
            do_sample=False,
            num_beams=1,
            pad_token_id=self.pad_id,
            eos_token_id=[],  # not None (generate would take the model's): EOS ends rows in _RowTracker
            bos_token_id=getattr(self.tokenizer, "bos_token_id", None),
            use_cache=True,
        )
        with torch.inference_mode(), self.autocast(), capture as gates:
            tracker = _RowTracker(requests, self.tokenizer, self.eos_ids, gates, mask.float())
            self.model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=config,
                logits_processor=[_RowSampler(requests)],
                stopping_criteria=[tracker],
            )
        if want_router:
            names = [(i, n) for i, _, _, n in self.model._primary_routers()]
            for request, summary in zip(requests, tracker.summaries(names)):
                if request.router:
                    request.router_summary = summary
        self.stats["batches"] += 1
        self.stats["requests"] += len(requests)
        self.stats["generated_tokens"] += sum(len(r.tokens) for r in requests)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(requests))

    # -- queued use -----------------------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="moa-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, request: Request) -> Request:
        """Queue a request (raises :class:`QueueFull` or :class:`EngineStopped`); returns it."""
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._waiting.append(request)
            self._cond.notify()
        return request

    @property
    def load(self) -> dict[str, int]:
        return {"waiting": len(self._waiting), "running": len(self._running)}

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._waiting:
                    return
            # requests sent at the same moment arrive a few ms apart: wait briefly to batch them together
            deadline = time.monotonic() + self.batch_wait_s
            while len(self._waiting) < self.max_batch_size and time.monotonic() < deadline:
                time.sleep(0.001)
            with self._cond:
                batch = [self._waiting.popleft() for _ in range(min(self.max_batch_size, len(self._waiting)))]
                self._running = batch
            live = [r for r in batch if not r.cancelled]
            for request in batch:
                if request.cancelled:  # cancelled while waiting: never generated
                    request.finish_reason = "cancelled"
                    if request.on_done is not None:
                        request.on_done(request)
                    request.done.set()
            with contextlib.suppress(Exception):  # the error is in each request; the engine goes on
                self.run_batch(live)
            with self._cond:
                self._running = []

    def stop(self, cancel: bool = False, timeout: float | None = None) -> None:
        """Take no new requests; finish the queued and running ones (``cancel``: end them now)."""
        with self._cond:
            self._stopping = True
            if cancel:
                for request in [*self._waiting, *self._running]:
                    request.cancel()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
