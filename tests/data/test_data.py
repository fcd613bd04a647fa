"""Data pipeline: records, masking, truncation, batching, data order, generated/packaged/BIG-bench data."""

from __future__ import annotations

import json
import string
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from moa_train.data import (
    IGNORE_INDEX,
    SOURCES,
    LengthGroupedSampler,
    ShuffleSampler,
    TrainCollator,
    encode_dataset,
    encode_for_training,
    encode_prompt_ids,
    epoch_order,
    load_records,
    load_splits,
)
from moa_train.data.template import build_prompt
from moa_train.errors import MoATrainError

REPO = Path(__file__).resolve().parents[2]
# 20-record slices of the LLM-Adapters files (origin: tests/fixtures/llm_adapters/README.md)
LLM_ADAPTERS = REPO / "tests" / "fixtures" / "llm_adapters"
CONFIGS = REPO / "configs" / "data"

BANG, PAD, EOS, BOS = 0, 1, 2, 3  # ids of "!", "~" (also the pad token), <eos>, <bos>


@pytest.fixture(scope="module")
def char_tokenizer():
    """A real HF fast tokenizer, one token per character; adds <bos> like Llama-3 does.

    "!" has id 0 and "~" is the pad token (id 1): both occur as genuine targets in the tests.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = ["!", "~", "<eos>", "<bos>", "<unk>"] + [c for c in string.printable if c not in "!~"]
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="~", unk_token="<unk>"
    )
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.convert_tokens_to_ids("!")) == (
        PAD,
        EOS,
        BOS,
        BANG,
    )
    return tok


def record(output="a!~b", instruction="Say it", input=""):
    return {"instruction": instruction, "input": input, "output": output, "answer": "x"}


# ----------------------------------------------------------------------------------------------------
# Masking and truncation
# ----------------------------------------------------------------------------------------------------


def test_mask_is_positional_even_for_target_ids_zero_and_pad(char_tokenizer):
    ex = encode_for_training(record("a!~b!"), char_tokenizer, max_len=512)
    prompt = encode_prompt_ids(char_tokenizer, "Say it")
    ids, labels = ex["input_ids"], ex["labels"]
    assert ids[0] == BOS and ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    # response "a!~b!" + EOS is supervised in full, including ids 0 ("!") and the pad id ("~")
    assert (
        labels[len(prompt) :]
        == ids[len(prompt) :]
        == char_tokenizer("a!~b!", add_special_tokens=False)["input_ids"] + [EOS]
    )
    assert labels.count(BANG) == 2 and labels.count(PAD) == 1


def test_prompt_ids_match_generation_time_tokenisation(char_tokenizer):
    # the evaluator encodes prompts with tokenizer(prompt, add_special_tokens=True)
    prompt = build_prompt("Add", "3 and 4")
    assert encode_prompt_ids(char_tokenizer, "Add", "3 and 4") == char_tokenizer(prompt)["input_ids"]


def test_train_on_inputs_supervises_everything(char_tokenizer):
    ex = encode_for_training(record(), char_tokenizer, max_len=512, train_on_inputs=True)
    assert ex["labels"] == ex["input_ids"]


def test_long_input_is_truncated_first(char_tokenizer):
    rec = record(output="42", input="x" * 300)
    full = encode_for_training(rec, char_tokenizer, max_len=10_000)
    ex = encode_for_training(rec, char_tokenizer, max_len=len(full["input_ids"]) - 100)
    n = len(ex["input_ids"])
    assert n <= len(full["input_ids"]) - 100
    # the response and EOS survive intact at the end; everything before is masked prompt
    assert (
        ex["input_ids"][-3:]
        == ex["labels"][-3:]
        == char_tokenizer("42", add_special_tokens=False)["input_ids"] + [EOS]
    )
    assert ex["labels"][: n - 3] == [IGNORE_INDEX] * (n - 3)
    text = char_tokenizer.decode(ex["input_ids"][: n - 3], skip_special_tokens=True)
    assert text.endswith("### Response:\n") and "### Input:\nxxx" in text and text.count("x") < 300


def test_long_output_loses_its_end_and_keeps_prompt_mask_aligned(char_tokenizer):
    rec = record(output="0123456789" * 10)
    prompt = encode_prompt_ids(char_tokenizer, "Say it")
    max_len = len(prompt) + 25
    ex = encode_for_training(rec, char_tokenizer, max_len=max_len)
    assert len(ex["input_ids"]) == max_len
    assert ex["input_ids"][: len(prompt)] == prompt  # the prompt is never cut (spec G.8)
    assert ex["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    expected = char_tokenizer("0123456789" * 10, add_special_tokens=False)["input_ids"][:25]
    assert ex["labels"][len(prompt) :] == ex["input_ids"][len(prompt) :] == expected
    assert EOS not in ex["input_ids"]  # a cut answer must not teach stopping


def test_eos_kept_when_response_just_fits(char_tokenizer):
    prompt = encode_prompt_ids(char_tokenizer, "Say it")
    ex = encode_for_training(record("abc"), char_tokenizer, max_len=len(prompt) + 4)
    assert ex["input_ids"][-1] == EOS and ex["labels"][-1] == EOS
    ex = encode_for_training(record("abc"), char_tokenizer, max_len=len(prompt) + 3)
    assert ex["input_ids"][-1] != EOS and len(ex["input_ids"]) == len(prompt) + 3


def test_examples_without_room_for_a_response_are_dropped(char_tokenizer):
    records = [record("ok"), record("ok", instruction="y" * 400)]
    examples, stats = encode_dataset(records, char_tokenizer, max_len=200)
    assert len(examples) == 1 and stats == {"records": 2, "kept": 1, "dropped_no_room": 1, "truncated": 0}
    lone = encode_for_training(records[1], char_tokenizer, max_len=200)
    assert len(lone["input_ids"]) == 200 and set(lone["labels"]) == {IGNORE_INDEX}


def test_collator_right_pads_with_pad_id_and_ignores_padding(char_tokenizer):
    a = encode_for_training(record("a~"), char_tokenizer, max_len=512)
    b = encode_for_training(record("a much longer answer"), char_tokenizer, max_len=512)
    batch = TrainCollator(char_tokenizer.pad_token_id)([a, b])
    width = len(b["input_ids"])
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (2, width),
        "labels": (2, width),
        "attention_mask": (2, width),
    }
    assert all(v.dtype == torch.long for v in batch.values())
    n = len(a["input_ids"])
    assert batch["input_ids"][0, n:].eq(PAD).all() and batch["labels"][0, n:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (width - n)
    assert batch["labels"][0, :n].tolist() == a["labels"]  # the genuine "~" target (= pad id) stays
    assert batch["attention_mask"][1].all()
    padded = TrainCollator(PAD, pad_to_multiple_of=64)([a])
    assert padded["input_ids"].shape[1] % 64 == 0


def test_collator_needs_a_pad_id():
    with pytest.raises(MoATrainError):
        TrainCollator(None)


# ----------------------------------------------------------------------------------------------------
# Data order
# ----------------------------------------------------------------------------------------------------


def test_epoch_order_is_a_deterministic_permutation_like_distributed_sampler():
    order = epoch_order(100, seed=0, epoch=3)
    assert sorted(order) == list(range(100))
    assert order == epoch_order(100, seed=0, epoch=3)
    assert order != epoch_order(100, seed=0, epoch=4) and order != epoch_order(100, seed=1, epoch=3)
    reference = torch.utils.data.DistributedSampler(range(100), num_replicas=1, rank=0, shuffle=True, seed=0)
    reference.set_epoch(3)
    assert order == list(reference)


def test_shuffle_sampler_resumes_mid_epoch():
    sampler = ShuffleSampler(50, seed=7)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start=17)
    assert list(sampler) == full[17:] and len(sampler) == 33
    sampler.set_epoch(3)
    assert len(sampler) == 50 and list(sampler) == epoch_order(50, 7, 3)


def test_length_grouped_sampler_groups_and_is_seeded():
    lengths = [(i * 37) % 101 + 1 for i in range(400)]
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=0, megabatch_mult=5)
    order = list(sampler)
    assert sorted(order) == list(range(400)) and order == list(
        LengthGroupedSampler(lengths, 4, seed=0, megabatch_mult=5)
    )
    assert lengths[order[0]] == max(lengths)  # the longest batch comes first
    for start in range(20, 400, 20):  # within each megabatch, longest first
        chunk = [lengths[i] for i in order[start : start + 20]]
        assert chunk == sorted(chunk, reverse=True)
    sampler.set_epoch(1, start=8)
    assert list(sampler) == list(LengthGroupedSampler(lengths, 4, seed=0, megabatch_mult=5).order(1))[8:]


# ----------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------


def _write(path: Path, items, jsonl=False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(json.dumps(i) for i in items) if jsonl else json.dumps(items)
    path.write_text(text)
    return path


def test_missing_field_error_names_file_index_and_field(tmp_path):
    path = _write(tmp_path / "train.json", [record(), {"instruction": "q", "answer": "1"}])
    with pytest.raises(MoATrainError) as err:
        load_records(path, dataset="t")
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "record 1" in message and "'output'" in message
    with pytest.raises(MoATrainError, match="record 0 has no 'answer'"):
        load_records(_write(tmp_path / "t2.json", [{"instruction": "q"}]), split="test")
    with pytest.raises(MoATrainError, match="record 0 is a list"):
        load_records(_write(tmp_path / "t3.json", [[1, 2]]))
    with pytest.raises(MoATrainError, match="data file not found"):
        load_records(tmp_path / "absent.json")


def test_jsonl_records_and_answer_types(tmp_path):
    items = [{"instruction": f"q{i}", "output": f"= {i}", "answer": i} for i in range(3)]
    recs = load_records(_write(tmp_path / "gsm8k" / "test.jsonl", items, jsonl=True), split="test")
    assert [r["answer"] for r in recs] == ["0", "1", "2"] and recs[0]["input"] == ""
    assert {r["dataset"] for r in recs} == {"gsm8k"} and {r["answer_type"] for r in recs} == {"numeric"}
    letters = load_records(
        _write(tmp_path / "AQuA" / "test.json", [record() | {"answer": "C"}]), split="test"
    )
    assert letters[0]["answer_type"] == "letter"
    labels = load_records(_write(tmp_path / "mine.json", [record() | {"answer": "answer2"}]), split="test")
    assert labels[0]["dataset"] == "mine" and labels[0]["answer_type"] == "label"


def test_load_splits_json_with_caps_and_eval_budget(tmp_path):
    _write(tmp_path / "train.json", [record(f"o{i}") for i in range(10)])
    tests = [
        _write(tmp_path / "boolq" / "test.json", [record() | {"answer": "true"}] * 6),
        _write(tmp_path / "gsm8k" / "test.json", [record() | {"answer": "3"}] * 6),
    ]
    cfg = OmegaConf.create(
        {
            "name": "mine",
            "source": "json",
            "data_dir": str(tmp_path),
            "train_path": "train.json",
            "test_path": [str(p) for p in tests],
            "num_train": 4,
            "num_test": 2,
            "eval_max_new_tokens": 7,
        }
    )
    splits = load_splits(cfg)
    assert len(splits["train"]) == 4 and {r["dataset"] for r in splits["train"]} == {"mine"}
    assert [(r["dataset"], r["answer_type"]) for r in splits["test"]] == [("boolq", "label")] * 2 + [
        ("gsm8k", "numeric")
    ] * 2
    assert {r["eval_max_new_tokens"] for r in splits["test"]} == {7}


def test_required_paths_give_one_line_hints():
    for name, needle in [
        ("math14k", "data.train_path=/path/math_14k.json"),
        ("commonsense15k", "data.train_path=/path/commonsense_15k.json"),
        ("llm_adapters_commonsense", "data.data_dir"),
    ]:
        with pytest.raises(MoATrainError) as err:
            load_splits(OmegaConf.load(CONFIGS / f"{name}.yaml"))
        assert needle in str(err.value) and "\n" not in str(err.value), name


def test_hub_dataset_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = OmegaConf.load(CONFIGS / "hub.yaml")
    cfg.hub_id = "nobody/moa-train-no-such-dataset"
    start = time.perf_counter()
    with pytest.raises(MoATrainError) as err:
        load_splits(cfg)
    assert time.perf_counter() - start < 20
    assert "\n" not in str(err.value) and "data.train_path=<local file>" in str(err.value)


def test_data_configs_are_documented():
    required = {
        "name",
        "source",
        "max_len",
        "train_on_inputs",
        "group_by_length",
        "seed",
        "num_train",
        "num_test",
    }
    for path in sorted(CONFIGS.glob("*.yaml")):
        text = path.read_text()
        assert text.startswith("# "), f"{path.name} must start with a comment saying what it is"
        assert "@package" not in text
        cfg = OmegaConf.load(path)
        assert required <= set(cfg.keys()), f"{path.name} misses {required - set(cfg.keys())}"
        assert cfg.name == path.stem and cfg.source in SOURCES
        if cfg.source in ("arithmetic", "packaged", "bigbench"):
            assert cfg.tasks and cfg.test_per_task >= 1


def test_llm_adapters_files_load_with_their_answer_types(char_tokenizer):
    expected = {"boolq": "label", "gsm8k": "numeric", "AQuA": "letter", "piqa": "label", "SVAMP": "numeric"}
    for name, kind in expected.items():
        recs = load_records(LLM_ADAPTERS / name / "test.json", split="test")
        assert recs and {r["answer_type"] for r in recs} == {kind} and recs[0]["dataset"] == name
    boolq = load_records(LLM_ADAPTERS / "boolq" / "train.json")[:50]
    examples, stats = encode_dataset(boolq, char_tokenizer, max_len=2048)
    assert stats["kept"] == 50 and all(e["input_ids"][-1] == EOS for e in examples)
