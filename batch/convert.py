"""Editor-format workflow (nodes + links, as the ComfyUI editor saves it) -> API-format prompt for ``POST /prompt``.

The rules are those of the frontend's ``graphToPrompt`` (ComfyUI_frontend ``src/utils/executionUtil.ts``) and of
litegraph's ``ExecutableNodeDTO`` / ``SubgraphNode`` and the legacy group-node extension, written here from those
facts (read in frontend 1.27.10, the version ComfyUI v0.3.64 ships) and checked against the real frontend in
``tests/comfyui/test_editor_browser.py``:

- **Flattening.** Every node gets an execution id: its id, prefixed by the ids of the subgraph nodes it sits in
  (``"12:5"`` is node 5 of the subgraph that node 12 instantiates; nested subgraphs add more parts). A legacy group
  node ``G`` (type ``workflow>NAME``, defined in ``extra.groupNodes``) expands to ``G:0``, ``G:1``, ... (its nodes
  by index). Subgraph definitions live in ``definitions.subgraphs``; links from a definition's input node (id
  -10) lead to the subgraph node's input of the same name, links to its output node (-20) to its outputs.
- **Widgets** are read by position (batch/widgets.py; a count or type mismatch is refused, never shifted). A
  widget that a subgraph exposes (an input of the subgraph linked to an inner widget, "promoted") takes the
  subgraph node's own saved value (``widgets_values`` in the order of those inputs), else the inner widget's value;
  when the subgraph node's input is linked, the link wins. Group-node widgets map to their inner widgets by the
  group's own input layout (rebuilt from the inner nodes' specs, as the frontend does when it loads the file).
- **Links** resolve through Reroute nodes (same slot), through bypassed nodes (mode 4: the input at the same slot
  if its type fits, else the first input of the target type, else the first compatible one), into subgraphs and out
  of them. Inputs linked to muted nodes (mode 2) are dropped, as are muted and bypassed nodes themselves. A muted or
  bypassed subgraph or group node drops everything inside it (the editor sets its inner nodes to its mode when you
  toggle it); a bypassed one passes its inputs through to its outputs.
- **PrimitiveNode** writes its value into every widget it feeds (through Reroutes), **Note / MarkdownNote /
  Reroute / PrimitiveNode** never reach the prompt, groups are layout only; ``_meta.title`` is the node's title.
- **Text**: ``dynamicPrompts`` strings and ``%date:...%`` / ``%NODE.widget%`` replacements (batch/text.py).
"""
import json
import random
from dataclasses import dataclass, field

from .stock_nodes import VIRTUAL_NODES
from .text import REPLACE_PROPERTY, SAVE_NODE_TYPES, SEARCH_NAME_PROPERTY, Replacements, dynamic_prompt
from .widgets import (QUEUE_TIME_WIDGETS, WidgetLayoutError, input_specs, is_widget, ordered_inputs,
                      read_widget_values)

MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
SUBGRAPH_INPUT, SUBGRAPH_OUTPUT = -10, -20
GROUP_NODE_PREFIXES = ("workflow>", "workflow/")


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


@dataclass
class Conversion:
    """An API prompt plus the text the editor would still rewrite when queueing it (``replacements.apply``)."""
    prompt: dict
    replacements: Replacements = field(default_factory=Replacements)

    def final(self, prompt=None, now=None):
        """``prompt`` (default: this one) as the editor would queue it now: ``%date%`` etc. replaced."""
        return self.replacements.apply(self.prompt if prompt is None else prompt, now)


def convert(workflow, object_info, rng=None):
    """Conversion of an editor or API workflow. API input is returned unchanged (a copy). ``{a|b}`` dynamic
    prompts are resolved with ``rng`` (default: seeded, so a conversion, and with it the resume key of every run,
    is reproducible; the editor re-rolls them on every queue)."""
    if is_api_format(workflow):
        return Conversion(json.loads(json.dumps(workflow)))
    if not is_editor_format(workflow):
        raise WorkflowError("not a ComfyUI workflow: expected the editor format (nodes + links) or the API format "
                            "({id: {class_type, inputs}})")
    return _Flattener(workflow, object_info, rng or random.Random(0)).conversion()


