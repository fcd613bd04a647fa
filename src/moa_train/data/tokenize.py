"""Tokenisation for training: Alpaca prompt + response + EOS, loss masked by position; batching; order.

Sequence (method spec D.1): ``[special prefix] + prompt + output + EOS``. The special prefix is
whatever the tokenizer adds by itself (BOS for Llama-3, nothing for SmolLM2 or Qwen), so training
prompts are tokenised exactly like the evaluator's prompts.

Masking is by position, never by token id: the first ``len(prefix + prompt)`` labels are -100 and
the rest are the response ids + EOS, whatever their ids are (spec G.7: the official code dropped
every real target equal to token 0; padding is told apart by the attention mask, not by its id).

Length rule when ``prompt + output + EOS`` exceeds ``max_len`` (spec G.8 is the bug avoided here:
the official code cut tokens from the left but kept masking the first ``len(prompt)`` positions):

1. a non-empty ``input`` field is truncated first (its tail is cut, the rest of the prompt stays);
2. if it still does not fit, the response is cut from its END; EOS is kept only when the whole
   response fits (a cut answer must not teach the model to stop there);
3. if the prompt alone leaves no room for a single response token, the example has no target:
   its labels are all -100 and :func:`encode_dataset` drops it (and counts it).

The prompt is never cut, so the mask boundary always sits exactly at the end of the prompt.

``template="chat"``: the prompt is the tokenizer's chat template applied to the user turn with the
generation prompt (what moa-eval feeds the model); the response is what the template renders after it
for the assistant turn, up to and including the first EOS (the end-of-turn token of instruct
tokenizers; EOS is appended when the template ends the turn otherwise). The masking and length rule
are the same, by position.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from moa_train.data.chat import encode_chat
from moa_train.data.template import TEMPLATES, build_prompt, chat_user_text
from moa_train.errors import MoATrainError

IGNORE_INDEX = -100


def check_template(template: str, tokenizer: Any) -> None:
    """A one-line error for an unknown template, or ``chat`` with a tokenizer that has no chat template."""
    if template not in TEMPLATES:
        raise MoATrainError(f"data.template={template!r} is not known; choose {' or '.join(TEMPLATES)}")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise MoATrainError(
            "data.template=chat needs a tokenizer with a chat template, and this one has none "
            "(a base model's tokenizer?); use data.template=alpaca or an instruct model's tokenizer"
        )


def _chat_ids(tokenizer: Any, instruction: str, input: str, output: str | None = None) -> list[int]:
    """Chat-template ids of the user turn (+ generation prompt), or of the whole conversation with ``output``."""
    messages = [{"role": "user", "content": chat_user_text(instruction, input)}]
    if output is not None:
        messages.append({"role": "assistant", "content": output})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=output is None, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)


def encode_prompt_ids(
    tokenizer: Any, instruction: str, input: str = "", template: str = "alpaca"
) -> list[int]:
    """Token ids of the prompt incl. the tokenizer's own special prefix (e.g. BOS).

    Alpaca: matches ``tokenizer(prompt, add_special_tokens=True)`` used at generation time; a trailing
    EOS that some tokenizers append is removed (the response follows the prompt). Chat: the user turn
    through the tokenizer's chat template, ending with the assistant's generation prompt.
    """
    if template != "alpaca":
        check_template(template, tokenizer)
        return _chat_ids(tokenizer, instruction, input)
    ids = list(tokenizer(build_prompt(instruction, input), add_special_tokens=True)["input_ids"])
    if ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return ids


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _fit_input(tokenizer: Any, instruction: str, input: str, budget: int, template: str) -> list[int]:
    """Prompt ids with the ``input`` field cut to the longest token prefix whose prompt fits ``budget``."""
    input_ids = _text_ids(tokenizer, input)
    best = encode_prompt_ids(tokenizer, instruction, "", template)  # fallback: no input left at all
    lo, hi = 1, len(input_ids)
    # binary search on the number of kept input tokens; prompt length grows with it
    while lo <= hi:
        mid = (lo + hi) // 2
        kept = tokenizer.decode(input_ids[:mid], skip_special_tokens=True)
        ids = encode_prompt_ids(tokenizer, instruction, kept, template)
        if len(ids) <= budget:
            best, lo = ids, mid + 1
        else:
            hi = mid - 1
    return best


def _chat_response(tokenizer: Any, prompt: list[int], instruction: str, input: str, output: str) -> list[int]:
    """The assistant turn's ids after the generation prompt, without its final EOS (added by the caller)."""
    full = _chat_ids(tokenizer, instruction, input, output)
    if full[: len(prompt)] != prompt:
        raise MoATrainError(
            "the tokenizer's chat template does not render the user turn as a prefix of the conversation, "
            "so the loss mask cannot be placed by position; use data.template=alpaca"
        )
    response = full[len(prompt) :]
    eos = tokenizer.eos_token_id
    return response[: response.index(eos)] if eos in response else response


