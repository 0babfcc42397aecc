"""Tests for ape.task: reading example files, error messages, splitting and task loading."""

from __future__ import annotations

import csv
import json
import re
import warnings
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from ape.task import (
    BUNDLED_TASKS_DIR,
    Example,
    Task,
    TaskError,
    bundled_task_path,
    load_task,
    read_examples,
)

SHARED_ANTONYMS = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "instruction_induction" / "antonyms"
)


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_table(path: Path, rows: list[list[str]], delimiter: str) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        csv.writer(handle, delimiter=delimiter).writerows(rows)
    return path


def rows(n: int) -> list[dict[str, str]]:
    return [{"input": f"in{i}", "output": f"out{i}"} for i in range(n)]


def raises_at(path: Path, location: str, problem: str) -> AbstractContextManager[Any]:
    """Expect a TaskError whose message starts with the file name and location, then the problem."""
    return pytest.raises(TaskError, match=re.escape(f"{path.name}{location}") + r".*" + problem)


# --- Example ------------------------------------------------------------------------------------


def test_answers_default_to_output() -> None:
    assert Example("a", "b").answers == ("b",)


def test_output_is_always_an_answer() -> None:
    assert Example("a", "b", ("c", "d")).answers == ("b", "c", "d")
    assert Example("a", "b", ("c", "b")).answers == ("c", "b")


# --- read_examples: errors ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv"])
def test_empty_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"data{suffix}"
    path.write_text("", encoding="utf-8")
    with pytest.raises(TaskError, match=re.escape(f"{path.name}: no examples (the file is empty)")):
        read_examples(path)


def test_blank_lines_only_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(TaskError, match="no examples"):
        read_examples(path)


def test_missing_output(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [*rows(2), {"input": "x"}])
    with raises_at(path, ":3", "missing field 'output'"):
        read_examples(path)


def test_malformed_json(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"input": "a", "output": "b"}\n{"input": "a" "output": "b"}\n', "utf-8")
    with raises_at(path, ":2", r"malformed JSON: Expecting ',' delimiter \(column 15\)"):
        read_examples(path)


def test_non_string_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [*rows(3), {"input": 7, "output": "b"}])
    with raises_at(path, ":4", "field 'input' must be a string, got int"):
        read_examples(path)


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_input(tmp_path: Path, value: str) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [*rows(4), {"input": value, "output": "b"}])
    with raises_at(path, ":5", "field 'input' is empty"):
        read_examples(path)


def test_non_object_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [["a", "b"]])
    with raises_at(path, ":1", "expected a JSON object, got list"):
        read_examples(path)


def test_bad_answers(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"input": "a", "output": "b", "answers": "b"}])
    with raises_at(path, ":1", "field 'answers' must be a list of strings"):
        read_examples(path)


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("a\tb\n", encoding="utf-8")
    with pytest.raises(TaskError, match=r"data\.txt.*\.jsonl, \.json, \.csv, \.tsv"):
        read_examples(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match=r"nope\.jsonl: no such file"):
        read_examples(tmp_path / "nope.jsonl")


def test_csv_missing_column(tmp_path: Path) -> None:
    path = write_table(tmp_path / "data.csv", [["input", "answer"], ["a", "b"]], ",")
    with raises_at(path, ":1", r"missing column 'output' \(columns: input, answer\)"):
        read_examples(path)


def test_csv_missing_value(tmp_path: Path) -> None:
    path = write_table(tmp_path / "data.csv", [["input", "output"], ["a", "b"], ["c", ""]], ",")
    with raises_at(path, ":3", "field 'output' is empty"):
        read_examples(path)


def test_json_list_item_missing_field(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps([*rows(2), {"input": "x"}]), encoding="utf-8")
    with raises_at(path, ": item 3", "missing field 'output'"):
        read_examples(path)


def test_json_not_a_list(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"input": "a", "output": "b"}), encoding="utf-8")
    with pytest.raises(TaskError, match=r"data\.json: expected a JSON list of objects, got dict"):
        read_examples(path)


