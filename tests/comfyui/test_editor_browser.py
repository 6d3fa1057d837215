"""The pack in ComfyUI's real editor: headless Chromium (Debian's ``chromium`` package) driven by Playwright on a
live server with the pack (``server`` fixture).

- every example workflow, dropped on the canvas as a file: no missing node types, node and link counts equal to
  the file, no two nodes overlapping with the sizes the editor gives them, groups holding their nodes;
- the template browser lists the pack's workflows with their thumbnails (each ``<name>.jpg`` loads);
- the editor's widgets for every node type the server has match batch/widgets.py (rules + extension table);
- the editor-built cases of frontend_cases.py, built live: our conversion equals the editor's ``graphToPrompt``.

Screenshots go to tests/comfyui/screenshots/ (ignored by git; $REWARDLAB_SCREENSHOTS overrides).
"""
import datetime
import glob
import json
import os
import urllib.request
from urllib.parse import quote, unquote

import pytest

from rewardlab.batch.convert import to_api
from rewardlab.batch.widgets import widget_layout

from . import frontend_cases
from .conftest import REPO
from .editor import Editor, chromium_path

SHOTS = os.environ.get("REWARDLAB_SCREENSHOTS") or os.path.join(os.path.dirname(__file__), "screenshots")
EXAMPLES = sorted(glob.glob(os.path.join(REPO, "example_workflows", "*.json")))

pytestmark = pytest.mark.skipif(chromium_path() is None, reason="needs Chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def editor(server):
    pytest.importorskip("playwright")
    with Editor(server.url) as ed:
        yield ed


def shot(editor, name):
    return editor.screenshot(os.path.join(SHOTS, f"{name}.png"))


def overlapping(nodes, margin=0):
    boxes = [(n["id"], n["box"]) for n in nodes if not n["collapsed"]]
    out = []
    for i, (a, (ax, ay, aw, ah)) in enumerate(boxes):
        for b, (bx, by, bw, bh) in boxes[i + 1:]:
            if ax < bx + bw - margin and bx < ax + aw - margin and ay < by + bh - margin and by < ay + ah - margin:
                out.append((a, b))
    return out


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_workflow_in_the_editor(editor, path):
    with open(path, encoding="utf-8") as f:
        workflow = json.load(f)
    editor.drop_workflow(workflow, os.path.basename(path))
    root = editor.graph_state()[0]
    assert [n["type"] for n in root["nodes"] if not n["known"]] == []
    assert len(root["nodes"]) == len(workflow["nodes"])
    assert root["links"] == len(workflow["links"])
    assert overlapping(root["nodes"]) == []
    boxes = {n["id"]: n["box"] for n in root["nodes"]}
    for group in root["groups"]:
        gx, gy, gw, gh = group["box"]
        saved = next(g for g in workflow["groups"] if g["title"] == group["title"])
        assert [round(v) for v in group["box"]] == [round(v) for v in saved["bounding"]]
        held = [nid for nid, (x, y, w, h) in boxes.items() if gx <= x and gy <= y and x + w <= gx + gw
                and y + h <= gy + gh]
        assert held, group["title"]
    editor.fit_view()
    shot(editor, "workflow - " + os.path.basename(path)[:-5])


def test_template_browser_shows_the_pack_with_thumbnails(editor, server):
    """The browser lists the pack under its translated name (locales/en/main.json), each workflow by its title,
    with its thumbnail."""
    listed = server.get_json("/api/workflow_templates")
    names = sorted(os.path.basename(p)[:-5] for p in EXAMPLES)
    pack = next(k for k, v in listed.items() if sorted(v) == names)
    with open(os.path.join(REPO, "locales", "en", "main.json"), encoding="utf-8") as f:
        label = json.load(f)["templateWorkflows"]["category"][pack]
    editor.close_dialogs()
    editor.responses.clear()
    editor.evaluate("() => { app.extensionManager.command.execute('Comfy.BrowseTemplates'); return 1; }")
    editor.page.wait_for_selector("text=Custom Nodes", timeout=30000)
    editor.page.get_by_text(label, exact=True).first.click()
    editor.page.wait_for_timeout(2000)
    shown = editor.evaluate("""() => [...document.querySelectorAll('img')]
        .filter(i => i.src.startsWith('blob:') && i.complete).map(i => [i.naturalWidth, i.naturalHeight])""")
    shot(editor, "template browser")
    editor.close_dialogs()
    asked = {os.path.basename(unquote(url))[:-4]: status for status, url in editor.responses
             if "/workflow_templates/" in url and url.endswith(".jpg")}
    assert asked and set(asked) <= set(names) and set(asked.values()) == {200}, asked
    assert [480, 360] in shown            # the cards in view show our thumbnails (workflows/thumbnails.py size)
    for name in names:   # every thumbnail the browser would ask for, cards out of view included
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{pack}/{quote(name)}.jpg") as r:
            assert r.status == 200 and r.read(3) == b"\xff\xd8\xff"     # a JPEG


def test_widget_layouts_match_the_editor(editor, server):
    """Every node type the live editor registers gets the widgets batch/widgets.py predicts, in order."""
    info = server.get_json("/object_info")
    real = editor.evaluate("""async () => {
      const out = {};
      for (const t of Object.keys(LiteGraph.registered_node_types)) {
        let n; try { n = LiteGraph.createNode(t); app.graph.add(n); } catch (e) { continue; }
        await new Promise(r => setTimeout(r, 0));
        out[t] = {virtual: !!n.isVirtualNode, widgets: (n.widgets || []).map(w => [w.name, w.serialize !== false])};
        app.graph.remove(n);
      }
      return out;
    }""")
    wrong = {}
    for kind, spec in info.items():
        if kind not in real or real[kind]["virtual"]:
            continue
        ours = [[w.name, w.saved] for w in widget_layout(spec, kind)]
        if ours != real[kind]["widgets"]:
            wrong[kind] = {"editor": real[kind]["widgets"], "ours": ours}
    assert wrong == {}
    assert len(real) > 300


@pytest.mark.parametrize("name", sorted(frontend_cases.CASES))
def test_editor_built_cases_convert_like_the_editor(editor, server, name):
    info = server.get_json("/object_info")
    case = frontend_cases.record_case(editor, name)
    now = datetime.datetime.fromisoformat(case["now"])
    if name == "load3d":
        with pytest.raises(ValueError, match="3D viewer"):
            to_api(case["saved"], info, now=now)
        return
    for form in ("saved", "exported"):
        assert to_api(case[form], info, now=now) == case["prompt"], form
    editor.fit_view()
    shot(editor, f"case - {name}")
