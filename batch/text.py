"""Text the editor rewrites when it queues a prompt: dynamic prompts and ``%...%`` replacements.

- Dynamic prompts (STRING widgets flagged ``dynamicPrompts``): C-style comments are removed and each ``{a|b|c}``
  group (nestable, ``\\`` escapes) becomes one of its options.
- Replacements (ComfyUI_frontend ``utils/searchAndReplace.ts``), applied to the ``filename_prefix`` of the save
  nodes (``SAVE_NODE_TYPES``) and to the value of a PrimitiveNode whose property "Run widget replace on values" is
  on: ``%date:FORMAT%`` is the current date (``yyyy``/``yy`` year, ``MM``/``M`` month, ``dd``/``d`` day,
  ``hh``/``h`` hour, ``mm``/``m`` minute, ``ss``/``s`` second); ``%NODE.widget%`` is the value of a widget of the
  node whose "Node name for S&R" (by default its type) or, failing that, title is NODE, with characters that are
  not allowed in file names turned into ``_``. Unknown patterns are kept as written (``%width%`` and
  ``%height%`` are the server's own and are left for it).
"""
import datetime
import re

SAVE_NODE_TYPES = frozenset({"SaveImage", "SaveAnimatedWEBP", "SaveWEBM", "SaveAudio", "SaveGLB", "SaveAnimatedPNG",
                             "CLIPSave", "VAESave", "ModelSave", "LoraSave", "SaveLatent"})
REPLACE_PROPERTY = "Run widget replace on values"
SEARCH_NAME_PROPERTY = "Node name for S&R"

_COMMENTS = re.compile(r"/\*[\s\S]*?\*/|//.*")
_PATTERN = re.compile(r"%([^%]+)%")
_DATE_PART = re.compile(r"dd?|MM?|hh?|mm?|ss?|yyy?y?")
_NOT_IN_FILE_NAMES = re.compile(r'[/?<>\\:*|"\x00-\x1F\x7F]')


# --- dynamic prompts ------------------------------------------------------------------------------------------------

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


# --- %...% replacements ---------------------------------------------------------------------------------------------

def format_date(fmt, now):
    parts = {"d": now.day, "M": now.month, "h": now.hour, "m": now.minute, "s": now.second}

    def one(match):
        token = match.group(0)
        if token == "yy":
            return str(now.year)[2:]
        if token == "yyyy":
            return str(now.year)
        if token[0] in parts:
            return str(parts[token[0]]).zfill(len(token))
        return token

    return _DATE_PART.sub(one, fmt)


def replace_text(value, lookup, now=None):
    """``value`` with its ``%...%`` patterns replaced. ``lookup(node_name, widget)`` returns a widget's value or
    None when there is no such node or widget."""
    now = now or datetime.datetime.now()

    def one(match):
        text = match.group(1)
        split = text.split(".")
        if len(split) != 2:
            if split[0].startswith("date:"):
                return format_date(split[0][5:], now)
            return match.group(0)
        found = lookup(split[0], split[1])
        if found is None:
            return match.group(0)
        return _NOT_IN_FILE_NAMES.sub("_", str(found))

    return _PATTERN.sub(one, value)


class Replacements:
    """Where a converted prompt has text to replace, and how to find ``%NODE.widget%`` values in it.

    ``targets``: [(prompt node id, input name)] whose string values are rewritten; ``names``: [(name, prompt node id
    or None, saved widget values)] in the editor's search order (S&R names first, then titles). Values are read
    from the prompt being submitted, so a sweep's values show up in file names (``%KSampler.seed%``)."""

    def __init__(self, targets=(), names=()):
        self.targets = list(targets)
        self.names = list(names)

    def __bool__(self):
        return bool(self.targets)

    def lookup(self, prompt):
        def find(name, widget):
            for kind in ("search", "title"):
                matches = [(nid, saved) for key, k, nid, saved in self.names if k == kind and key == name]
                if matches:
                    nid, saved = matches[0]
                    inputs = (prompt.get(nid) or {}).get("inputs", {}) if nid is not None else {}
                    value = inputs.get(widget, saved.get(widget))
                    return None if value is None or isinstance(value, list) else value
            return None
        return find

    def apply(self, prompt, now=None):
        """A copy of ``prompt`` with the replacements done (the prompt itself is left as it is)."""
        if not self.targets:
            return prompt
        out = {nid: dict(node, inputs=dict(node.get("inputs", {}))) for nid, node in prompt.items()}
        find = self.lookup(prompt)
        for nid, name in self.targets:
            value = out.get(nid, {}).get("inputs", {}).get(name)
            if isinstance(value, str):
                out[nid]["inputs"][name] = replace_text(value, find, now)
        return out
