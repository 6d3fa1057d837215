"""Parameter sweeps over an API-format prompt.

An assignment ``TARGET=VALUES`` sets one input. TARGET is ``NODE.input`` (NODE = node id or title) or a bare
``input`` (every node that has that input). VALUES is one value, a range ``a..b`` / ``a..b:step`` (inclusive,
ints or floats), or a JSON list ``[3, 5, 7]`` / ``["a cat", "a dog"]``; more than one value makes an axis.
A runs file (CSV with ``TARGET`` columns, or JSONL of ``{TARGET: value}``) is one more axis whose rows are runs.
Axes combine as a cartesian product (default) or zipped (equal lengths; length-1 axes broadcast).
"""
import csv
import hashlib
import itertools
import json
from dataclasses import dataclass, field


class SweepError(ValueError):
    pass


@dataclass
class Run:
    """One prompt to submit: its parameters, the final prompt and a stable key (the resume identity)."""
    params: dict
    prompt: dict
    key: str = field(default="")

    def __post_init__(self):
        self.key = self.key or prompt_key(self.prompt)


def prompt_key(prompt):
    """Stable hash of what the server executes (titles and other ``_meta`` excluded)."""
    stripped = {nid: {"class_type": n["class_type"], "inputs": n.get("inputs", {})} for nid, n in prompt.items()}
    text = json.dumps(stripped, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# --- parsing ----------------------------------------------------------------------------------------------------

def parse_value(text):
    """A JSON literal when it parses (numbers, true/false, lists, quoted strings), else the raw string."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text


def _number(text):
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_values(text):
    """The list of values one assignment sweeps over."""
    text = text.strip()
    if ".." in text and not text.startswith(("[", '"')):
        body, _, step = text.partition(":")
        lo, _, hi = body.partition("..")
        try:
            lo, hi = _number(lo), _number(hi)
            step = _number(step) if step else 1
        except ValueError:
            return [parse_value(text)]
        if step <= 0:
            raise SweepError(f"range {text!r}: step must be > 0")
        if lo > hi:
            raise SweepError(f"range {text!r}: start is above end")
        count = int(round((hi - lo) / step)) + 1
        values = [lo + i * step for i in range(count)]
        if all(isinstance(v, int) for v in (lo, hi, step)):
            return values
        return [round(v, 10) for v in values if v <= hi + 1e-9]
    if text.startswith("["):
        value = parse_value(text)
        if isinstance(value, list):
            if not value:
                raise SweepError(f"empty list in {text!r}")
            return value
    return [parse_value(text)]


def parse_assignment(text):
    """``TARGET=VALUES`` -> (target, [values])."""
    target, sep, values = text.partition("=")
    if not sep or not target.strip():
        raise SweepError(f"expected TARGET=VALUE (e.g. 3.seed=1..8 or 'KSampler.cfg=[3,5]'), got {text!r}")
    return target.strip(), parse_values(values)


def read_runs_file(path):
    """Rows of a CSV (header = targets) or JSONL (one object per line) file: [{target: value}]."""
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        if str(path).lower().endswith((".jsonl", ".json")):
            for n, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise SweepError(f"{path}:{n}: each line must be a JSON object of TARGET: value")
                    rows.append(row)
        else:
            for row in csv.DictReader(f):
                rows.append({k.strip(): parse_value(v) for k, v in row.items() if k and v is not None and v != ""})
    if not rows:
        raise SweepError(f"{path}: no runs")
    return rows


# --- expansion --------------------------------------------------------------------------------------------------

def build_axes(assignments=(), runs_rows=None):
    """Axes = lists of partial parameter dicts. Single values are constants (an axis of length 1)."""
    axes = [[{target: v} for v in values] for target, values in assignments]
    if runs_rows:
        axes.append([dict(row) for row in runs_rows])
    return axes


def combine(axes, mode="product"):
    """Parameter dicts of all runs."""
    if not axes:
        return [{}]
    if mode == "product":
        combos = itertools.product(*axes)
    elif mode == "zip":
        lengths = {len(a) for a in axes if len(a) > 1}
        if len(lengths) > 1:
            raise SweepError(f"--zip needs sweeps of equal length, got lengths {sorted(len(a) for a in axes)}")
        n = lengths.pop() if lengths else 1
        combos = (tuple(a[i] if len(a) > 1 else a[0] for a in axes) for i in range(n))
    else:
        raise SweepError(f"unknown combine mode {mode!r} (product or zip)")
    runs = []
    for parts in combos:
        params = {}
        for part in parts:
            params.update(part)
        runs.append(params)
    return runs


def find_nodes(prompt, node_ref):
    """Node ids matching a reference: the id itself, else nodes whose title (``_meta.title``) equals it, else
    nodes of that class_type."""
    if node_ref in prompt:
        return [node_ref]
    titled = [nid for nid, n in prompt.items() if n.get("_meta", {}).get("title") == node_ref]
    return titled or [nid for nid, n in prompt.items() if n.get("class_type") == node_ref]


def resolve_target(prompt, target, object_info=None):
    """[(node id, input name)] a target sets. Errors name the fix (ambiguous title, unknown input)."""
    node_ref, dot, name = target.rpartition(".")
    if not dot:
        hits = [(nid, target) for nid, n in prompt.items() if target in n.get("inputs", {})
                and not isinstance(n["inputs"][target], list)]
        if not hits:
            raise SweepError(f"no node has a widget input {target!r}; use NODE.{target} with a node id or title")
        return hits
    ids = find_nodes(prompt, node_ref)
    if not ids:
        titles = sorted({n.get("_meta", {}).get("title", "") for n in prompt.values()})
        raise SweepError(f"no node with id or title {node_ref!r} (ids: {', '.join(sorted(prompt))}; titles: "
                         f"{', '.join(t for t in titles if t)})")
    if len(ids) > 1:
        raise SweepError(f"{node_ref!r} matches several nodes ({', '.join(ids)}); use the node id, e.g. "
                         f"{ids[0]}.{name}")
    nid = ids[0]
    node = prompt[nid]
    known = set(node.get("inputs", {}))
    info = (object_info or {}).get(node["class_type"])
    if info:
        for section in ("required", "optional"):
            known |= set((info.get("input", {}).get(section) or {}))
    if name not in known:
        raise SweepError(f"node {nid} ({node['class_type']}) has no input {name!r}; inputs: {', '.join(sorted(known))}")
    return [(nid, name)]


def apply_params(prompt, params, object_info=None):
    """A copy of ``prompt`` with the parameters set (list values are wrapped as ``{"__value__": [...]}``)."""
    out = json.loads(json.dumps(prompt))
    for target, value in params.items():
        for nid, name in resolve_target(out, target, object_info):
            out[nid].setdefault("inputs", {})[name] = {"__value__": value} if isinstance(value, list) else value
    return out


def expand_runs(prompt, assignments=(), runs_rows=None, mode="product", object_info=None):
    """All runs of a sweep, in order, with duplicates (same final prompt) removed."""
    runs, seen = [], set()
    for params in combine(build_axes(assignments, runs_rows), mode):
        run = Run(params=params, prompt=apply_params(prompt, params, object_info))
        if run.key not in seen:
            seen.add(run.key)
            runs.append(run)
    return runs
