"""Workflows built and saved by the real ComfyUI editor, with the editor's own API prompt for each.

Each case builds a graph in the live editor with the frontend's own operations (creating and linking nodes,
"Convert to Subgraph", the Bypass / Mute commands, "Convert to Group Node"), then records what the editor saves
and what its ``graphToPrompt`` queues. The cases cover what batch/convert.py must get right: widgets a subgraph
shows (one definition, two subgraph nodes with their own values), nested subgraphs, bypass and mute on subgraph
nodes, a legacy group node, upload widgets (LoadImageMask), Load3D's extension widgets, a PrimitiveNode, and ``%...%``
text replacement.

    COMFYUI_URL=http://127.0.0.1:8188 python tests/comfyui/frontend_cases.py    # (re)write tests/data/frontend/

The recorded files are what tests/test_batch_subgraphs.py checks the converter against in CI;
tests/comfyui/test_editor_browser.py builds the same cases live and compares again.
"""
import datetime
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(os.path.dirname(HERE), "data", "frontend")

# Shared helpers, defined once per page.
HELPERS = """
() => {
  window.__rl = {
    add(type, x, y, values) {
      const n = LiteGraph.createNode(type);
      n.pos = [x, y];
      app.graph.add(n);
      for (const [k, v] of Object.entries(values || {})) this.set(n, k, v);
      return n;
    },
    set(node, name, value) {
      const w = node.widgets.find(w => w.name === name);
      if (!w) throw new Error(`no widget ${name} on ${node.type}: ${node.widgets.map(w => w.name)}`);
      w.value = value;
    },
    slot(node, name) {
      const i = node.inputs.findIndex(i => i.name === name);
      if (i < 0) throw new Error(`no input ${name} on ${node.type}`);
      return i;
    },
    link(a, out, b, name) { a.connect(out, b, this.slot(b, name)); },
    command(id, nodes) {
      app.canvas.deselectAll();
      for (const n of nodes) app.canvas.select(n);
      return app.extensionManager.command.execute(id);
    },
    subgraph(nodes, name) {
      const { node, subgraph } = app.graph.convertToSubgraph(new Set(nodes));
      subgraph.name = name;
      return node;
    },
    txt2img(x, y) {
      const ck = this.add('CheckpointLoaderSimple', x, y, {ckpt_name: 'tiny.safetensors'});
      const pos = this.add('CLIPTextEncode', x + 400, y, {text: 'a red fox in the snow'});
      const neg = this.add('CLIPTextEncode', x + 400, y + 260, {text: 'blurry'});
      const lat = this.add('EmptyLatentImage', x + 400, y + 520, {width: 64, height: 64, batch_size: 1});
      ck.connect(1, pos, 0); ck.connect(1, neg, 0);
      return {ck, pos, neg, lat};
    },
    sampler(g, x, y, seed, steps) {
      const ks = this.add('KSampler', x, y, {seed, steps, cfg: 5.5});
      const dec = this.add('VAEDecode', x + 350, y);
      g.ck.connect(0, ks, this.slot(ks, 'model'));
      g.pos.connect(0, ks, this.slot(ks, 'positive'));
      g.neg.connect(0, ks, this.slot(ks, 'negative'));
      g.lat.connect(0, ks, this.slot(ks, 'latent_image'));
      ks.connect(0, dec, 0); g.ck.connect(2, dec, 1);
      return {ks, dec};
    },
  };
  return true;
}
"""