# --- read_examples: formats -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix, delimiter", [(".csv", ","), (".tsv", "\t")])
def test_table_with_answers(tmp_path: Path, suffix: str, delimiter: str) -> None:
    table = [
        ["input", "output", "answers", "label"],
        ["a, with comma", "b", json.dumps(["b", "bee"]), "x"],
        ["c", "d", "", "y"],
    ]
    path = write_table(tmp_path / f"data{suffix}", table, delimiter)
    assert read_examples(path) == [
        Example("a, with comma", "b", ("b", "bee")),
        Example("c", "d", ("d",)),
    ]


def test_json_list_with_answers(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    items = [
        {"input": "a", "output": "b", "answers": ["bee"], "label": 1},
        {"input": "c", "output": "d"},
    ]
    path.write_text(json.dumps(items), encoding="utf-8")
    assert read_examples(path) == [Example("a", "b", ("b", "bee")), Example("c", "d")]


def test_jsonl_ignores_extra_fields_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"input": "a", "output": "b", "id": 3}\n\n{"input": "c", "output": "d"}\n')
    assert [ex.answers for ex in read_examples(path)] == [("b",), ("d",)]


def test_duplicates_warn_and_are_kept(tmp_path: Path) -> None:
    data = rows(8)
    data[6] = dict(data[2])  # line 7 repeats line 3
    path = write_jsonl(tmp_path / "data.jsonl", data)
    with pytest.warns(UserWarning, match=r"duplicate example at lines 3 and 7 \(input 'in2'\)"):
        examples = read_examples(path)
    assert len(examples) == 8


