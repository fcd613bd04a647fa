"""Where the data comes from: generated arithmetic, the packaged commonsense mix, a user's BIG-bench copy.

None of these needs the network or writes a cache: the default data works on a fresh machine.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, run_cli
from moa_train.data import arithmetic, bigbench, load_splits, packaged
from moa_train.data.answers import extract_label, extract_number
from moa_train.errors import MoATrainError

CONFIGS = REPO / "configs" / "data"
ARITH2 = ["arithmetic/2_digit_addition", "arithmetic/2_digit_subtraction"]
ARITH_MIX = [
    f"arithmetic/{d}_digit_{op}" for d in (2, 3) for op in ("addition", "subtraction", "multiplication")
]
_QUESTION = re.compile(r"^What is (\d+) (plus|minus|times) (\d+)\?$")


def _questions(records):
    return {r["instruction"] for r in records}


def _data_cfg(name: str, **overrides):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


# -- generated arithmetic ----------------------------------------------------------------------------------


def test_generator_follows_its_documented_recipe() -> None:
    """Operands = SHA-256 of "moa_train-arith/v1/<seed>/<task>/<i>", bytes 0-8 and 8-16 mod 10**N."""
    for seed, task, index, digits in [(0, ARITH2[0], 0, 2), (7, "arithmetic/3_digit_multiplication", 41, 3)]:
        digest = hashlib.sha256(f"moa_train-arith/v1/{seed}/{task}/{index}".encode()).digest()
        expected = (
            int.from_bytes(digest[:8], "big") % 10**digits,
            int.from_bytes(digest[8:16], "big") % 10**digits,
        )
        assert arithmetic.draw_operands(seed, task, index, digits) == expected
    # a task's stream is its draws in order, minus repeats and questions of a task with fewer digits
    draws = [arithmetic.draw_operands(0, ARITH2[0], i, 2) for i in range(40)]
    kept = list(dict.fromkeys(pair for pair in draws if max(pair) >= 10))[:10]
    stream = arithmetic.task_records(ARITH2[0], 10)
    assert [r["instruction"] for r in stream] == [f"What is {a} plus {b}?" for a, b in kept]


def test_generated_items_are_the_same_on_every_machine() -> None:
    """A digest of arith_mix's splits pins the generator: any change to the items shows up here.

    The recipe uses only SHA-256 and integer arithmetic (no ``random``), so the digest is the same on
    every platform and Python version; bump ``GENERATOR_VERSION`` and this digest together.
    """
    splits = arithmetic.build_splits(ARITH_MIX)
    digest = hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()
    assert digest == "9469243139ddb4b472aaacc9bce552ed172a02321f6164f3bff997208a1e5b09"
    assert splits == arithmetic.build_splits(ARITH_MIX)


@pytest.mark.parametrize(
    ("name", "tasks", "n_train", "n_test"),
    [
        ("arith2", ARITH2, 1800, 200),
        ("arith3", ["arithmetic/3_digit_addition", "arithmetic/3_digit_subtraction"], 1800, 200),
        ("arith_mix", ARITH_MIX, 5400, 600),
    ],
)
def test_arith_configs_keep_their_tasks_and_sizes(
    name, tasks, n_train, n_test, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("MOA_TRAIN_CACHE", str(tmp_path / "cache"))
    cfg = _data_cfg(name)
    assert cfg.source == "arithmetic" and list(cfg.tasks) == tasks
    splits = load_splits(cfg)
    assert (len(splits["train"]), len(splits["test"])) == (n_train, n_test)
    assert {r["dataset"] for r in splits["test"]} == {name}
    assert {r["eval_max_new_tokens"] for r in splits["test"]} == {cfg.eval_max_new_tokens}
    assert not (tmp_path / "cache").exists()  # generated in memory: nothing cached, nothing downloaded


def test_generated_answers_are_right_and_splits_disjoint() -> None:
    splits = arithmetic.build_splits(ARITH_MIX)
    assert not _questions(splits["train"]) & _questions(splits["test"])
    for split in ("train", "test"):
        assert len(_questions(splits[split])) == len(splits[split])  # no repeated question
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    for record in splits["train"] + splits["test"]:
        left, op, right = _QUESTION.match(record["instruction"]).groups()
        digits = int(record["task"].split("/")[1][0])
        assert int(left) < 10**digits and int(right) < 10**digits
        assert digits == 1 or max(int(left), int(right)) >= 10 ** (digits - 1)  # one task per question
        assert record["answer"] == str(ops[op](int(left), int(right)))
        assert extract_number(record["output"]) == float(record["answer"])  # equation form, last number
    # every task is spread over the split (a num_train cap keeps them all)
    assert {r["task"] for r in splits["train"][:60]} == set(ARITH_MIX)


def test_held_out_items_are_the_same_in_every_mix() -> None:
    arith2 = arithmetic.build_splits(ARITH2)
    mix = arithmetic.build_splits(ARITH_MIX)
    assert _questions(arith2["test"]) <= _questions(mix["test"])
    assert not _questions(arith2["test"]) & _questions(mix["train"])  # arith_mix never trains on them
    larger = arithmetic.build_splits(ARITH2, test_per_task=150)
    assert _questions(arith2["test"]) < _questions(larger["test"])
    other_seed = arithmetic.build_splits(ARITH2, split_seed=1)
    assert len(_questions(other_seed["test"]) & _questions(arith2["test"])) < 20
    for fmt, tail in (("number", "^-?\\d+$"), ("sentence", "^The answer is -?\\d+\\.$")):
        out = arithmetic.build_splits(ARITH2[:1], arith_format=fmt)["train"][0]["output"]
        assert re.match(tail, out)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tasks": ["arithmetic/2_digit_division"]}, "unknown arithmetic task"),
        (
            {"tasks": ["arithmetic/1_digit_addition"], "items_per_task": 9000},
            "has 100 distinct questions; data.items_per_task=9000 must be at most 50",
        ),
        ({"test_per_task": 1000}, "data.test_per_task < data.items_per_task"),
        ({"arith_format": "latex"}, "data.arith_format must be one of"),
        ({"tasks": []}, "data.tasks is empty"),
    ],
)
def test_bad_arithmetic_settings_give_one_line(overrides, message) -> None:
    with pytest.raises(MoATrainError, match=re.escape(message)) as err:
        load_splits(_data_cfg("arith2", **overrides))
    assert "\n" not in str(err.value)


# -- the packaged commonsense mix --------------------------------------------------------------------------


def test_packaged_commonsense_mix_trains_and_evaluates_offline(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MOA_TRAIN_CACHE", str(tmp_path / "cache"))
    splits = load_splits(_data_cfg("commonsense_mix"))
    assert (len(splits["train"]), len(splits["test"])) == (17746, 400)
    assert not _questions(splits["train"]) & _questions(splits["test"])
    tasks = ["ARC-Easy", "ARC-Challenge", "boolq", "openbookqa"]
    assert sorted({r["task"] for r in splits["test"]}) == sorted(tasks)
    assert all(sum(r["task"] == t for r in splits["test"]) == 100 for t in tasks)
    assert {r["task"] for r in splits["train"][:100]} == set(tasks)  # interleaved: a cap keeps all four
    for record in splits["train"] + splits["test"]:
        assert record["output"] == f"the correct answer is {record['answer']}"
        assert record["answer"] in record["labels"] and record["answer_type"] == "label"
        assert record["instruction"].endswith("Answer format: " + "/".join(record["labels"]))
        assert extract_label(record["output"], tuple(record["labels"])) == record["answer"]
    assert {r["dataset"] for r in splits["train"]} == {"commonsense_mix"}
    assert not (tmp_path / "cache").exists()
    # fewer tasks / held-out items; one-line errors for impossible choices
    small = load_splits(_data_cfg("commonsense_mix", tasks=["boolq"], test_per_task=10))
    assert len(small["test"]) == 10 and {r["task"] for r in small["train"]} == {"boolq"}
    for overrides, message in (
        ({"tasks": ["piqa"]}, "unknown piqa"),
        ({"test_per_task": 101}, "between 1 and 100"),
    ):
        with pytest.raises(MoATrainError, match=message):
            load_splits(_data_cfg("commonsense_mix", **overrides))


def test_packaged_data_ships_with_its_licence_and_attribution() -> None:
    folder = Path(packaged.__file__).parent / "commonsense_mix"
    readme = (folder / "README.md").read_text()
    assert "Open Data Commons Attribution License" in (folder / "DATA_LICENSE").read_text()
    for source in (
        "LLM-Adapters",
        "ARC",
        "BoolQ",
        "OpenBookQA",
        "CC BY-SA 4.0",
        "CC BY-SA 3.0",
        "Apache-2.0",
    ):
        assert source in readme
    size = (folder / "commonsense_mix.jsonl.xz").stat().st_size
    assert size < 3 * 2**20 and f"{size / 1000:.0f} KB" in readme


# -- BIG-bench from the user's own copy --------------------------------------------------------------------


def _task_json(task: str) -> dict:
    if task.startswith("arithmetic/"):
        return {"examples": [{"input": f"What is {i} plus 2?", "target": str(i + 2)} for i in range(30)]}
    return {
        "task_prefix": "Q:",
        "examples": [
            {"input": f"Is {i} even?", "target_scores": {"yes": float(i % 2 == 0), "no": float(i % 2 == 1)}}
            for i in range(30)
        ],
    }


def _bigbench_folder(root: Path, tasks: list[str]) -> Path:
    for task in tasks:
        path = root / "bigbench" / "benchmark_tasks" / task / "task.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(_task_json(task)))
    return root


def test_bigbench_source_reads_a_folder_or_an_archive(tmp_path) -> None:
    tasks = ["arithmetic/2_digit_addition", "strategyqa"]
    folder = _bigbench_folder(tmp_path / "BIG-bench", tasks)
    archive = tmp_path / bigbench.SDIST_NAME
    with tarfile.open(archive, "w:gz") as tar:
        for task in tasks:
            data = json.dumps(_task_json(task)).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{task}/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    results = []
    for path in (folder, folder / "bigbench" / "benchmark_tasks", archive):
        cfg = _data_cfg("arith2", source="bigbench", bigbench_path=str(path), tasks=tasks, test_per_task=5)
        results.append(load_splits(cfg))
    assert results[0] == results[1] == results[2]
    splits = results[0]
    assert (len(splits["train"]), len(splits["test"])) == (50, 10)
    assert not _questions(splits["train"]) & _questions(splits["test"])
    by_type = {r["answer_type"]: r for r in splits["train"]}
    assert by_type["numeric"]["output"].endswith(f"= {by_type['numeric']['answer']}")
    assert by_type["label"]["instruction"].startswith(
        "Please choose the correct answer to the question: Q: Is"
    )
    assert {r["dataset"] for r in splits["train"]} == {"arith2_numeric", "arith2_label"}


def test_bigbench_source_without_a_copy_says_which_key_to_set(tmp_path) -> None:
    for path, expected in (
        (None, "needs your copy of BIG-bench"),
        (tmp_path / "nope.tar.gz", "does not exist"),
    ):
        with pytest.raises(MoATrainError) as err:
            load_splits(
                _data_cfg("arith2", source="bigbench", bigbench_path=None if path is None else str(path))
            )
        assert expected in str(err.value) and "data.bigbench_path=" in str(err.value)
        assert "\n" not in str(err.value)
    folder = _bigbench_folder(tmp_path / "bb", ["strategyqa"])
    with pytest.raises(MoATrainError, match="arithmetic/2_digit_addition.*not found"):
        load_splits(_data_cfg("arith2", source="bigbench", bigbench_path=str(folder)))
    with pytest.raises(MoATrainError, match="needs your copy of BIG-bench"):
        load_splits(_data_cfg("bigbench_mc"))


# -- end to end: the CLI with an empty cache ---------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    ["arith_mix", pytest.param("commonsense_mix", marks=pytest.mark.slow)],  # the same path, ~30 s each
)
def test_tiny_run_trains_on_default_data_with_an_empty_cache(tmp_path, data) -> None:
    """`moa-train experiment=tiny data=<default data>` needs no download: only the tokenizer is cached."""
    cache = tmp_path / "cache"
    done = run_cli(
        "moa-train",
        "experiment=tiny",
        f"data={data}",
        "trainer.max_steps=2",
        "final_eval.max_records=2",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        env={"MOA_TRAIN_CACHE": str(cache)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("tiny accuracy: base=")
    assert sorted(p.name for p in cache.iterdir()) == ["models"]
