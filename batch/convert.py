"""Editor-format workflow (nodes + links, as the ComfyUI editor saves it) -> API-format prompt for ``POST /prompt``.

The rules follow what the frontend's ``graphToPrompt`` does (ComfyUI_frontend ``src/utils/executionUtil.ts`` and
litegraph's ``ExecutableNodeDTO``), written here from those facts:

- widget values are positional (``widgets_values``), in the node's input order from ``/object_info`` (required, then
  optional); widget inputs are INT, FLOAT, STRING, BOOLEAN and combos, unless ``forceInput``. UI-only widgets take a
  slot but are not sent: ``control_after_generate`` after an INT named seed/noise_seed or flagged
  ``control_after_generate`` (combos flagged so get a second, ``control_filter_list``), and the upload button after
  an ``image_upload`` combo. Missing trailing values take the spec default; an array value is sent as
  ``{"__value__": [...]}``; ``dynamicPrompts`` strings lose comments and pick one option of each ``{a|b}``;
- a linked input (converted widget or socket) is sent as ``[origin_id, origin_slot]`` after resolving links:
  through Reroute nodes (same slot), through bypassed nodes (mode 4: the input at the same slot if its type fits,
  else the first input of the target type, else the first compatible one), never through muted nodes (mode 2:
  dropped, and so is any input linked to them);
- PrimitiveNode (frontend-only) writes its value into every widget it feeds (following Reroutes);
- Note / MarkdownNote / Reroute / PrimitiveNode never reach the prompt; groups are layout only (a bypassed or
  muted group is saved as the mode of its nodes);
- ``_meta.title`` is the node's title (its display name unless renamed).
"""
import json
import random
import re

from .stock_nodes import VIRTUAL_NODES

MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "increment-wrap", "decrement", "randomize"}


class WorkflowError(ValueError):
    """A workflow that cannot be converted; the message names the node and the fix."""


# --- format detection and loading -----------------------------------------------------------------------------

def is_editor_format(data):
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def is_api_format(data):
    return isinstance(data, dict) and bool(data) and all(
        isinstance(v, dict) and "class_type" in v for v in data.values())


def load_workflow(path):
    """Read a workflow file: editor or API JSON, a ``{"prompt": ...}`` request body, or a ComfyUI PNG (which
    embeds both; the API prompt is preferred)."""
    if str(path).lower().endswith(".png"):
        from PIL import Image

        with Image.open(path) as img:
            meta = dict(img.info)
        text = meta.get("prompt") or meta.get("workflow")
        if not text:
            raise WorkflowError(f"{path}: PNG carries no ComfyUI workflow (no 'prompt'/'workflow' text chunk)")
        return json.loads(text)
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(data, dict) and is_api_format(data.get("prompt")):
        return data["prompt"]
    return data


def to_api(workflow, object_info, rng=None):
    """API-format prompt from an editor or API workflow. API input is returned unchanged (a copy).
    ``{a|b}`` dynamic prompts are resolved with ``rng`` (default: seeded, so a conversion, and with it the
    resume key of every run, is reproducible; the editor re-rolls them on every queue)."""
    if is_api_format(workflow):
        return json.loads(json.dumps(workflow))
    if not is_editor_format(workflow):
        raise WorkflowError("not a ComfyUI workflow: expected the editor format (nodes + links) or the API format "
                            "({id: {class_type, inputs}})")
    if workflow.get("definitions", {}).get("subgraphs"):
        raise WorkflowError("subgraphs are not supported yet: unpack them in the editor (right click > Unpack "
                            "Subgraph) and save again, or export with 'Export (API)'")
    return _Graph(workflow, object_info, rng or random.Random(0)).prompt()


# --- input specs ----------------------------------------------------------------------------------------------

def input_specs(info):
    """[(name, type, options)] in the node's widget order: required then optional (``input_order`` if given)."""
    out = []
    for section in ("required", "optional"):
        entries = info.get("input", {}).get(section) or {}
        order = info.get("input_order", {}).get(section) or list(entries)
        for name in order:
            entry = entries[name]
            if isinstance(entry, str):
                entry = [entry]
            typ = entry[0]
            opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            out.append((name, typ, opts))
    return out


def is_widget(typ, opts):
    if opts.get("forceInput") or opts.get("rawLink"):
        return False
    return isinstance(typ, list) or typ in WIDGET_TYPES


def combo_options(typ, opts):
    return typ if isinstance(typ, list) else opts.get("options")


