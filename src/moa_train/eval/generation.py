"""Batched generation: Alpaca prompts, left padding, length-sorted batches, prefill/decode timing."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from moa_train.data import encode_prompt_ids
from moa_train.data.chat import chat_prompt_ids
from moa_train.errors import MoATrainError
from moa_train.eval.decoding import DecodingConfig


@dataclass
class Throughput:
    """Token counts and wall-clock split into prefill (prompt forward) and decode (later steps)."""

    examples: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    total_seconds: float = 0.0

    def add(self, other: Throughput) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, float | int]:
        def rate(tokens: int, seconds: float) -> float:
            return round(tokens / seconds, 3) if seconds > 0 else 0.0

        n = max(self.examples, 1)
        return {
            **asdict(self),
            "prefill_tokens_per_s": rate(self.prefill_tokens, self.prefill_seconds),
            "decode_tokens_per_s": rate(self.decode_tokens, self.decode_seconds),
            "seconds_per_example": round(self.total_seconds / n, 6),
            "decode_seconds_per_example": round(self.decode_seconds / n, 6),
        }


@dataclass
class GenerationOutput:
    """Generations in the order of the prompts given, plus the exact token ids that were processed."""

    texts: list[str]
    prompt_ids: list[list[int]]
    generated_ids: list[list[int]]  # cut after the first EOS (EOS included when produced)
    throughput: Throughput = field(default_factory=Throughput)


class _PrefillTimer:
    """Stopping criterion that never stops: records when the first new token exists (end of prefill)."""

    def __init__(self) -> None:
        self.first_step_at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        if self.first_step_at is None:
            self.first_step_at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def pad_token_id(tokenizer: Any) -> int:
    """Pad id for left padding; models without one (Llama-style) reuse EOS, which the mask hides."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is None:
        raise MoATrainError("the tokenizer has neither a pad nor an EOS token; cannot batch generation")
    return int(tokenizer.eos_token_id)


def eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """EOS ids that end a generation: the tokenizer's plus those of the model's generation config."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_config = getattr(getattr(model, "base_model", model), "generation_config", None)
    extra = getattr(gen_config, "eos_token_id", None)
    for value in extra if isinstance(extra, list | tuple) else [extra]:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def encode_prompt(tokenizer: Any, record: Mapping[str, Any], template: str = "alpaca") -> list[int]:
    """Token ids of a record's prompt (``template``: alpaca | chat), tokenised exactly as training
    tokenises its prompt part."""
    if record.get("messages"):  # a chat record: the conversation before its last assistant turn
        return chat_prompt_ids(record["messages"], tokenizer)
    return encode_prompt_ids(tokenizer, str(record["instruction"]), str(record.get("input") or ""), template)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad id lists -> (input_ids, attention_mask, position_ids); positions start at 0 per row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, positions


def _cut_at_eos(tokens: list[int], eos_ids: Sequence[int]) -> list[int]:
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[: i + 1]
    return tokens


def _generate_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: list[list[int]],
    decoding: DecodingConfig,
    max_new_tokens: int,
    eos_ids: list[int],
) -> tuple[list[list[int]], Throughput]:
    pad_id = pad_token_id(tokenizer)
    ids, mask, _ = left_pad(rows, pad_id)
    device = model_device(model)
    timer = _PrefillTimer()
    start = time.perf_counter()
    # Position ids come from the attention mask inside HF generate (cumsum - 1), so left-padded rows
    # see the same positions as when generated alone; batched greedy == unbatched greedy.
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_ids or None,
        use_cache=True,
        stopping_criteria=[timer],
        **decoding.generation_kwargs(),
    )
    end = time.perf_counter()
    new = out[:, ids.shape[1] :].tolist()
    generated = [_cut_at_eos(row, eos_ids) for row in new]
    first = timer.first_step_at or end
    stats = Throughput(
        examples=len(rows),
        prefill_tokens=int(mask.sum()),
        generated_tokens=sum(len(g) for g in generated),
        # the first new token of every row comes out of the prefill forward
        decode_tokens=sum(max(len(g) - 1, 0) for g in generated),
        prefill_seconds=first - start,
        decode_seconds=end - first,
        total_seconds=end - start,
    )
    return generated, stats


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (memory peaks show up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    decoding: DecodingConfig,
    batch_size: int,
    max_new_tokens: int,
    template: str = "alpaca",
) -> GenerationOutput:
    """Generate an answer for every record (``template`` prompt), batched by length; results in input order."""
    if batch_size < 1:
        raise MoATrainError(f"batch_size must be >= 1, got {batch_size}")
    prompts = [encode_prompt(tokenizer, r, template) for r in records]
    eos_ids = eos_token_ids(model, tokenizer)
    generated: list[list[int]] = [[] for _ in prompts]
    total = Throughput()
    # a seeded preset is reproducible for a given batch size and order, without touching the caller's RNG
    with torch.random.fork_rng(enabled=decoding.seed is not None):
        if decoding.seed is not None:
            torch.manual_seed(decoding.seed)
        for batch in length_sorted_batches([len(p) for p in prompts], batch_size):
            outs, stats = _generate_batch(
                model, tokenizer, [prompts[i] for i in batch], decoding, max_new_tokens, eos_ids
            )
            for i, out in zip(batch, outs):
                generated[i] = out
            total.add(stats)
    texts = [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    return GenerationOutput(texts=texts, prompt_ids=prompts, generated_ids=generated, throughput=total)
