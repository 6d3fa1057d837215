"""ComfyUI's official workflow templates through the converter and a real server's ``/prompt``.

Templates come from the ``comfyui-workflow-templates`` package installed with ComfyUI (and from any folders in
$REWARDLAB_TEMPLATES, ':'-separated, e.g. a newer package's ``templates/``). Each editor-format template is
converted with the live server's ``/object_info``: it converts, or is refused for a reason (node types this server
lacks; saved widget values that do not fit this server's nodes). Each converted prompt is POSTed to ``/prompt``
(and taken off the queue at once if the server accepts it): the server may only object to model files this test
server does not have, never with a conversion-class error (a required input missing, a value of the wrong type,
a value shifted into another widget, a link of the wrong type). The counts are printed and written to
$REWARDLAB_TEMPLATE_REPORT when set.
"""
import collections
import glob
import json
import os
import re
import urllib.error
import urllib.request
import uuid

import pytest

from rewardlab.batch.convert import WorkflowError, convert, is_editor_format

FILE_NAME = re.compile(r"\.[A-Za-z0-9]{2,12}$")   # a file name: models, images, audio
CONVERSION_ERRORS = {"required_input_missing", "invalid_input_type", "return_type_mismatch", "bad_linked_input",
                     "value_smaller_than_min", "value_bigger_than_max", "exception_during_inner_validation"}


def template_files():
    folders = []
    try:
        import comfyui_workflow_templates
        folders.append(os.path.join(os.path.dirname(comfyui_workflow_templates.__file__), "templates"))
    except ImportError:
        pass
    folders += [f for f in os.environ.get("REWARDLAB_TEMPLATES", "").split(":") if f]
    files = []
    for folder in folders:
        files += sorted(glob.glob(os.path.join(folder, "*.json")))
    return files


def post_prompt(server, prompt):
    pid = uuid.uuid4().hex
    body = json.dumps({"prompt": prompt, "prompt_id": pid, "client_id": "rewardlab-templates"}).encode()
    req = urllib.request.Request(server.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    server.post_json("/queue", {"delete": [pid]})     # never let a template run on the test box
    server.post_json("/interrupt", {})
    return 200, answer


def objections(answer, prompt, info):
    """(conversion-class errors, options this server's version lacks, other errors) of a /prompt answer. A
    combo value 'not in list' is a conversion error when it looks shifted: a number or true/false, a UI widget's
    value, or an option of another input of the node. A file name only means this test server lacks the file; any
    other word is an option a newer ComfyUI added to that input."""
    conversion, newer, other = [], [], []
    for nid, entry in (answer.get("node_errors") or {}).items():
        for err in entry.get("errors", []):
            line = f"{nid} ({entry.get('class_type')}): {err.get('type')} {err.get('details')}"
            kind = err.get("type")
            if kind == "value_not_in_list" and not _is_file_combo(prompt, nid, err, info):
                (conversion if _looks_shifted(prompt, nid, err, info) else newer).append(line)
            elif kind in CONVERSION_ERRORS:
                conversion.append(line)
            else:
                other.append(line)
    return conversion, newer, other


UI_VALUES = {"fixed", "increment", "increment-wrap", "decrement", "randomize", "image", ""}


def _looks_shifted(prompt, nid, err, info):
    value = (err.get("extra_info") or {}).get("received_value")
    if not isinstance(value, str) or value in UI_VALUES:
        return True
    name = (err.get("extra_info") or {}).get("input_name")
    spec = info.get(prompt[nid]["class_type"], {}).get("input", {})
    for section in ("required", "optional"):
        for other, entry in (spec.get(section) or {}).items():
            options = entry[0] if isinstance(entry[0], list) else (entry[1] if len(entry) > 1 else {}).get("options")
            if other != name and isinstance(options, list) and value in options:
                return True
    return False


def _is_file_combo(prompt, nid, err, info):
    """A combo listing files (models, images): 'not in list' then only means this server lacks the file."""
    name = (err.get("extra_info") or {}).get("input_name")
    spec = info.get(prompt[nid]["class_type"], {}).get("input", {})
    entry = (spec.get("required") or {}).get(name) or (spec.get("optional") or {}).get(name)
    if not entry:
        return False
    options = entry[0] if isinstance(entry[0], list) else (entry[1] if len(entry) > 1 else {}).get("options", [])
    value = str((err.get("extra_info") or {}).get("received_value", ""))
    return not options or any(FILE_NAME.search(str(v)) for v in [value, *options])


def test_official_templates_convert_and_pass_the_servers_validation(server, capsys):
    files = template_files()
    if not files:
        pytest.skip("no workflow templates installed (pip install comfyui-workflow-templates)")
    info = server.get_json("/object_info")
    counts, reasons, bad = collections.Counter(), collections.Counter(), {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            workflow = json.load(f)
        if not is_editor_format(workflow):
            continue
        subgraphs = bool((workflow.get("definitions") or {}).get("subgraphs"))
        key = "with subgraphs" if subgraphs else "without subgraphs"
        counts[f"templates {key}"] += 1
        try:
            prompt = convert(workflow, info).final()
        except WorkflowError as e:
            text = str(e)
            reason = ("node types this server lacks" if "does not know" in text
                      else "saved widget values do not fit this server's nodes" if "widget" in text
                      else "other: " + text[:120])
            reasons[reason] += 1
            counts[f"refused {key}"] += 1
            continue
        counts[f"converted {key}"] += 1
        status, answer = post_prompt(server, prompt)
        conversion, newer, other = objections(answer, prompt, info)
        if conversion:
            bad[os.path.basename(path)] = conversion
        elif newer:
            counts[f"/prompt: options only a newer ComfyUI has {key}"] += 1
            reasons["/prompt: " + newer[0].split(": ", 1)[1][:100]] += 1
        elif status == 200 or other or answer.get("error", {}).get("type") == "prompt_outputs_failed_validation":
            counts[f"validated by /prompt {key}"] += 1
        else:
            bad[os.path.basename(path)] = [json.dumps(answer)[:300]]
    report = {"counts": dict(sorted(counts.items())), "refusal reasons": dict(reasons.most_common()), "failures": bad}
    with capsys.disabled():
        print("\n" + json.dumps(report, indent=1))
    if os.environ.get("REWARDLAB_TEMPLATE_REPORT"):
        with open(os.environ["REWARDLAB_TEMPLATE_REPORT"], "w") as f:
            json.dump(report, f, indent=1)
    assert bad == {}
    assert counts["converted with subgraphs"] > 0 and counts["converted without subgraphs"] > 50