def widget_slots(info):
    """Positional layout of ``widgets_values``: [(input name or None for a UI-only widget, type, opts)]."""
    slots = []
    for name, typ, opts in input_specs(info):
        if not is_widget(typ, opts):
            continue
        slots.append((name, typ, opts))
        combo = combo_options(typ, opts) is not None
        if typ == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
            slots.append((None, "control_after_generate", {}))
        elif combo and opts.get("control_after_generate"):
            slots += [(None, "control_after_generate", {}), (None, "control_filter_list", {})]
        if combo and (opts.get("image_upload") or opts.get("video_upload") or opts.get("audio_upload")):
            slots.append((None, "upload", {}))
    return slots


def default_value(typ, opts):
    if "default" in opts:
        return opts["default"]
    options = combo_options(typ, opts)
    if options:
        return options[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(typ)


def widget_values(node, info):
    """{input name: value} of a node's widgets, read positionally (or by name when saved as a dict)."""
    saved = node.get("widgets_values")
    values = {}
    slots = widget_slots(info)
    if isinstance(saved, dict):
        return {name: saved.get(name, default_value(t, o)) for name, t, o in slots if name}
    saved = list(saved or [])
    for i, (name, typ, opts) in enumerate(slots):
        if name is not None:
            values[name] = saved[i] if i < len(saved) else default_value(typ, opts)
    return values


# --- dynamic prompts ----------------------------------------------------------------------------------------------

_COMMENTS = re.compile(r"/\*[\s\S]*?\*/|//.*")


def dynamic_prompt(text, rng):
    """Strip C-style comments and replace each ``{a|b|c}`` group (nestable, ``\\`` escapes) by one option."""
    text = _COMMENTS.sub("", text)
    out, i = "", 0
    while i < len(text):
        c = text[i]
        i += 1
        if c == "\\" and i < len(text):  # an escape is kept as written
            out += c + text[i]
            i += 1
        elif c == "{":
            chosen, i = _choose(text, i, rng)
            out += chosen
        else:
            out += c
    return out


def _choose(text, i, rng):
    """Read the options of a group from just after its '{'; returns (one option, expanded; index after '}')."""
    options, current, depth = [], "", 0
    while i < len(text):
        c = text[i]
        i += 1
        if c == "\\" and i < len(text):
            current += c + text[i]
            i += 1
            continue
        if c == "}" and depth == 0:
            break
        if c == "|" and depth == 0:
            options.append(current)
            current = ""
            continue
        depth += (c == "{") - (c == "}")
        current += c
    options.append(current)
    return dynamic_prompt(options[int(rng.random() * len(options))], rng), i


# --- the graph ------------------------------------------------------------------------------------------------

def link_rows(workflow):
    """Links as [id, origin id, origin slot, target id, target slot, type] rows (schema 1.0 stores objects)."""
    rows = []
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                    link.get("type")]
        rows.append(list(link[:6]))
    return rows


def types_compatible(a, b):
    """litegraph's isValidConnection: '*'/'' match anything, case-insensitive, comma lists match any member."""
    a = "" if a in ("*", None) else str(a)
    b = "" if b in ("*", None) else str(b)
    if not a or not b or a == b:
        return True
    a, b = a.lower(), b.lower()
    if "," not in a and "," not in b:
        return a == b
    return any(types_compatible(x, y) for x in a.split(",") for y in b.split(","))