# Each case returns nothing; it leaves its graph in app.graph.
CASES = {
    # One subgraph definition used by two subgraph nodes; seed and steps are shown on the subgraph nodes
    # (promoted by linking them from outside before converting, then unlinking), each node with its own values.
    "subgraph_two_instances": """
async () => {
  const r = window.__rl; app.graph.clear();
  const g = r.txt2img(0, 0);
  const {ks, dec} = r.sampler(g, 900, 0, 11, 6);
  const save = r.add('SaveImage', 1600, 0, {filename_prefix: 'rl/first'});
  dec.connect(0, save, 0);
  const seed = r.add('PrimitiveInt', 500, 800, {value: 3});
  const steps = r.add('PrimitiveInt', 500, 950, {value: 4});
  seed.connect(0, ks, r.slot(ks, 'seed'));
  steps.connect(0, ks, r.slot(ks, 'steps'));
  const sg = r.subgraph([ks, dec, save], 'Sample and save');
  for (const name of ['seed', 'steps']) sg.disconnectInput(r.slot(sg, name));
  app.graph.remove(seed); app.graph.remove(steps);
  r.set(sg, 'seed', 101); r.set(sg, 'steps', 7);
  const second = sg.clone(); second.pos = [900, 700]; app.graph.add(second);
  for (const name of ['model', 'positive', 'negative', 'latent_image', 'vae']) {
    const i = r.slot(sg, name); const link = app.graph.getLink(sg.inputs[i].link);
    app.graph.getNodeById(link.origin_id).connect(link.origin_slot, second, i);
  }
  r.set(second, 'seed', 202); r.set(second, 'steps', 3);
}
""",
    # A subgraph inside a subgraph (text encoders inside "Prepare"), a bypassed subgraph node on the MODEL path
    # (passes the checkpoint's MODEL through) and a muted subgraph node with a preview (left out).
    "nested_bypass_mute": """
async () => {
  const r = window.__rl; app.graph.clear();
  const g = r.txt2img(0, 0);
  const lora = r.add('LoraLoaderModelOnly', 400, 900, {lora_name: 'style.safetensors', strength_model: 0.7});
  g.ck.connect(0, lora, 0);
  const ks = r.add('KSampler', 1200, 0, {seed: 5, steps: 4, cfg: 6.0});
  lora.connect(0, ks, r.slot(ks, 'model'));
  g.pos.connect(0, ks, r.slot(ks, 'positive'));
  g.neg.connect(0, ks, r.slot(ks, 'negative'));
  g.lat.connect(0, ks, r.slot(ks, 'latent_image'));
  const dec = r.add('VAEDecode', 1600, 0); ks.connect(0, dec, 0); g.ck.connect(2, dec, 1);
  const save = r.add('SaveImage', 1900, 0, {filename_prefix: 'rl/nested'}); dec.connect(0, save, 0);
  const dec2 = r.add('VAEDecode', 1600, 400); ks.connect(0, dec2, 0); g.ck.connect(2, dec2, 1);
  const preview = r.add('PreviewImage', 1900, 400); dec2.connect(0, preview, 0);
  const encode = r.subgraph([g.pos, g.neg], 'Encode prompts');
  r.subgraph([encode, g.lat], 'Prepare');
  const style = r.subgraph([lora], 'Style LoRA');
  const extra = r.subgraph([dec2, preview], 'Extra preview');
  await r.command('Comfy.Canvas.ToggleSelectedNodes.Bypass', [style]);
  await r.command('Comfy.Canvas.ToggleSelectedNodes.Mute', [extra]);
}
""",
    # Upload widgets (LoadImageMask), a PrimitiveNode with text replacement, %...% in file names.
    "widgets_and_text": """
async () => {
  const r = window.__rl; app.graph.clear();
  const g = r.txt2img(0, 0);
  const {ks, dec} = r.sampler(g, 900, 0, 77, 5);
  const prefix = 'rl/%date:yyyy-MM-dd%/%KSampler.seed%_%Empty Latent Image.width%';
  const save = r.add('SaveImage', 1600, 0, {filename_prefix: prefix});
  dec.connect(0, save, 0);
  const mask = r.add('LoadImageMask', 0, 900, {image: 'example.png', channel: 'green'});
  const masked = r.add('SetLatentNoiseMask', 400, 900);
  g.lat.connect(0, masked, 0); mask.connect(0, masked, 1);
  const ks2 = r.add('KSampler', 900, 900, {seed: 8, steps: 3});
  g.ck.connect(0, ks2, r.slot(ks2, 'model')); g.pos.connect(0, ks2, r.slot(ks2, 'positive'));
  g.neg.connect(0, ks2, r.slot(ks2, 'negative')); masked.connect(0, ks2, r.slot(ks2, 'latent_image'));
  const dec2 = r.add('VAEDecode', 1300, 900); ks2.connect(0, dec2, 0); g.ck.connect(2, dec2, 1);
  const preview = r.add('PreviewImage', 1600, 900); dec2.connect(0, preview, 0);
  const prim = LiteGraph.createNode('PrimitiveNode'); prim.pos = [0, 1300]; app.graph.add(prim);
  prim.connect(0, g.pos, r.slot(g.pos, 'text'));
  prim.widgets[0].value = 'a fox, seed %KSampler.seed%, %date:yyyy%';
  prim.properties['Run widget replace on values'] = true;
}
""",
    # Load3D: its buttons sit between model_file and the viewer; the viewer's render is made when queueing.
    "load3d": """
async () => {
  const r = window.__rl; app.graph.clear();
  const l3 = r.add('Load3D', 0, 0, {width: 320, height: 240});
  const p3 = r.add('PreviewImage', 600, 0); l3.connect(0, p3, 0);
}
""",
    # The legacy "Convert to Group Node" (deprecated, still in the editor): KSampler + VAEDecode as one node.
    "legacy_group_node": """
async () => {
  const r = window.__rl; app.graph.clear();
  const g = r.txt2img(0, 0);
  const {ks, dec} = r.sampler(g, 900, 0, 42, 7);
  const save = r.add('SaveImage', 1600, 0, {filename_prefix: 'rl/group'});
  dec.connect(0, save, 0);
  app.canvas.deselectAll(); app.canvas.select(ks); app.canvas.select(dec);
  app.extensionManager.command.execute('Comfy.GroupNode.ConvertSelectedNodesToGroupNode');
}
""",
}
NEEDS_NAME_DIALOG = {"legacy_group_node": "sample and decode"}
AFTER_DIALOG = {"legacy_group_node": """
() => {
  const group = app.graph.nodes.find(n => n.type.startsWith('workflow>'));
  const set = (name, v) => { group.widgets.find(w => w.name === name).value = v; };
  set('seed', 4242); set('steps', 9);
}
"""}


