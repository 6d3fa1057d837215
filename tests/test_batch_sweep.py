"""Sweep parsing and expansion (batch/sweep.py)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # pytest runs with --import-mode=importlib
from _batch_fixtures import object_info, txt2img_api
from rewardlab.batch.sweep import (SweepError, apply_params, combine, expand_runs, parse_assignment, parse_values,
                                   prompt_key, read_runs_file)


def test_values_ranges_and_lists():
    assert parse_values("1..4") == [1, 2, 3, 4]
    assert parse_values("0..10:5") == [0, 5, 10]
    assert parse_values("3.0..4.0:0.5") == [3.0, 3.5, 4.0]
    assert parse_values("[3, 5, 7]") == [3, 5, 7]
    assert parse_values('["a cat", "a dog"]') == ["a cat", "a dog"]
    assert parse_values("7") == [7] and parse_values("euler") == ["euler"] and parse_values("0.5") == [0.5]
    assert parse_values("a..b") == ["a..b"]  # not numeric: a plain string
    assert parse_assignment("Positive.text=a photo, of a cat") == ("Positive.text", ["a photo, of a cat"])
    with pytest.raises(SweepError, match="start is above end"):
        parse_values("5..1")
    with pytest.raises(SweepError, match="TARGET=VALUE"):
        parse_assignment("seed")


def test_product_and_zip():
    axes = [[{"a": 1}, {"a": 2}], [{"b": "x"}, {"b": "y"}], [{"c": 0}]]
    assert combine(axes, "product") == [{"a": 1, "b": "x", "c": 0}, {"a": 1, "b": "y", "c": 0},
                                        {"a": 2, "b": "x", "c": 0}, {"a": 2, "b": "y", "c": 0}]
    assert combine(axes, "zip") == [{"a": 1, "b": "x", "c": 0}, {"a": 2, "b": "y", "c": 0}]
    with pytest.raises(SweepError, match="equal length"):
        combine([[{"a": 1}, {"a": 2}], [{"b": 1}, {"b": 2}, {"b": 3}]], "zip")


def test_targets_by_id_title_class_and_bare_name():
    api, info = txt2img_api(), object_info()
    runs = expand_runs(api, [parse_assignment("3.seed=1..3"), parse_assignment("Sampler.cfg=[4, 6]")],
                       object_info=info)
    assert len(runs) == 6
    assert [(r.prompt["3"]["inputs"]["seed"], r.prompt["3"]["inputs"]["cfg"]) for r in runs] == [
        (1, 4), (1, 6), (2, 4), (2, 6), (3, 4), (3, 6)]
    assert runs[0].params == {"3.seed": 1, "Sampler.cfg": 4}
    assert api["3"]["inputs"]["seed"] == 1 and api["3"]["inputs"]["cfg"] == 5.0  # the template is untouched
    zipped = expand_runs(api, [parse_assignment('Positive.text=["a cat", "a dog"]'),
                               parse_assignment("seed=10..11")], mode="zip", object_info=info)
    assert [(r.prompt["6"]["inputs"]["text"], r.prompt["3"]["inputs"]["seed"]) for r in zipped] == [
        ("a cat", 10), ("a dog", 11)]
    assert apply_params(api, {"EmptyLatentImage.width": 32})["5"]["inputs"]["width"] == 32  # by class_type
    with pytest.raises(SweepError, match="matches several nodes"):
        apply_params(api, {"CLIPTextEncode.text": "x"})
    with pytest.raises(SweepError, match="no node with id or title"):
        apply_params(api, {"Nope.seed": 1})
    with pytest.raises(SweepError, match="has no input 'sed'"):
        apply_params(api, {"3.sed": 1}, info)
    with pytest.raises(SweepError, match="no node has a widget input"):
        apply_params(api, {"clip": 1})  # linked everywhere: not a widget


def test_runs_files_and_stable_keys(tmp_path):
    csv_path = tmp_path / "runs.csv"
    csv_path.write_text("Positive.text,3.seed\na red apple,1\n\"a cat, sitting\",2\n")
    jsonl = tmp_path / "runs.jsonl"
    jsonl.write_text('{"Positive.text": "x", "3.seed": 5}\n\n{"3.seed": 6}\n')
    rows = read_runs_file(str(csv_path))
    assert rows == [{"Positive.text": "a red apple", "3.seed": 1}, {"Positive.text": "a cat, sitting", "3.seed": 2}]
    runs = expand_runs(txt2img_api(), [parse_assignment("3.cfg=[2, 3]")], rows)
    assert [(r.prompt["3"]["inputs"]["cfg"], r.prompt["6"]["inputs"]["text"]) for r in runs] == [
        (2, "a red apple"), (2, "a cat, sitting"), (3, "a red apple"), (3, "a cat, sitting")]
    assert len(expand_runs(txt2img_api(), runs_rows=read_runs_file(str(jsonl)))) == 2
    # the key hashes what runs: equal prompts share it (titles ignored), a changed input changes it
    a, b = txt2img_api(), txt2img_api()
    b["3"]["_meta"]["title"] = "renamed"
    assert prompt_key(a) == prompt_key(b)
    b["3"]["inputs"]["seed"] = 2
    assert prompt_key(a) != prompt_key(b)
    assert len(expand_runs(a, [parse_assignment("3.seed=[1, 1, 2]")])) == 2  # duplicates dropped
