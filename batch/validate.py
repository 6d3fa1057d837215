"""Validate shipped workflows against node specs: node types exist, widget values fit (types, ranges, combos),
links connect compatible types. Specs: RewardLab's NODE_CLASS_MAPPINGS + the stock table (stock_nodes.py).

    python -m rewardlab.batch.validate [FILES or FOLDERS]   (default: workflows/ and example_workflows/)
"""
import glob
import json
import os
import sys

from .convert import (SUBGRAPH_INPUT, SUBGRAPH_OUTPUT, WorkflowError, is_api_format, is_editor_format,
                      is_group_node_type, link_rows, to_api, types_compatible)
from .stock_nodes import FILE_FOLDER, LATENT_EXTENSIONS, MODEL_EXTENSIONS, VIRTUAL_NODES, offline_object_info
from .widgets import WidgetLayoutError, combo_options, input_specs, is_widget, read_widget_values

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOW_DIRS = ("workflows", "example_workflows")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def check_value(name, typ, opts, value):
    """An error message for a widget value that the server would reject (or that cannot be right), else None."""
    if isinstance(value, dict) and "__value__" in value:
        value = value["__value__"]
    options = combo_options(typ, opts)
    if options is not None or typ == "COMBO":
        folder = opts.get(FILE_FOLDER)
        if folder and not options:
            exts = {"input": IMAGE_EXTENSIONS, "latents": LATENT_EXTENSIONS}.get(folder, MODEL_EXTENSIONS)
            if not isinstance(value, str) or not value.lower().endswith(exts):
                return f"{name}: {value!r} is not a file name of the {folder} folder ({', '.join(exts)})"
            return None
        if value not in (options or []):
            return f"{name}: {value!r} not in {options}"
        return None
    if typ == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{name}: expected an integer, got {value!r}"
    elif typ == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{name}: expected a number, got {value!r}"
    elif typ == "STRING":
        if not isinstance(value, str):
            return f"{name}: expected a string, got {value!r}"
    elif typ == "BOOLEAN":
        if not isinstance(value, bool):
            return f"{name}: expected true/false, got {value!r}"
    if typ in ("INT", "FLOAT"):
        if "min" in opts and value < opts["min"]:
            return f"{name}: {value} is below the minimum {opts['min']}"
        if "max" in opts and value > opts["max"]:
            return f"{name}: {value} is above the maximum {opts['max']}"
    return None


def validate_api(prompt, info):
    """Errors of an API-format prompt (empty list = valid)."""
    errors = []
    outputs = 0
    for nid, node in prompt.items():
        kind = node.get("class_type")
        where = f"node {nid} ({kind})"
        if kind not in info:
            errors.append(f"{where}: unknown node type")
            continue
        spec = info[kind]
        outputs += bool(spec.get("output_node"))
        specs = {name: (typ, opts) for name, typ, opts in input_specs(spec)}
        required = set((spec.get("input", {}).get("required") or {}))
        inputs = node.get("inputs", {})
        for name in sorted(set(inputs) - set(specs)):
            errors.append(f"{where}: unknown input {name!r}")
        for name in sorted(required - set(inputs)):
            errors.append(f"{where}: required input {name!r} is missing")
        for name, value in inputs.items():
            if name not in specs:
                continue
            typ, opts = specs[name]
            if isinstance(value, list):
                errors += _check_link(prompt, info, where, name, typ, value)
            elif not is_widget(typ, opts):
                errors.append(f"{where}: input {name!r} ({typ}) must be linked, got the value {value!r}")
            else:
                msg = check_value(name, typ, opts, value)
                if msg:
                    errors.append(f"{where}: {msg}")
    if prompt and not outputs:
        errors.append("no output node (SaveImage, PreviewImage, ...): the server would run nothing")
    return errors


def _check_link(prompt, info, where, name, typ, value):
    if len(value) != 2 or str(value[0]) not in prompt:
        return [f"{where}: input {name!r} links to missing node {value[0] if value else '?'}"]
    src = prompt[str(value[0])]
    outs = info.get(src.get("class_type"), {}).get("output", [])
    if not isinstance(value[1], int) or not 0 <= value[1] < len(outs):
        return [f"{where}: input {name!r} links to output {value[1]} of {src.get('class_type')}, which has {len(outs)}"]
    want = "COMBO" if isinstance(typ, list) else typ
    if not types_compatible(outs[value[1]], want):
        return [f"{where}: input {name!r} wants {want} but is linked to {outs[value[1]]}"]
    return []


