"""The converter against the real editor: workflows the editor built and saved (subgraphs, nested subgraphs,
bypass and mute on subgraph nodes, a legacy group node, upload widgets, text replacement), and official templates
with subgraphs, each with the prompt the editor's own graphToPrompt queued for it (ComfyUI_frontend 1.27.10).
Recorded by tests/comfyui/frontend_cases.py; tests/comfyui/test_editor_browser.py repeats the comparison live."""
import copy
import datetime
import glob
import json
import os
import re

import pytest

from rewardlab.batch.convert import WorkflowError, convert, to_api
from rewardlab.batch.validate import validate_editor
from rewardlab.batch.widgets import read_widget_values

DATA = os.path.join(os.path.dirname(__file__), "data")
CASES = sorted(glob.glob(os.path.join(DATA, "frontend", "*.json")))
TEMPLATES = sorted(glob.glob(os.path.join(DATA, "templates", "*.json")))


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def info():
    return load(os.path.join(DATA, "frontend", "object_info.json"))


def case(name):
    return load(os.path.join(DATA, "frontend", f"{name}.json"))


EDITOR_CASES = ["legacy_group_node", "nested_bypass_mute", "subgraph_two_instances", "widgets_and_text"]


@pytest.mark.parametrize("form", ["saved", "exported"])
@pytest.mark.parametrize("name", EDITOR_CASES)
def test_editor_built_workflows_convert_like_the_editor(name, form, info):
    """Both forms the editor writes (a saved file; the workflow embedded in a PNG, whose unlinked widget inputs
    are left out) give exactly the prompt the editor queued, dates included."""
    c = case(name)
    assert to_api(c[form], info, now=datetime.datetime.fromisoformat(c["now"])) == c["prompt"]


def test_the_cases_cover_what_they_claim(info):
    two = case("subgraph_two_instances")
    samplers = {nid: n["inputs"] for nid, n in two["prompt"].items() if n["class_type"] == "KSampler"}
    assert sorted((v["seed"], v["steps"]) for v in samplers.values()) == [(101, 7), (202, 3)]
    assert all(":" in nid for nid in samplers)                      # execution ids through the subgraph node
    nested = case("nested_bypass_mute")["prompt"]
    assert any(nid.count(":") == 2 for nid in nested)               # a subgraph inside a subgraph
    kinds = {n["class_type"] for n in nested.values()}
    assert "LoraLoaderModelOnly" not in kinds and "PreviewImage" not in kinds   # bypassed / muted subgraphs
    sampler = next(n for n in nested.values() if n["class_type"] == "KSampler")
    assert nested[sampler["inputs"]["model"][0]]["class_type"] == "CheckpointLoaderSimple"   # passed through
    group = case("legacy_group_node")
    assert any(n["type"].startswith("workflow>") for n in group["saved"]["nodes"])
    assert next(n for n in group["prompt"].values() if n["class_type"] == "KSampler")["inputs"]["seed"] == 4242
    text = case("widgets_and_text")["prompt"]
    save = next(n for n in text.values() if n["class_type"] == "SaveImage")["inputs"]["filename_prefix"]
    assert "%" not in save and save.endswith("/77_64")
    mask = next(n for n in text.values() if n["class_type"] == "LoadImageMask")["inputs"]
    assert mask == {"image": "example.png", "channel": "green"}


def test_load3d_widgets_are_read_and_its_render_is_refused(info):
    """Load3D's buttons sit between model_file and the viewer; the viewer's render is made when the editor
    queues, which a batch run cannot do."""
    c = case("load3d")
    node = next(n for n in c["saved"]["nodes"] if n["type"] == "Load3D")
    values = read_widget_values(node["widgets_values"], info["Load3D"], "Load3D", "node 1")
    assert values["width"] == 320 and values["height"] == 240
    with pytest.raises(WorkflowError, match="3D viewer's render.*Load Image"):
        to_api(c["saved"], info)


def _without_localised_titles(prompt, workflow):
    """The editor titles untitled nodes with its translated display names; the server ignores _meta."""
    return {nid: {k: v for k, v in n.items() if k != "_meta"} for nid, n in prompt.items()}


@pytest.mark.parametrize("path", TEMPLATES, ids=os.path.basename)
def test_official_templates_with_subgraphs_convert_like_the_editor(path):
    c = load(path)
    ours = to_api(c["workflow"], c["object_info"])
    assert _without_localised_titles(ours, c["workflow"]) == _without_localised_titles(c["prompt"], c["workflow"])
    errors = validate_editor(c["workflow"], c["object_info"])
    lacking = r"not in \[(.pixel_space.)?\]$"     # only model files this server does not have
    assert all(re.search(lacking, e) for e in errors), errors