def to_api(workflow, object_info, rng=None, now=None):
    """The API prompt the editor would queue for this workflow now (text replacements done)."""
    conversion = convert(workflow, object_info, rng)
    return conversion.final(now=now)


# --- links and types ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Link:
    origin: str
    origin_slot: int
    target: str
    target_slot: int
    type: object = None


def link_rows(graph):
    """Links as [id, origin id, origin slot, target id, target slot, type] rows (schema 1.0 and subgraph
    definitions store objects)."""
    rows = []
    for link in graph.get("links") or []:
        if isinstance(link, dict):
            link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                    link.get("type")]
        rows.append(list(link[:6]) + [None] * (6 - len(link[:6])))
    return rows


def _links(graph):
    return {int(r[0]): Link(str(r[1]), int(r[2]), str(r[3]), int(r[4]), r[5]) for r in link_rows(graph)
            if r[1] is not None and r[3] is not None}


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


def is_group_node_type(kind):
    return isinstance(kind, str) and kind.startswith(GROUP_NODE_PREFIXES)


# --- the flattened graph --------------------------------------------------------------------------------------

class _Scope:
    """One graph: the root workflow or a subgraph definition."""

    def __init__(self, data, sid=None, name=None):
        self.id, self.name, self.data = sid, name, data
        self.nodes = {str(n["id"]): n for n in data.get("nodes") or []}
        self.links = _links(data)
        self.inputs = data.get("inputs") or []      # subgraph definitions: [{name, type, linkIds}]
        self.outputs = data.get("outputs") or []


@dataclass
class _Dto:
    """A node of the flattened graph (the frontend's ExecutableNodeDTO)."""
    id: str                      # execution id, e.g. "12:5"
    node: dict
    scope: _Scope
    path: tuple                  # ids of the subgraph / group nodes it sits in
    instance: "_Dto" = None      # the subgraph node whose definition holds this node
    group: "_GroupDef" = None    # for a group node, and for a node inside one
    dropped: bool = False        # inside a muted or bypassed subgraph or group node
    kind: str = "node"           # node | virtual | subgraph | group | group_child

    @property
    def mode(self):
        return self.node.get("mode", MODE_ALWAYS)

    @property
    def type(self):
        return self.node.get("type")

    def where(self):
        title = self.node.get("title")
        return f"node {self.id} ({self.type}{f' {title!r}' if title and title != self.type else ''})"