def validate_editor(workflow, info):
    """Errors of an editor-format workflow (subgraph definitions included): node types, widget values that fit
    the editor's widget layout, the link tables, then the prompt it converts to."""
    errors = []
    definitions = (workflow.get("definitions") or {}).get("subgraphs") or []
    subgraph_ids = {d.get("id") for d in definitions}
    graphs = [("", workflow)] + [(f"subgraph {d.get('name') or d.get('id')!r}: ", d) for d in definitions]
    for prefix, graph in graphs:
        nodes = {str(n["id"]): n for n in graph.get("nodes") or []}
        for nid, node in nodes.items():
            kind = node.get("type")
            where = f"{prefix}node {nid} ({kind})"
            if kind in VIRTUAL_NODES or kind in subgraph_ids or is_group_node_type(kind):
                continue
            if kind not in info:
                errors.append(f"{where}: unknown node type")
                continue
            try:
                read_widget_values(node.get("widgets_values"), info[kind], kind, where)
            except WidgetLayoutError as e:
                errors.append(str(e))
            known = {name for name, _, _ in input_specs(info[kind])}
            for inp in node.get("inputs") or []:
                if inp.get("name") not in known:
                    errors.append(f"{where}: unknown input {inp.get('name')!r}")
        errors += _check_link_table(graph, nodes, info, prefix, inside_subgraph=graph is not workflow)
    if not errors:
        try:
            errors += validate_api(to_api(workflow, info), info)
        except WorkflowError as e:
            errors.append(str(e))
    return errors


def _check_link_table(graph, nodes, info, prefix="", inside_subgraph=False):
    errors = []
    io_ids = {str(SUBGRAPH_INPUT), str(SUBGRAPH_OUTPUT)} if inside_subgraph else set()
    for lid, src, src_slot, dst, dst_slot, typ in link_rows(graph):
        where = f"{prefix}link {lid}"
        if str(src) in io_ids or str(dst) in io_ids:
            continue   # a subgraph's own input/output: checked where the subgraph node is used
        s, d = nodes.get(str(src)), nodes.get(str(dst))
        if s is None or d is None:
            errors.append(f"{where}: joins missing node {src if s is None else dst}")
            continue
        outs, ins = s.get("outputs") or [], d.get("inputs") or []
        if src_slot >= len(outs) or lid not in (outs[src_slot].get("links") or []):
            errors.append(f"{where}: not listed on output {src_slot} of node {src}")
            continue
        if dst_slot >= len(ins) or ins[dst_slot].get("link") != lid:
            errors.append(f"{where}: not the link of input {dst_slot} of node {dst}")
            continue
        out_type = outs[src_slot].get("type")
        if s.get("type") in info:
            out_type = info[s["type"]]["output"][src_slot]
        in_type = ins[dst_slot].get("type")
        if not (types_compatible(typ, out_type) and types_compatible(out_type, in_type)):
            errors.append(f"{where}: {out_type} from node {src} into {in_type} input "
                          f"{ins[dst_slot].get('name')!r} of node {dst}")
    return errors


def validate_workflow(data, info):
    if is_editor_format(data):
        return validate_editor(data, info)
    if is_api_format(data):
        return validate_api(data, info)
    return ["not a ComfyUI workflow (neither editor nor API format)"]


def shipped_workflows(root=PACK_ROOT):
    paths = []
    for folder in WORKFLOW_DIRS:
        paths += glob.glob(os.path.join(root, folder, "**", "*.json"), recursive=True)
    return sorted(paths)


def validate_files(paths=None, info=None):
    """{path: [errors]} for the given files/folders (default: the shipped workflows)."""
    info = info or offline_object_info()
    files = []
    for p in paths or shipped_workflows():
        files += sorted(glob.glob(os.path.join(p, "**", "*.json"), recursive=True)) if os.path.isdir(p) else [p]
    report = {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            report[path] = validate_workflow(json.load(f), info)
    return report


def main(argv=None):
    report = validate_files((argv if argv is not None else sys.argv[1:]) or None)
    bad = 0
    for path, errors in report.items():
        print(f"{'FAIL' if errors else 'ok  '} {os.path.relpath(path)}")
        for e in errors:
            print(f"     {e}")
        bad += bool(errors)
    print(f"{len(report) - bad}/{len(report)} workflows valid")
    return 1 if bad or not report else 0


if __name__ == "__main__":
    sys.exit(main())