def _encode(
    record: Mapping[str, Any],
    tokenizer: Any,
    max_len: int,
    train_on_inputs: bool,
    template: str = "alpaca",
    where: str = "record",
) -> tuple[dict[str, list[int]], int, bool]:
    """(example, prompt length, whether the whole response + EOS fit)."""
    if record.get("messages"):  # a chat record: its own chat template whatever data.template says
        example, complete = encode_chat(
            record["messages"], tokenizer, max_len, train_on_inputs=train_on_inputs, where=where
        )
        supervised = [i for i, label in enumerate(example["labels"][1:], 1) if label != IGNORE_INDEX]
        return example, supervised[0] if supervised else len(example["input_ids"]), complete
    if max_len < 2:
        raise MoATrainError(f"data.max_len must be >= 2, got {max_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MoATrainError("the tokenizer has no EOS token; cannot mark the end of a response")
    instruction = str(record["instruction"])
    input_text = str(record.get("input") or "")
    prompt = encode_prompt_ids(tokenizer, instruction, input_text, template)
    if template == "chat":
        output = _chat_response(tokenizer, prompt, instruction, input_text, str(record.get("output") or ""))
    else:
        output = _text_ids(tokenizer, str(record.get("output") or ""))
    if len(prompt) + len(output) + 1 > max_len and input_text:
        prompt = _fit_input(tokenizer, instruction, input_text, max_len - len(output) - 1, template)
    room = max_len - len(prompt)
    if room <= 0:
        ids = prompt[:max_len]
        return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids)}, len(ids), False
    complete = len(output) + 1 <= room
    response = output + [eos] if complete else output[:room]
    input_ids = prompt + response
    # positions, not ids, decide what is supervised
    labels = list(input_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt) + list(response)
    return {"input_ids": input_ids, "labels": labels}, len(prompt), complete