class _Flattener:
    def __init__(self, workflow, info, rng):
        self.info, self.rng = info, rng
        self.root = _Scope(workflow)
        subgraphs = (workflow.get("definitions") or {}).get("subgraphs") or []
        self.definitions = {s["id"]: _Scope(s, s["id"], s.get("name")) for s in subgraphs}
        self.group_data = (workflow.get("extra") or {}).get("groupNodes") or {}
        self.groups = {}
        self.dtos = {}
        self.overrides = {}        # (scope id, node id) -> {widget: value} written by PrimitiveNodes
        self.replace_targets = set()   # (scope id, node id, widget) fed by a PrimitiveNode with replacement on
        self._values = {}
        self._promoted = {}
        for scope in [self.root, *self.definitions.values()]:
            for nid, node in scope.nodes.items():
                if node.get("type") == "PrimitiveNode":
                    self._apply_primitive(scope, nid, node)
        self._expand(self.root, (), None, False, set())

    # --- flattening -------------------------------------------------------------------------------------------------
    def _expand(self, scope, path, instance, dropped, stack):
        for nid, node in scope.nodes.items():
            kind = node.get("type")
            dto = _Dto(":".join([*path, nid]), node, scope, path, instance, dropped=dropped)
            self.dtos[dto.id] = dto
            inner_dropped = dropped or dto.mode in (MODE_NEVER, MODE_BYPASS)
            if kind in self.definitions:
                if kind in stack:
                    raise WorkflowError(f"{dto.where()}: subgraph {self.definitions[kind].name!r} contains itself")
                dto.kind = "subgraph"
                self._expand(self.definitions[kind], (*path, nid), dto, inner_dropped, stack | {kind})
            elif is_group_node_type(kind):
                dto.kind = "group"
                self._expand_group(dto, inner_dropped)
            elif kind in VIRTUAL_NODES:
                dto.kind = "virtual"

    def _expand_group(self, dto, dropped):
        name = dto.type.split(">", 1)[-1] if ">" in dto.type else dto.type.split("/", 1)[-1]
        if dto.path:
            raise WorkflowError(f"{dto.where()}: a legacy group node inside a subgraph cannot run (the editor refuses "
                                f"it too): convert the group node to a subgraph in the editor")
        if name not in self.group_data:
            raise WorkflowError(f"{dto.where()}: group node {name!r} is not defined in this file "
                                f"(extra.groupNodes); open the file in the editor and save it again")
        if name not in self.groups:
            self.groups[name] = _GroupDef(name, self.group_data[name], self.info)
        dto.group = self.groups[name]
        for index, inner in enumerate(dto.group.nodes):
            child = _Dto(f"{dto.id}:{index}", inner, dto.scope, (dto.id,), None, dto.group, dropped,
                         "group_child")
            if inner.get("type") in VIRTUAL_NODES:
                child.kind = "virtual"
            self.dtos[child.id] = child

    # --- the prompt -------------------------------------------------------------------------------------------------
    def emitted(self):
        """The nodes that reach the prompt: real nodes, not muted or bypassed, not inside a dropped subgraph."""
        return [dto for dto in self.dtos.values() if dto.kind in ("node", "group_child") and not dto.dropped
                and dto.mode not in (MODE_NEVER, MODE_BYPASS)]

    def conversion(self):
        out, targets = {}, []
        emitted = self.emitted()
        unknown = [dto for dto in emitted if dto.type not in self.info]
        if unknown:
            kinds = sorted({dto.type for dto in unknown})
            raise WorkflowError(f"{unknown[0].where()} has a type the server does not know"
                                f"{f' (also {len(kinds) - 1} more types: {kinds})' if len(kinds) > 1 else ''}: install "
                                f"the custom node pack that provides it, or remove the node")
        for dto in emitted:
            out[dto.id] = self._node_prompt(dto)
            if dto.type in QUEUE_TIME_WIDGETS:
                name, what = QUEUE_TIME_WIDGETS[dto.type]
                if not isinstance(out[dto.id]["inputs"].get(name), dict):
                    raise WorkflowError(f"{dto.where()}: its {name!r} input is {what}, which the editor makes when you "
                                        f"queue from it; a batch run has no editor. Save that image and load it with "
                                        f"Load Image instead")
            key = (dto.scope.id, dto.node.get("id"))
            if dto.type in SAVE_NODE_TYPES and "filename_prefix" in out[dto.id]["inputs"]:
                targets.append((dto.id, "filename_prefix"))
            targets += [(dto.id, w) for s, n, w in self.replace_targets if (s, n) == key and dto.kind == "node"]
        for entry in out.values():  # inputs linked to dropped nodes are removed, as the frontend does
            for name, value in list(entry["inputs"].items()):
                if isinstance(value, list) and len(value) == 2 and value[0] not in out:
                    del entry["inputs"][name]
        return Conversion(out, Replacements(targets, self._search_names(out)))

    def _node_prompt(self, dto):
        info = self.info[dto.type]
        specs = {name: (typ, opts) for name, typ, opts in input_specs(info)}
        inputs = {}
        for name, value in self.widget_values(dto).items():
            typ, opts = specs.get(name, (None, {}))
            if typ == "STRING" and opts.get("dynamicPrompts") and isinstance(value, str):
                value = dynamic_prompt(value, self.rng)
            inputs[name] = _wrap(value)
        for slot, inp in enumerate(dto.node.get("inputs") or []):
            resolved = self._resolve_input(dto, slot, set())
            if resolved is None:
                continue
            if resolved[0] == "value":
                inputs[inp["name"]] = _wrap(resolved[1])
            else:
                inputs[inp["name"]] = [resolved[0], resolved[1]]
        title = dto.node.get("title") or info.get("display_name") or dto.type
        return {"inputs": inputs, "class_type": dto.type, "_meta": {"title": title}}

    def widget_values(self, dto):
        """{input: value} of a node's own widgets (PrimitiveNode and group-node values applied)."""
        if dto.id in self._values:
            return self._values[dto.id]
        info = self.info.get(dto.type)
        if info is None:
            raise WorkflowError(f"{dto.where()} has a type the server does not know: install the custom node pack "
                                f"that provides it, or remove the node")
        try:
            values = read_widget_values(dto.node.get("widgets_values"), info, dto.type, dto.where())
        except WidgetLayoutError as e:
            raise WorkflowError(str(e)) from None
        if dto.kind == "group_child":
            group_dto = self.dtos[dto.path[0]]
            values.update(self._group_widget_values(group_dto).get(int(dto.id.rsplit(":", 1)[1]), {}))
        values.update(self.overrides.get((dto.scope.id, str(dto.node.get("id"))), {}))
        self._values[dto.id] = values
        return values

    # --- link resolution (ExecutableNodeDTO.resolveInput / resolveOutput) ---------------------------------------------
    def _resolve_input(self, dto, slot, visited, want_type=None):
        """(origin id, origin slot), ("value", v) for a subgraph's promoted widget, or None (nothing linked)."""
        key = (dto.id, "in", slot)
        if key in visited:
            raise WorkflowError(f"{dto.where()}: circular link through input {slot}")
        visited.add(key)
        if dto.kind == "group_child":
            return self._resolve_group_child_input(dto, slot, visited)
        inputs = dto.node.get("inputs") or []
        if slot >= len(inputs) or inputs[slot].get("link") is None:
            return None
        link = dto.scope.links.get(int(inputs[slot]["link"]))
        if link is None:
            raise WorkflowError(f"{dto.where()}: input {inputs[slot].get('name')!r} refers to missing link "
                                f"{inputs[slot]['link']}")
        if dto.instance is not None and link.origin == str(SUBGRAPH_INPUT):
            return self._resolve_subgraph_input(dto, link, visited)
        origin = self.dtos.get(":".join([*dto.path, link.origin]))
        if origin is None:
            raise WorkflowError(f"{dto.where()} is linked from missing node {link.origin}")
        return self._resolve_output(origin, link.origin_slot, want_type or inputs[slot].get("type"), visited)

    def _resolve_subgraph_input(self, dto, link, visited):
        """A link from a subgraph's input node: follow the subgraph node's input of that name outwards, or take
        the widget value the subgraph node shows for it."""
        instance = dto.instance
        definition = self.definitions[instance.type]
        if link.origin_slot >= len(definition.inputs):
            raise WorkflowError(f"{dto.where()}: subgraph {definition.name!r} has no input {link.origin_slot}")
        name = definition.inputs[link.origin_slot].get("name")
        index = _input_index(instance.node, name)
        if index is None or instance.node["inputs"][index].get("link") is None:
            promoted = self.promoted_values(instance)
            return ("value", promoted[name]) if name in promoted else None
        return self._resolve_input(instance, index, visited)

    def _resolve_output(self, dto, slot, want_type, visited):
        key = (dto.id, "out", slot)
        if key in visited:
            raise WorkflowError(f"{dto.where()}: circular link through output {slot}")
        visited.add(key)
        if dto.mode == MODE_BYPASS:
            if dto.kind == "group":
                index = _group_bypass_input(dto.node, slot, want_type)
            else:
                index = _bypass_input(dto.node, slot, want_type)
            return None if index < 0 else self._resolve_input(dto, index, visited)
        if dto.kind == "subgraph":
            return self._resolve_subgraph_output(dto, slot, want_type, visited)
        if dto.kind == "group":
            return self._resolve_group_output(dto, slot, want_type, visited)
        if dto.kind == "virtual":
            if slot < len(dto.node.get("inputs") or []):
                return self._resolve_input(dto, slot, visited, want_type)
            return None  # PrimitiveNode / Note: their value, if any, was written into the target widget
        return (dto.id, slot)

    def _resolve_subgraph_output(self, dto, slot, want_type, visited):
        definition = self.definitions[dto.type]
        if slot >= len(definition.outputs):
            raise WorkflowError(f"{dto.where()}: output {slot} does not exist in subgraph {definition.name!r}")
        link_ids = definition.outputs[slot].get("linkIds") or []
        link = definition.links.get(int(link_ids[0])) if link_ids else None
        if link is None:
            return None
        if link.origin == str(SUBGRAPH_INPUT):  # an input wired straight to an output
            name = definition.inputs[link.origin_slot].get("name") if link.origin_slot < len(definition.inputs) \
                else None
            index = _input_index(dto.node, name)
            return None if index is None else self._resolve_input(dto, index, visited)
        inner = self.dtos.get(f"{dto.id}:{link.origin}")
        if inner is None:
            raise WorkflowError(f"{dto.where()}: subgraph output {slot} comes from missing node {link.origin}")
        return self._resolve_output(inner, link.origin_slot, want_type, visited)

    # --- promoted widgets (SubgraphNode) ------------------------------------------------------------------------------
    def promoted_values(self, instance):
        """{subgraph input name: value} of the widgets a subgraph node shows: each input of the subgraph whose
        first link into a widget finds one, in the subgraph's input order (the subgraph node's widgets_values
        follow that order)."""
        if instance.id in self._promoted:
            return self._promoted[instance.id]
        definition = self.definitions[instance.type]
        found = []   # (input name, inner value)
        for sg_input in definition.inputs:
            for link_id in sg_input.get("linkIds") or []:
                value = self._inner_widget_value(instance, definition, link_id)
                if value is not _NO_WIDGET:
                    found.append((sg_input.get("name"), value))
                    break
        saved = instance.node.get("widgets_values") or []
        if isinstance(saved, list) and saved and len(saved) != len(found):
            raise WorkflowError(f"{instance.where()}: {len(saved)} saved widget values for the {len(found)} widgets "
                                f"the subgraph shows. Expected widget order: {[n for n, _ in found]}; saved values: "
                                f"{saved!r}. Open the file in ComfyUI's editor, check the subgraph node and save it "
                                f"again")
        values = {}
        for k, (name, inner_value) in enumerate(found):
            values[name] = saved[k] if isinstance(saved, list) and k < len(saved) else inner_value
        values.update(self.overrides.get(("instance", instance.scope.id, str(instance.node.get("id"))), {}))
        self._promoted[instance.id] = values
        return values

    def _inner_widget_value(self, instance, definition, link_id):
        link = definition.links.get(int(link_id))
        if link is None or link.target not in definition.nodes:
            return _NO_WIDGET
        target = definition.nodes[link.target]
        target_inputs = target.get("inputs") or []
        if link.target_slot >= len(target_inputs):
            return _NO_WIDGET
        widget = (target_inputs[link.target_slot].get("widget") or {}).get("name")
        if not widget:
            return _NO_WIDGET
        inner = self.dtos[f"{instance.id}:{link.target}"]
        if inner.kind == "subgraph":
            return self.promoted_values(inner).get(widget, _NO_WIDGET)
        if inner.kind not in ("node", "group_child"):
            return _NO_WIDGET
        if inner.type not in self.info:     # only inside a dropped subgraph (conversion() checks the rest)
            return None
        values = self.widget_values(inner)
        return values[widget] if widget in values else _NO_WIDGET

    # --- legacy group nodes -------------------------------------------------------------------------------------------
    def _group_widget_values(self, group_dto):
        """{inner node index: {input: value}} set by a group node's own widgets."""
        group = group_dto.group
        try:
            by_name = read_widget_values(group_dto.node.get("widgets_values"), group.spec, None,
                                         group_dto.where(), extensions=False)
        except WidgetLayoutError as e:
            raise WorkflowError(str(e)) from None
        out = {}
        for name, value in by_name.items():
            if name in group.widget_map:
                index, inner_name = group.widget_map[name]
                out.setdefault(index, {})[inner_name] = value
        return out

    def _resolve_group_child_input(self, dto, slot, visited):
        group_dto = self.dtos[dto.path[0]]
        group = group_dto.group
        index = int(dto.id.rsplit(":", 1)[1])
        outer_slot = group.input_map.get(index, {}).get(slot)
        if outer_slot is not None:  # fed from outside the group node
            return self._resolve_input(group_dto, outer_slot, visited)
        link = group.links_to.get(index, {}).get(slot)
        if link is None:
            return None
        source = self.dtos[f"{group_dto.id}:{link[0]}"]
        if source.type == "PrimitiveNode":
            return None   # its value was applied to the widget
        return self._resolve_output(source, link[1], (dto.node.get("inputs") or [{}] * (slot + 1))[slot].get("type"),
                                    visited)

    def _resolve_group_output(self, dto, slot, want_type, visited):
        group = dto.group
        if slot >= len(group.outputs):
            raise WorkflowError(f"{dto.where()}: output {slot} does not exist in group node {group.name!r}")
        index, inner_slot = group.outputs[slot]
        return self._resolve_output(self.dtos[f"{dto.id}:{index}"], inner_slot, want_type, visited)

    # --- PrimitiveNode and text replacement ---------------------------------------------------------------------------
    def _apply_primitive(self, scope, nid, node):
        saved = node.get("widgets_values")
        if not saved:
            return
        value = saved[0] if isinstance(saved, list) else next(iter(saved.values()))
        replace = bool((node.get("properties") or {}).get(REPLACE_PROPERTY))
        for link in self._targets_through_reroutes(scope, nid, set()):
            target = scope.nodes[link.target]
            inputs = target.get("inputs") or []
            if link.target_slot >= len(inputs):
                continue
            widget = (inputs[link.target_slot].get("widget") or {}).get("name") or inputs[link.target_slot].get("name")
            if target.get("type") in self.definitions:   # a widget the subgraph node shows
                self.overrides.setdefault(("instance", scope.id, link.target), {})[widget] = value
                continue
            self.overrides.setdefault((scope.id, link.target), {})[widget] = value
            if replace:
                self.replace_targets.add((scope.id, target.get("id"), widget))

    def _targets_through_reroutes(self, scope, nid, seen):
        found = []
        for link in scope.links.values():
            if link.origin != nid or link.target not in scope.nodes:
                continue
            if scope.nodes[link.target].get("type") == "Reroute":
                if link.target not in seen:
                    seen.add(link.target)
                    found += self._targets_through_reroutes(scope, link.target, seen)
            else:
                found.append(link)
        return found

    def _search_names(self, prompt):
        """[(name, 'search' | 'title', prompt id or None, saved widget values)] for %NODE.widget%."""
        names = []
        for dto in self.dtos.values():
            nid = dto.id if dto.id in prompt else None
            saved = {}
            if dto.kind in ("node", "group_child") and dto.type in self.info:
                try:
                    saved = self.widget_values(dto)
                except WorkflowError:
                    saved = {}
            default = None if dto.type in SAVE_NODE_TYPES else dto.type   # save nodes get no S&R name
            search = (dto.node.get("properties") or {}).get(SEARCH_NAME_PROPERTY, default)
            title = dto.node.get("title") or (self.info.get(dto.type) or {}).get("display_name") or dto.type
            names.append((search, "search", nid, saved))
            names.append((title, "title", nid, saved))
        return names