class _Graph:
    def __init__(self, workflow, object_info, rng):
        self.info = object_info
        self.rng = rng
        self.nodes = {str(n["id"]): n for n in workflow["nodes"]}
        self.links = {row[0]: (str(row[1]), int(row[2]), str(row[3]), int(row[4]), row[5])
                      for row in link_rows(workflow)}
        self.outgoing = {}
        for lid, (src, _, dst, _, _) in self.links.items():
            self.outgoing.setdefault(src, []).append(lid)
        self.widget_overrides = {}  # node id -> {input: value} written by PrimitiveNodes

    def prompt(self):
        for nid, node in self.nodes.items():
            if node.get("type") == "PrimitiveNode":
                self._apply_primitive(nid, node)
        out = {}
        for nid, node in self.nodes.items():
            kind = node.get("type")
            if kind in VIRTUAL_NODES or node.get("mode", 0) in (MODE_NEVER, MODE_BYPASS):
                continue
            if str(kind).startswith("workflow>") or str(kind).startswith("workflow/"):
                raise WorkflowError(f"node {nid} is a legacy group node ({kind}): convert it back to nodes in the "
                                    f"editor (right click > Convert to nodes) and save again")
            if kind not in self.info:
                raise WorkflowError(f"node {nid} has type {kind!r}, which the server does not know: install the "
                                    f"custom node pack that provides it, or remove the node")
            out[nid] = self._convert(nid, node, self.info[kind])
        for entry in out.values():  # inputs linked to dropped nodes are removed, as the frontend does
            for name, value in list(entry["inputs"].items()):
                if isinstance(value, list) and len(value) == 2 and value[0] not in out:
                    del entry["inputs"][name]
        return out

    def _convert(self, nid, node, info):
        inputs = {}
        values = widget_values(node, info)
        specs = {name: (typ, opts) for name, typ, opts in input_specs(info)}
        values.update({k: v for k, v in self.widget_overrides.get(nid, {}).items() if k in specs})
        for name, value in values.items():
            typ, opts = specs[name]
            if typ == "STRING" and opts.get("dynamicPrompts") and isinstance(value, str):
                value = dynamic_prompt(value, self.rng)
            inputs[name] = {"__value__": value} if isinstance(value, list) else value
        for slot, inp in enumerate(node.get("inputs") or []):
            resolved = self._resolve_input(nid, slot, None, set())
            if resolved is not None:
                inputs[inp["name"]] = [resolved[0], resolved[1]]
        title = node.get("title") or info.get("display_name") or node["type"]
        return {"inputs": inputs, "class_type": node["type"], "_meta": {"title": title}}

    def _input_link(self, nid, slot):
        inputs = self.nodes[nid].get("inputs") or []
        if slot >= len(inputs) or inputs[slot].get("link") is None:
            return None
        lid = inputs[slot]["link"]
        if lid not in self.links:
            raise WorkflowError(f"node {nid} input {inputs[slot].get('name')!r} refers to missing link {lid}")
        return self.links[lid]

    def _resolve_input(self, nid, slot, want_type, visited):
        """(origin id, origin slot) feeding input ``slot`` of node ``nid``, or None (unlinked / unresolvable)."""
        key = (nid, "in", slot)
        if key in visited:
            raise WorkflowError(f"circular link through node {nid}")
        visited.add(key)
        link = self._input_link(nid, slot)
        if link is None:
            return None
        src, src_slot, _, _, _ = link
        if src not in self.nodes:
            raise WorkflowError(f"node {nid} is linked from missing node {src}")
        if want_type is None:
            want_type = self.nodes[nid]["inputs"][slot].get("type")
        return self._resolve_output(src, src_slot, want_type, visited)

    def _resolve_output(self, nid, slot, want_type, visited):
        key = (nid, "out", slot)
        if key in visited:
            raise WorkflowError(f"circular link through node {nid}")
        visited.add(key)
        node = self.nodes[nid]
        if node.get("mode", 0) == MODE_BYPASS:
            index = self._bypass_input(node, slot, want_type)
            return None if index < 0 else self._resolve_input(nid, index, None, visited)
        if node.get("type") in VIRTUAL_NODES:
            if slot < len(node.get("inputs") or []):
                return self._resolve_input(nid, slot, want_type, visited)
            return None  # PrimitiveNode / Note: their value, if any, was written into the target widget
        return (nid, slot)

    @staticmethod
    def _bypass_input(node, slot, want_type):
        inputs = node.get("inputs") or []
        outputs = node.get("outputs") or []
        out_type = outputs[slot].get("type") if slot < len(outputs) else None
        if want_type in ("*", "", None):
            return slot if len(inputs) > slot else (0 if inputs else -1)
        if slot < len(inputs) and types_compatible(inputs[slot].get("type"), out_type) \
                and types_compatible(inputs[slot].get("type"), want_type):
            return slot
        for i, inp in enumerate(inputs):
            if inp.get("type") == want_type:
                return i
        for i, inp in enumerate(inputs):
            if types_compatible(inp.get("type"), out_type) and types_compatible(inp.get("type"), want_type):
                return i
        return -1

    def _apply_primitive(self, nid, node):
        saved = node.get("widgets_values")
        if not saved:
            return
        value = saved[0] if isinstance(saved, list) else next(iter(saved.values()))
        for lid in self._targets_through_reroutes(nid):
            _, _, dst, dst_slot, _ = self.links[lid]
            inputs = self.nodes[dst].get("inputs") or []
            if dst_slot < len(inputs):
                widget = inputs[dst_slot].get("widget") or {}
                name = widget.get("name") or inputs[dst_slot].get("name")
                self.widget_overrides.setdefault(dst, {})[name] = value

    def _targets_through_reroutes(self, nid, seen=None):
        seen = seen if seen is not None else set()
        found = []
        for lid in self.outgoing.get(nid, []):
            dst = self.links[lid][2]
            if self.nodes.get(dst, {}).get("type") == "Reroute":
                if dst not in seen:
                    seen.add(dst)
                    found += self._targets_through_reroutes(dst, seen)
            else:
                found.append(lid)
        return found