def encode_for_training(
    record: Mapping[str, Any],
    tokenizer: Any,
    max_len: int,
    train_on_inputs: bool = False,
    template: str = "alpaca",
) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` for one record; labels are -100 on the prompt (unless
    ``train_on_inputs``) and the response ids + EOS elsewhere. See the module doc for the length rule.
    """
    check_template(template, tokenizer)
    return _encode(record, tokenizer, max_len, train_on_inputs, template)[0]


def num_targets(example: Mapping[str, Sequence[int]]) -> int:
    """Number of supervised positions (labels != -100) of an encoded example."""
    return sum(1 for label in example["labels"] if label != IGNORE_INDEX)


def encode_dataset(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_len: int,
    train_on_inputs: bool = False,
    template: str = "alpaca",
) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """Encode all records, dropping those where not one response token fits after the prompt.

    Returns ``(examples, stats)``; stats counts ``records``, ``kept``, ``dropped_no_room`` and
    ``truncated`` (response cut, so no EOS)."""
    check_template(template, tokenizer)
    examples, dropped, truncated = [], 0, 0
    for index, record in enumerate(records):
        example, prompt_len, complete = _encode(
            record, tokenizer, max_len, train_on_inputs, template, f"training record {index}"
        )
        if len(example["input_ids"]) <= prompt_len:
            dropped += 1
            continue
        truncated += not complete
        if "task_type" in record:  # LoRAMoE's localized balancing constraint (data/task_types.py)
            example["task_type"] = int(record["task_type"])
        examples.append(example)
    stats = {
        "records": len(records),
        "kept": len(examples),
        "dropped_no_room": dropped,
        "truncated": truncated,
    }
    return examples, stats


class TrainCollator:
    """Right-pads a list of encoded examples: ``input_ids`` with the pad id, ``labels`` with -100,
    ``attention_mask`` 1 on real tokens. Labels are copied, never derived from ``input_ids``."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        if pad_token_id is None:
            name = type(self).__name__
            raise MoATrainError(f"{name} needs a pad token id (use the EOS id when there is none)")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def _width(self, features: Sequence[Mapping[str, Sequence[int]]]) -> int:
        """The padded length of a batch: its longest row, rounded up to ``pad_to_multiple_of``."""
        if not features:
            raise MoATrainError(f"{type(self).__name__} got an empty batch")
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = int(math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of)
        return width

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        width = self._width(features)
        batch = len(features)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            if len(feature["labels"]) != n:
                raise MoATrainError(f"example {row}: {n} input ids but {len(feature['labels'])} labels")
            input_ids[row, :n] = torch.as_tensor(list(feature["input_ids"]), dtype=torch.long)
            labels[row, :n] = torch.as_tensor(list(feature["labels"]), dtype=torch.long)
            attention_mask[row, :n] = 1
        out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        if "task_type" in features[0]:  # per-example task types (LoRAMoE's localized balancing constraint)
            out["task_types"] = torch.tensor([int(f["task_type"]) for f in features], dtype=torch.long)
        return out


# ----------------------------------------------------------------------------------------------------
# Data order
# ----------------------------------------------------------------------------------------------------


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Deterministic permutation of ``range(n)`` for one epoch.

    Same recipe as ``torch.utils.data.DistributedSampler`` (``randperm`` with seed ``seed + epoch``),
    so one process sees the order the official code saw. A resumed run recomputes it and skips the
    indices it already consumed.
    """
    generator = torch.Generator()
    generator.manual_seed(int(seed) + int(epoch))
    return torch.randperm(n, generator=generator).tolist()


def length_grouped_order(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, megabatch_mult: int = 50
) -> list[int]:
    """Epoch order that groups similar lengths: shuffle (:func:`epoch_order`), cut into megabatches
    of ``batch_size * megabatch_mult``, sort each by length (longest first). The longest example is
    moved to the very first batch so that an out-of-memory shows up at step 1, not mid-run."""
    order = epoch_order(len(lengths), seed, epoch)
    size = max(1, batch_size * megabatch_mult)
    megabatches = [
        sorted(order[i : i + size], key=lambda j: lengths[j], reverse=True)
        for i in range(0, len(order), size)
    ]
    if megabatches:
        heads = [mb[0] for mb in megabatches]
        k = max(range(len(heads)), key=lambda i: lengths[heads[i]])
        megabatches[0][0], megabatches[k][0] = megabatches[k][0], megabatches[0][0]
    return [i for mb in megabatches for i in mb]


class _ResumableSampler(torch.utils.data.Sampler[int]):
    """Base: yields ``order(epoch)[start:]``; ``set_epoch(epoch, start)`` selects epoch and position."""

    def __init__(self, n: int, seed: int = 0, start: int = 0) -> None:
        self.n, self.seed, self.epoch, self.start = int(n), int(seed), 0, int(start)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch; ``start`` = number of examples of it already consumed (resume)."""
        if not 0 <= start <= self.n:
            raise MoATrainError(f"sampler start {start} is outside 0..{self.n}")
        self.epoch, self.start = int(epoch), int(start)

    def order(self, epoch: int) -> list[int]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        return iter(self.order(self.epoch)[self.start :])

    def __len__(self) -> int:
        return self.n - self.start


class ShuffleSampler(_ResumableSampler):
    """Seeded shuffle per epoch (:func:`epoch_order`) that can resume mid-epoch."""

    def order(self, epoch: int) -> list[int]:
        return epoch_order(self.n, self.seed, epoch)


class LengthGroupedSampler(_ResumableSampler):
    """Seeded, length-grouped order per epoch (:func:`length_grouped_order`), resumable mid-epoch."""

    def __init__(
        self, lengths: Sequence[int], batch_size: int, seed: int = 0, start: int = 0, megabatch_mult: int = 50
    ) -> None:
        super().__init__(len(lengths), seed, start)
        self.lengths = list(lengths)
        self.batch_size = int(batch_size)
        self.megabatch_mult = int(megabatch_mult)

    def order(self, epoch: int) -> list[int]:
        return length_grouped_order(self.lengths, self.batch_size, self.seed, epoch, self.megabatch_mult)
