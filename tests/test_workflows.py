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


def load_build():
    spec = importlib.util.spec_from_file_location("rewardlab_workflow_build", os.path.join(PACK_ROOT, "workflows",
                                                                                          "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


BUILD = load_build()


@pytest.fixture(scope="module")
def info():
    return offline_object_info()


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def api_twin(editor_path):
    titles = {f"{fn.title}.json": name for name, fn in BUILD.WORKFLOWS.items()}
    return os.path.join(PACK_ROOT, BUILD.api_path(titles[os.path.basename(editor_path)]))


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
    assert names == {f"{name}.json" for name in BUILD.WORKFLOWS}
    assert {os.path.basename(p) for p in EDITOR} == {f"{fn.title}.json" for fn in BUILD.WORKFLOWS.values()}


def test_shipped_files_match_the_generator(info):
    rendered = BUILD.render(info)
    stale = [rel for rel, text in rendered.items()
             if not os.path.exists(os.path.join(PACK_ROOT, rel)) or open(os.path.join(PACK_ROOT, rel)).read() != text]
    assert stale == [], "run: python workflows/build.py"


def test_validator_catches_mistakes(info):
    editor = load(os.path.join(PACK_ROOT, BUILD.editor_path("score_and_rank")))
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


# --- what a user sees when opening them --------------------------------------------------------------------------

TITLE_H = 30   # litegraph draws a node's title bar above its position; node sizes exclude it


def node_box(node):
    """(x0, y0, x1, y1) of a node on the canvas, title bar included."""
    x, y = node["pos"]
    w, h = node["size"]
    return x, y - TITLE_H, x + w, y + h


def overlap(a, b, margin=0):
    return a[0] < b[2] + margin and b[0] < a[2] + margin and a[1] < b[3] + margin and b[1] < a[3] + margin


def inside(box, outer):
    return outer[0] <= box[0] and outer[1] <= box[1] and box[2] <= outer[2] and box[3] <= outer[3]


@pytest.mark.parametrize("path", EDITOR, ids=os.path.basename)
def test_nodes_do_not_overlap_and_groups_enclose_their_nodes(path, info):
    """From the shipped positions and the sizes build.py estimates (checked against the editor's own sizes in
    tests/comfyui/test_editor_browser.py): no two nodes overlap, each group box holds its nodes (title bars
    included) and no other node."""
    wf = load(path)
    boxes = {n["id"]: node_box(n) for n in wf["nodes"]}
    ids = sorted(boxes)
    clashes = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:] if overlap(boxes[a], boxes[b], margin=10)]
    assert clashes == []
    members = {g["title"]: _members(path, g["title"]) for g in wf["groups"]}
    for group in wf["groups"]:
        x, y, w, h = group["bounding"]
        outer = (x, y, x + w, y + h)
        inner = members[group["title"]]
        assert inner and all(inside(boxes[n], outer) for n in inner), group["title"]
        others = [n for n in ids if n not in inner and overlap(boxes[n], outer)]
        assert others == [], (group["title"], others)
    boxes_of_groups = [g["bounding"] for g in wf["groups"]]
    for i, a in enumerate(boxes_of_groups):
        for b in boxes_of_groups[i + 1:]:
            assert not overlap((a[0], a[1], a[0] + a[2], a[1] + a[3]), (b[0], b[1], b[0] + b[2], b[1] + b[3]))


def _members(path, title):
    name = next(n for n, fn in BUILD.WORKFLOWS.items() if os.path.basename(path) == f"{fn.title}.json")
    graph = BUILD.WORKFLOWS[name]()
    return [node.id for group_title, nodes in graph.groups if group_title == title for node in nodes]


def test_size_estimates_cover_what_the_editor_draws(info):
    """The editor draws a row per socket pair, a row per widget and a text box per multiline string; the
    estimate must not be smaller (sizes measured in ComfyUI_frontend 1.27.10 for these nodes)."""
    measured = {"RewardLabRankImages": (400, 220), "RewardLabReNOOptimiseNoise": (400, 620),
                "RewardLabDRaFTTrainLoRA": (400, 616), "RewardLabDRaFTOptions": (400, 400),
                "RewardLabScheduledGuider": (274, 358), "KarrasScheduler": (270, 130),
                "KSampler": (270, 262), "CLIPTextEncode": (400, 200), "RewardLabGuidanceKeyframes": (400, 200),
                "PreviewAny": (320, 88)}
    for kind, (w, h) in measured.items():
        spec = info[kind]
        sockets = [n for n, t, o in BUILD.input_specs(spec) if not BUILD.is_widget(t, o)]
        est = BUILD.node_size(spec, kind, sockets)
        assert est[0] >= w and est[1] >= h, (kind, est, (w, h))


def test_every_node_of_the_pack_is_in_a_workflow():
    from rewardlab.nodes import NODE_CLASS_MAPPINGS

    used = set()
    for path in EDITOR:
        used |= {n["type"] for n in load(path)["nodes"]}
    assert sorted(set(NODE_CLASS_MAPPINGS) - used) == []


def test_titles_are_what_the_template_browser_shows():
    """For a pack's templates the browser shows the file name as title and (with - and _ as spaces) as
    description, and asks for <name>.jpg beside it: names read as titles, each has its thumbnail."""
    for path in EDITOR:
        title = os.path.basename(path)[:-len(".json")]
        assert title[0].isupper() and "_" not in title and not set(title) & set("/\\:*?\"<>|%#")
        assert os.path.exists(path[:-len(".json")] + ".jpg"), f"run: python workflows/thumbnails.py ({title})"