_NO_WIDGET = object()


def _input_index(node, name):
    return next((i for i, inp in enumerate(node.get("inputs") or []) if inp.get("name") == name), None)


def _wrap(value):
    return {"__value__": value} if isinstance(value, list) else value


def _bypass_input(node, slot, want_type):
    """ExecutableNodeDTO's bypass rule: which input a bypassed node passes to output ``slot``."""
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


def _group_bypass_input(node, slot, want_type):
    """ExecutableGroupNodeDTO's bypass rule: the same slot if its type equals the wanted one, else the first."""
    inputs = node.get("inputs") or []
    for i in [slot, *range(len(inputs))]:
        if i < len(inputs) and inputs[i].get("type") == want_type:
            return i
    return -1


class _GroupDef:
    """A legacy group node's definition rebuilt from its inner nodes, as the frontend's GroupNodeConfig does:
    its inputs (inner widgets first per node, unlinked sockets, then the inner inputs that were widgets turned
    into sockets, after all nodes), its widget -> inner widget map and its outputs."""

    def __init__(self, name, data, info):
        self.name = name
        self.nodes = data.get("nodes") or []
        self.config = data.get("config") or {}
        self.links_from, self.links_to, self.external = {}, {}, {}
        for link in data.get("links") or []:
            src, src_slot, dst, dst_slot = link[:4]
            if src is None:
                continue
            self.links_from.setdefault(src, {}).setdefault(src_slot, []).append(link)
            self.links_to.setdefault(dst, {})[dst_slot] = link
        for index, slot, typ in data.get("external") or []:
            self.external.setdefault(index, {})[slot] = typ
        self.required = {}        # group input name -> [type, options], in the group's order
        self.input_map = {}       # inner index -> {inner input slot: group input index}
        self.widget_map = {}      # group widget name -> (inner index, inner input name)
        self.outputs = []         # group output -> (inner index, inner slot)
        self._count, self._seen, converted = 0, {}, []
        for index, node in enumerate(self.nodes):
            kind = node.get("type")
            if kind == "PrimitiveNode" or (kind not in info and kind != "Reroute"):
                why = "a PrimitiveNode" if kind == "PrimitiveNode" else f"a node of unknown type {kind!r}"
                raise WorkflowError(f"group node {name!r} holds {why}: convert the group node back to nodes in the "
                                    f"editor (right click > Convert to nodes) and save again")
            if kind == "Reroute":
                continue
            converted.append(self._add_node(index, node, info[kind]))
        for step in converted:
            step()
        self.spec = {"input": {"required": self.required}}

    def _add_node(self, index, node, spec):
        entries = _def_order(spec, node.get("type"))
        inner_inputs = node.get("inputs") or []
        slots, converted = [], {}
        for name, typ, opts in entries:
            if _group_is_widget(typ, opts):
                at = next((i for i, inp in enumerate(inner_inputs)
                           if inp.get("name") == name and (inp.get("widget") or {}).get("name") == name), -1)
                if at > -1:
                    converted[at] = name
                else:
                    group_name = self._input_name(index, node, name)
                    self.required[group_name] = [typ, self._config(name, opts, group_name)]
                    self.widget_map[group_name] = (index, name)
            else:
                slots.append((name, typ, opts))
        self.input_map[index] = {}
        links_to = self.links_to.get(index, {})
        for i, (name, typ, opts) in enumerate(slots):
            if i in links_to:
                continue
            group_name = self._input_name(index, node, name)
            if ((self.config.get(str(index)) or {}).get("input") or {}).get(name, {}).get("visible") is False:
                continue
            self.required[group_name] = [typ, self._config(name, opts, group_name)]
            self.input_map[index][i] = self._count
            self._count += 1
        outputs = spec.get("output") or []
        for j in range(len(outputs)):
            has_link = j in self.links_from.get(index, {}) and j not in self.external.get(index, {})
            custom = ((self.config.get(str(index)) or {}).get("output") or {}).get(str(j)) or {}
            if custom.get("visible", not has_link):
                self.outputs.append((index, j))

        def add_converted():
            keys = sorted(converted, key=str)    # the frontend sorts these indexes as strings
            for i, at in enumerate(keys):
                name = converted[at]
                if len(slots) + i in links_to:
                    continue
                typ, opts = next((t, o) for n, t, o in entries if n == name)
                group_name = self._input_name(index, node, name)
                self.required[group_name] = [typ, self._config(name, opts, group_name)]
                self.widget_map[group_name] = (index, name)
                self.input_map[index][len(slots) + i] = self._count
                self._count += 1
        return add_converted

    def _input_name(self, index, node, name):
        """getInputConfig's naming: a custom name, the input's label, or, when taken, '<title> <name>'."""
        custom = ((self.config.get(str(index)) or {}).get("input") or {}).get(name, {}).get("name")
        label = next((inp.get("label") for inp in node.get("inputs") or [] if inp.get("name") == name), None)
        chosen = custom or label or name
        key = chosen
        if chosen in self._seen:
            prefix = f"{node.get('title') or node.get('type')} "
            key = chosen = f"{prefix}{name}"
            if chosen in self._seen:
                chosen = f"{prefix}{self._seen[chosen]} {name}"
        self._seen[key] = self._seen.get(key, 1) + 1
        return chosen

    @staticmethod
    def _config(name, opts, group_name):
        opts = dict(opts)
        if name in ("seed", "noise_seed"):
            opts["control_after_generate"] = True
        return opts


def _def_order(spec, class_type):
    """The inputs of a node spec in plain dict order (required, optional), with the upload inputs the frontend's
    extensions add: what a group node sees."""
    return [(n, t, o) for n, t, o, _ in ordered_inputs({"input": spec.get("input") or {}}, class_type)]


def _group_is_widget(typ, opts):
    """widgetStore.inputIsWidget: the type has a widget (forceInput does not matter here)."""
    return is_widget(typ, {k: v for k, v in opts.items() if k not in ("forceInput", "rawLink")}) \
        or typ in ("IMAGEUPLOAD", "AUDIOUPLOAD")