def build(editor, name):
    """Build case ``name`` in the live editor."""
    editor.close_dialogs()
    editor.evaluate(HELPERS)
    if name in NEEDS_NAME_DIALOG:
        editor.evaluate(f"() => {{ ({CASES[name].strip()})(); return 1; }}")   # the name dialog blocks the command
        editor.page.wait_for_selector(".p-dialog input", timeout=20000)
        box = editor.page.locator(".p-dialog input").first
        box.fill(NEEDS_NAME_DIALOG[name])
        box.press("Enter")
        editor.page.wait_for_function("() => app.graph.nodes.some(n => n.type.startsWith('workflow>'))",
                                      timeout=20000)
    else:
        editor.evaluate(CASES[name])
    if name in AFTER_DIALOG:
        editor.evaluate(AFTER_DIALOG[name])
    editor.page.wait_for_timeout(200)


def record_case(editor, name):
    """{"saved": what the editor saves, "queued": (workflow, prompt) of graphToPrompt, "now": the browser's time}."""
    build(editor, name)
    for _ in range(3):   # a minute must not tick over between the clock reading and the conversion
        before = editor.evaluate("() => new Date().toISOString()")
        queued = editor.graph_to_prompt()
        after = editor.evaluate("() => new Date().toISOString()")
        if before[:16] == after[:16]:
            break
    offset = editor.evaluate("() => -new Date().getTimezoneOffset()")
    local = datetime.datetime.fromisoformat(before.replace("Z", "+00:00")) + datetime.timedelta(minutes=offset)
    return {"saved": editor.serialize(), "exported": queued["workflow"], "prompt": queued["output"],
            "now": local.replace(tzinfo=None).isoformat(timespec="seconds")}


def record_template(editor, workflow):
    """The editor's API prompt for a workflow file (loaded as the template browser loads one)."""
    editor.load(workflow)
    return editor.graph_to_prompt()["output"]


def workflow_node_types(workflow):
    graphs = [workflow, *((workflow.get("definitions") or {}).get("subgraphs") or [])]
    graphs += list(((workflow.get("extra") or {}).get("groupNodes") or {}).values())
    return {n["type"] for g in graphs for n in g.get("nodes") or []}


def object_info_subset(info, cases):
    kinds = set()
    for case in cases.values():
        kinds |= {n["class_type"] for n in case["prompt"].values()}
        kinds |= workflow_node_types(case.get("saved") or case["workflow"])
    kinds.add("PrimitiveInt")     # the builders use it (to show a widget on a subgraph node) and remove it again
    return {k: info[k] for k in sorted(kinds) if k in info}


TEMPLATES = os.path.join(os.path.dirname(HERE), "data", "templates")


def record_templates(url, paths, out_dir=TEMPLATES, source=""):
    """Official template files with the editor's prompt for each, for tests/test_batch_subgraphs.py."""
    import urllib.request

    sys.path.insert(0, HERE)
    from editor import Editor

    with urllib.request.urlopen(url + "/object_info", timeout=60) as r:
        info = json.loads(r.read())
    os.makedirs(out_dir, exist_ok=True)
    with Editor(url) as editor:
        frontend = editor.graph_to_prompt()["workflow"].get("extra", {}).get("frontendVersion")
        for path in paths:
            with open(path, encoding="utf-8") as f:
                workflow = json.load(f)
            case = {"source": source, "frontend": frontend, "workflow": workflow,
                    "prompt": record_template(editor, workflow)}
            case["object_info"] = object_info_subset(info, {"case": case})
            with open(os.path.join(out_dir, os.path.basename(path)), "w", encoding="utf-8") as f:
                json.dump(case, f, ensure_ascii=False, separators=(",", ":"))
                f.write("\n")


def record(url, out_dir=FIXTURES):
    import urllib.request

    sys.path.insert(0, HERE)
    from editor import Editor

    with urllib.request.urlopen(url + "/object_info", timeout=60) as r:
        info = json.loads(r.read())
    cases = {}
    with Editor(url) as editor:
        for name in CASES:
            cases[name] = record_case(editor, name)
        frontend = cases[name]["exported"].get("extra", {}).get("frontendVersion")
    os.makedirs(out_dir, exist_ok=True)
    for name, case in cases.items():
        case["frontend"] = frontend
        with open(os.path.join(out_dir, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(case, f, indent=1, ensure_ascii=False)
            f.write("\n")
    with open(os.path.join(out_dir, "object_info.json"), "w", encoding="utf-8") as f:
        json.dump(object_info_subset(info, cases), f, indent=1, ensure_ascii=False)
        f.write("\n")
    return sorted(cases)


if __name__ == "__main__":
    print(record(os.environ.get("COMFYUI_URL", "http://127.0.0.1:8188").rstrip("/")))
