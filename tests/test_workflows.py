"""Shipped workflows: valid against the node specs, editor and API versions agree, files up to date with
workflows/build.py, and the validator catches each kind of mistake."""
import copy
import glob
import importlib.util
import json
import os

import pytest

from rewardlab.batch.convert import to_api
from rewardlab.batch.stock_nodes import offline_object_info
from rewardlab.batch.validate import PACK_ROOT, shipped_workflows, validate_files, validate_workflow

EDITOR = sorted(glob.glob(os.path.join(PACK_ROOT, "example_workflows", "*.json")))


@pytest.fixture(scope="module")
def info():
    return offline_object_info()


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def api_twin(editor_path):
    return os.path.join(PACK_ROOT, "workflows", "api", os.path.basename(editor_path))


def test_every_shipped_workflow_is_valid(info):
    report = validate_files(info=info)
    assert len(report) >= 2 and len(report) == len(shipped_workflows())
    assert {path: errors for path, errors in report.items() if errors} == {}


@pytest.mark.parametrize("path", EDITOR, ids=os.path.basename)
def test_editor_converts_to_its_api_twin(path, info):
    assert os.path.exists(api_twin(path)), "every editor workflow ships its API version"
    assert to_api(load(path), info) == load(api_twin(path))


def test_template_browser_layout():
    """ComfyUI's /workflow_templates lists <pack>/{example_workflows,example,examples,workflow,workflows}/*.json
    (app/custom_node_manager.py); editor files live in example_workflows/ only, and no JSON sits directly in
    workflows/, so the browser lists each workflow once and never offers an API file."""
    assert EDITOR
    assert glob.glob(os.path.join(PACK_ROOT, "workflows", "*.json")) == []
    names = {os.path.basename(p) for p in glob.glob(os.path.join(PACK_ROOT, "workflows", "api", "*.json"))}
    assert names == {os.path.basename(p) for p in EDITOR}


def test_shipped_files_match_the_generator(info):
    spec = importlib.util.spec_from_file_location("rewardlab_workflow_build", os.path.join(PACK_ROOT, "workflows", "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    rendered = build.render(info)
    stale = [rel for rel, text in rendered.items()
             if not os.path.exists(os.path.join(PACK_ROOT, rel)) or open(os.path.join(PACK_ROOT, rel)).read() != text]
    assert stale == [], "run: python workflows/build.py"


def test_validator_catches_mistakes(info):
    editor = load(os.path.join(PACK_ROOT, "example_workflows", "score_and_rank.json"))
    api = load(os.path.join(PACK_ROOT, "workflows", "api", "score_and_rank.json"))
    sampler = next(nid for nid, n in api.items() if n["class_type"] == "KSampler")

    def api_errors(change):
        bad = copy.deepcopy(api)
        change(bad)
        return "\n".join(validate_workflow(bad, info))

    assert "not in" in api_errors(lambda p: p[sampler]["inputs"].update(sampler_name="euler_typo"))
    assert "below the minimum" in api_errors(lambda p: p[sampler]["inputs"].update(steps=0))
    assert "expected an integer" in api_errors(lambda p: p[sampler]["inputs"].update(seed=1.5))
    assert "not a file name" in api_errors(lambda p: p["1"]["inputs"].update(ckpt_name=3))
    assert "wants MODEL but is linked to CLIP" in api_errors(lambda p: p[sampler]["inputs"].update(model=["1", 1]))
    assert "required input 'positive' is missing" in api_errors(lambda p: p[sampler]["inputs"].pop("positive"))
    assert "unknown node type" in api_errors(lambda p: p[sampler].update(class_type="KSamplerX"))
    assert "unknown input 'sede'" in api_errors(lambda p: p[sampler]["inputs"].update(sede=1))

    def editor_errors(change):
        bad = copy.deepcopy(editor)
        change({str(n["id"]): n for n in bad["nodes"]}, bad)
        return "\n".join(validate_workflow(bad, info))

    ks = next(str(n["id"]) for n in editor["nodes"] if n["type"] == "KSampler")
    assert "6 saved widget values for 7 widgets" in editor_errors(lambda n, w: n[ks]["widgets_values"].pop())
    assert "'sometimes' is not a control_after_generate mode" in editor_errors(
        lambda n, w: n[ks]["widgets_values"].__setitem__(1, "sometimes"))
    assert "into MODEL input" in editor_errors(lambda n, w: w["links"].__setitem__(
        3, [4, 1, 1, int(ks), 0, "CLIP"]) or n["1"]["outputs"][1]["links"].append(4))
    assert "above the maximum" in editor_errors(lambda n, w: n[ks]["widgets_values"].__setitem__(3, 1000.0))