def test_the_templates_hold_nested_and_bypassed_subgraphs():
    nested = bypassed = 0
    for path in TEMPLATES:
        wf = load(path)["workflow"]
        subgraphs = wf["definitions"]["subgraphs"]
        ids = {s["id"] for s in subgraphs}
        nested += any(n["type"] in ids for s in subgraphs for n in s["nodes"])
        bypassed += any(n["type"] in ids and n.get("mode") == 4 for g in [wf, *subgraphs] for n in g["nodes"])
    assert nested and bypassed


# --- rules the recorded files do not reach on their own --------------------------------------------------------

def two_instances():
    return copy.deepcopy(case("subgraph_two_instances")["saved"])


def instances(wf):
    ids = {s["id"] for s in wf["definitions"]["subgraphs"]}
    return [n for n in wf["nodes"] if n["type"] in ids]


def test_a_muted_subgraph_node_drops_its_inner_nodes_even_when_they_are_not_muted(info):
    """(The editor sets inner nodes to the subgraph node's mode; files from other versions may not.)"""
    wf = two_instances()
    first, second = instances(wf)
    second["mode"] = 2
    prompt = to_api(wf, info)
    assert not [nid for nid in prompt if nid.startswith(f"{second['id']}:")]
    assert [nid for nid in prompt if nid.startswith(f"{first['id']}:")]


def test_a_subgraph_node_without_saved_values_shows_the_inner_values(info):
    """Newer editors save the shown widgets in the subgraph (widgets_values [])."""
    wf = two_instances()
    first, _ = instances(wf)
    first["widgets_values"] = []
    definition = wf["definitions"]["subgraphs"][0]
    inner = next(n for n in definition["nodes"] if n["type"] == "KSampler")
    prompt = to_api(wf, info)
    sampler = prompt[f"{first['id']}:{inner['id']}"]["inputs"]
    assert sampler["seed"] == inner["widgets_values"][0] and sampler["steps"] == inner["widgets_values"][2]


def test_wrong_count_of_subgraph_values_is_refused(info):
    wf = two_instances()
    first, _ = instances(wf)
    first["widgets_values"] = [1, 2, 3]
    with pytest.raises(WorkflowError, match=r"3 saved widget values for the 2 widgets the subgraph shows.*'seed', "
                                            r"'steps'"):
        to_api(wf, info)


def test_a_linked_subgraph_input_wins_over_its_widget(info):
    """Linking a PrimitiveInt into the subgraph node's seed input feeds the inner KSampler from it."""
    wf = two_instances()
    first, _ = instances(wf)
    seed_slot = next(i for i, inp in enumerate(first["inputs"]) if inp["name"] == "seed")
    wf["nodes"].append({"id": 900, "type": "PrimitiveInt", "pos": [0, 0], "size": [200, 60], "flags": {}, "order": 0,
                        "mode": 0, "inputs": [], "outputs": [{"name": "INT", "type": "INT", "links": [900]}],
                        "properties": {}, "widgets_values": [5, "fixed"]})
    wf["links"].append([900, 900, 0, first["id"], seed_slot, "INT"])
    first["inputs"][seed_slot]["link"] = 900
    prompt = to_api(wf, info)
    inner = next(nid for nid, n in prompt.items()
                 if nid.startswith(f"{first['id']}:") and n["class_type"] == "KSampler")
    assert prompt[inner]["inputs"]["seed"] == ["900", 0]


def test_a_subgraph_that_contains_itself_is_refused(info):
    wf = two_instances()
    definition = wf["definitions"]["subgraphs"][0]
    definition["nodes"].append(dict(instances(wf)[0], id=999))
    with pytest.raises(WorkflowError, match="contains itself"):
        to_api(wf, info)


def test_text_replacement_waits_for_the_submission_time(info):
    """convert() keeps %date% and %NODE.widget% for the runner, which replaces them per run, from the run's own
    values (a sweep over seeds names each file after its seed)."""
    c = case("widgets_and_text")
    conversion = convert(c["saved"], info)
    save_id = next(nid for nid, n in conversion.prompt.items() if n["class_type"] == "SaveImage")
    assert "%date:yyyy-MM-dd%" in conversion.prompt[save_id]["inputs"]["filename_prefix"]
    sampler_id = next(nid for nid, n in conversion.prompt.items() if n["class_type"] == "KSampler"
                      and n["inputs"]["seed"] == 77)
    swept = copy.deepcopy(conversion.prompt)
    swept[sampler_id]["inputs"]["seed"] = 5
    final = conversion.final(swept, now=datetime.datetime(2024, 3, 9, 7, 5, 1))
    assert final[save_id]["inputs"]["filename_prefix"] == "rl/2024-03-09/5_64"