def test_many_duplicates_one_warning(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", rows(1) * 8)
    with pytest.warns(UserWarning) as record:
        read_examples(path)
    assert len(record) == 1
    assert "and 2 more" in str(record[0].message)
    assert "7 duplicates in all" in str(record[0].message)


# --- load_task ------------------------------------------------------------------------------------


def all_inputs(task: Task) -> list[str]:
    return [ex.input for split in ("train", "val", "test") for ex in task.split(split)]


def test_file_split_is_seeded_disjoint_and_complete(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", rows(40))
    task = load_task(path, seed=1)
    assert (len(task.train), len(task.val), len(task.test)) == (15, 15, 10)
    inputs = all_inputs(task)
    assert len(set(inputs)) == len(inputs) == 40
    assert task.name == "data" and task.metric == "em" and task.seed == 1
    assert all_inputs(load_task(path, seed=1)) == inputs
    assert all_inputs(load_task(path, seed=2)) != inputs


def test_split_fractions(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", rows(20))
    task = load_task(path, val_fraction=0.2, test_fraction=0.5)
    assert (len(task.train), len(task.val), len(task.test)) == (8, 2, 10)


def test_explicit_split_files(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", rows(4))
    test = write_jsonl(tmp_path / "held.jsonl", [{"input": "t", "output": "u"}])
    task = load_task(train, test=test, name="mine")
    assert task.name == "mine"
    assert task.test == [Example("t", "u")]
    assert (len(task.train), len(task.val)) == (2, 2)


def test_too_small_to_split(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", rows(1))
    with pytest.raises(TaskError, match=r"data\.jsonl: found 1 example, need at least 3"):
        load_task(path)
    with pytest.raises(TaskError, match="found 1 example, need at least 2"):
        load_task(path, test=path)


def test_unknown_split(tmp_path: Path) -> None:
    task = load_task(write_jsonl(tmp_path / "data.jsonl", rows(8)))
    with pytest.raises(TaskError, match="valid: train, val, test"):
        task.split("dev")


def test_leakage_warning(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", rows(6))
    test = write_jsonl(tmp_path / "test.jsonl", [{"input": "in0", "output": "other"}])
    with pytest.warns(UserWarning, match="1 test example share an input with train"):
        load_task(train, test=test, val=test)


def test_directory_with_meta(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", rows(6))
    write_jsonl(tmp_path / "dev.jsonl", [{"input": "v", "output": "yes"}])
    write_jsonl(tmp_path / "test.jsonl", [{"input": "t", "output": "no"}])
    meta = {
        "task": "yesno",
        "metric": "accuracy",
        "human_instructions": ["Answer yes or no."],
        "label_names": ["no", "yes"],
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    task = load_task(tmp_path)
    assert task.name == "yesno" and task.metric == "accuracy"
    assert task.human_instructions == ["Answer yes or no."]
    assert task.labels == ["no", "yes"]
    assert len(task.train) == 6 and task.val == [Example("v", "yes")]
    assert task.distinct_outputs() == sorted(["no", "yes"] + [f"out{i}" for i in range(6)])


def test_directory_bad_metric(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", rows(6))
    (tmp_path / "meta.json").write_text(json.dumps({"metric": "bleu"}), encoding="utf-8")
    with pytest.raises(TaskError, match=r"meta\.json: field 'metric' must be one of"):
        load_task(tmp_path)


def test_directory_without_train(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match="no train.jsonl"):
        load_task(tmp_path)


def test_unknown_path_lists_bundled_tasks(tmp_path: Path) -> None:
    with pytest.raises(TaskError, match=r"no such file or directory \(bundled tasks: .*antonyms"):
        load_task(tmp_path / "missing")
    with pytest.raises(TaskError, match="available: .*antonyms"):
        bundled_task_path("no-such-task")


def test_bundled_antonyms() -> None:
    assert bundled_task_path("antonyms") == BUNDLED_TASKS_DIR / "antonyms"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the bundled data must load cleanly
        task = load_task("antonyms")
    assert task.name == "antonyms" and task.metric == "em"
    assert len(task.test) == 50 and len(task.train) + len(task.val) == 200
    assert task.human_instructions


@pytest.mark.skipif(not SHARED_ANTONYMS.is_dir(), reason=f"shared data not at {SHARED_ANTONYMS}")
def test_shared_antonyms_directory() -> None:
    task = load_task(SHARED_ANTONYMS)
    assert task.metric == "em"
    assert len(task.test) == 100
    assert len(task.train) + len(task.val) == 2592


@pytest.mark.skipif(not SHARED_ANTONYMS.is_dir(), reason=f"shared data not at {SHARED_ANTONYMS}")
def test_bundled_rows_are_unmodified_source_rows() -> None:
    for name, count in (("train.jsonl", 200), ("test.jsonl", 50)):
        source = (SHARED_ANTONYMS / name).read_bytes().splitlines(keepends=True)[:count]
        assert (BUNDLED_TASKS_DIR / "antonyms" / name).read_bytes() == b"".join(source)


SHARED_SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "classification" / "sst-2"


@pytest.mark.skipif(not SHARED_SST2.is_dir(), reason="needs ../shared/data/classification")
def test_a_classification_set_loads_with_its_labels_and_verbalizers() -> None:
    task = load_task(SHARED_SST2)
    assert task.metric == "accuracy"
    assert task.labels == ["negative", "positive"]
    assert task.verbalizers == {"negative": "terrible", "positive": "great"}
    assert (len(task.train), len(task.val)) == (32, 32)


def test_verbalizers_need_one_word_per_label(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"input": "a", "output": "x"}\n' * 1, encoding="utf-8")
    meta = {"label_names": ["x", "y"], "verbalizers": ["ex"]}
    (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(TaskError, match="'verbalizers' must have one word per entry"):
        load_task(tmp_path)


def test_sample_test_draws_a_seeded_subset_and_keeps_every_label() -> None:
    def rows(n: int, prefix: str) -> list[Example]:
        return [Example(f"{prefix}{i}", "rare" if i == 0 else "common") for i in range(n)]

    task = Task("t", rows(4, "a"), rows(4, "b"), rows(50, "c"), metric="accuracy")
    sample = task.sample_test(10, seed=3)
    assert len(sample.test) == 10 and set(sample.test) <= set(task.test)
    assert sample.test == task.sample_test(10, seed=3).test != task.sample_test(10, seed=4).test
    assert [task.test.index(e) for e in sample.test] == sorted(
        task.test.index(e) for e in sample.test
    )
    assert sample.train == task.train and sample.val == task.val
    assert sample.labels == ["common", "rare"]  # fixed from the full task
    assert task.sample_test(50) is task and task.sample_test(99) is task
    with pytest.raises(ValueError, match="test_examples must be positive, got 0"):
        task.sample_test(0)


# --- in-memory rows: a list of dicts, a pandas DataFrame, a datasets.Dataset ----------------------


def test_a_list_of_dicts_loads_like_the_same_rows_in_a_file(tmp_path: Path) -> None:
    from_file = load_task(write_jsonl(tmp_path / "rows.jsonl", rows(40)), seed=1)
    task = load_task(rows(40), seed=1)
    assert task.name == "data"  # the default name of in-memory data
    assert (task.train, task.val, task.test) == (from_file.train, from_file.val, from_file.test)
    assert load_task(rows(40), name="mine").name == "mine"


def test_in_memory_splits_and_answers() -> None:
    data = [*rows(4), {"input": "a", "output": "b", "answers": ("bee",)}]
    task = load_task(data, test=[{"input": "t", "output": "u"}], val=rows(1))
    assert task.test == [Example("t", "u")] and task.val == [Example("in0", "out0")]
    assert Example("a", "b", ("b", "bee")) in task.train


def test_in_memory_row_errors() -> None:
    with pytest.raises(TaskError, match=r"^row 3: missing field 'output'$"):
        load_task([*rows(2), {"input": "x"}])
    with pytest.raises(TaskError, match=r"^row 2: field 'input' must be a string, got int$"):
        load_task([*rows(1), {"input": 7, "output": "b"}])
    with pytest.raises(TaskError, match=r"^row 1: expected a dict, got list$"):
        load_task([["a", "b"]])
    with pytest.raises(TaskError, match=r"^data: no examples \(the data is empty\)$"):
        load_task([])
    with pytest.raises(TaskError, match=r"^mine: found 1 example, need at least 3"):
        load_task(rows(1), name="mine")
    with pytest.raises(
        TaskError, match=r"got a mapping \(for a datasets\.DatasetDict pick a split"
    ):
        load_task({"train": rows(8)})


def test_in_memory_duplicates_warn() -> None:
    with pytest.warns(UserWarning, match=r"^data: duplicate example at rows 1 and 9"):
        load_task([*rows(8), rows(1)[0]])


def test_a_dataframe_loads_like_the_list_it_was_made_from() -> None:
    pd = pytest.importorskip("pandas")
    data = [*rows(7), {"input": "a", "output": "b", "answers": ["bee"]}]
    task = load_task(pd.DataFrame(data), seed=2)
    expected = load_task(data, seed=2)
    assert (task.train, task.val, task.test) == (expected.train, expected.val, expected.test)


def test_dataframe_row_errors() -> None:
    pd = pytest.importorskip("pandas")
    # The missing value is NaN in the frame: reported like a missing field in a file.
    with pytest.raises(TaskError, match=r"^row 3: missing field 'output'$"):
        load_task(pd.DataFrame([*rows(2), {"input": "x"}]))
    with pytest.raises(TaskError, match=r"^row 2: field 'output' is empty$"):
        load_task(pd.DataFrame([*rows(1), {"input": "x", "output": " "}]))
    with pytest.raises(TaskError, match=r"^missing column 'output' \(columns: input, label\)$"):
        load_task(pd.DataFrame({"input": ["a"], "label": ["b"]}))


def test_a_dataset_loads_like_the_list_it_was_made_from() -> None:
    datasets = pytest.importorskip("datasets")
    data = [{**row, "answers": [row["output"].upper()]} for row in rows(8)]
    task = load_task(datasets.Dataset.from_list(data), seed=3)
    expected = load_task(data, seed=3)
    assert (task.train, task.val, task.test) == (expected.train, expected.val, expected.test)
    assert task.train[0].answers[1] == task.train[0].output.upper()


def test_dataset_row_errors() -> None:
    datasets = pytest.importorskip("datasets")
    with pytest.raises(TaskError, match=r"^row 3: missing field 'output'$"):
        load_task(datasets.Dataset.from_list([*rows(2), {"input": "x"}]))
    with pytest.raises(TaskError, match=r"^missing column 'input' \(columns: text, output\)$"):
        load_task(datasets.Dataset.from_dict({"text": ["a"], "output": ["b"]}))


def test_optimize_and_evaluate_resolve_in_memory_rows() -> None:
    from ape.evaluation import resolve_task

    task = resolve_task(rows(8), seed=1)
    assert task.name == "data" and all_inputs(task) == all_inputs(load_task(rows(8), seed=1))


def test_the_task_modules_never_import_pandas_or_datasets() -> None:
    # Both stay optional: in-memory tables are recognised by their methods.
    import ast

    modules = sorted(Path(__file__).resolve().parents[1].glob("ape/task*.py"))
    assert len(modules) >= 6  # task.py and the modules split from it
    for module in modules:
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not [n for n in names if n.split(".")[0] in ("pandas", "datasets")], module
