"""The widgets the ComfyUI editor gives a node, in order, and reading a saved node's ``widgets_values`` by them.

An editor file stores widget values by position, so a converter must know every widget the frontend creates,
including the ones that are not node inputs. The rules below follow the frontend (ComfyUI_frontend 1.27.10, the
one ComfyUI v0.3.64 ships: ``services/litegraphService.ts``, ``utils/nodeDefOrderingUtil.ts``,
``scripts/widgets.ts``, ``extensions/core/uploadImage.ts`` / ``uploadAudio.ts``, the remote-combo widget), and
``FRONTEND_EXTENSION_LAYOUTS`` lists the nodes whose frontend extensions add widgets no rule predicts. The table and
the rules are checked against the real frontend in ``tests/comfyui/test_editor_browser.py``.

- Inputs are visited in ``input_order`` (required, then optional, then any input the order does not name; without
  ``input_order`` in the spec's own order). An input becomes a widget when its type (or ``widgetType``) has a
  widget (INT, FLOAT, BOOLEAN, STRING, combos, ...) and it is not ``forceInput``.
- An INT gets a ``control_after_generate`` widget after it when its spec says so, or, unless the spec says
  ``control_after_generate: false``, when it is named ``seed`` or ``noise_seed``; a combo flagged
  ``control_after_generate`` gets that widget and a ``control_filter_list``.
- A combo fetched from a server route (``remote``) gets an "Auto-refresh after generation" toggle and, with
  ``refresh_button``, a "refresh" button.
- A required combo flagged ``image_upload`` / ``video_upload`` / ``animated_image_upload`` adds an ``upload``
  input to the *end of the required inputs* (``uploadImage.ts``), so its button comes after every input the
  ``input_order`` names: LoadImageMask is ``image, channel, upload``. Audio nodes get an unsaved ``audioUI`` player
  and (with ``audio_upload``) an ``upload`` button the same way.

Widgets that are not node inputs take a slot in ``widgets_values`` but are never sent to ``/prompt``. The
frontend writes ``widgets_values`` by widget index and skips unsaved widgets (leaving a ``null`` hole when one sits
between saved ones) but reads them back compactly; both forms are accepted, anything else is refused with the
node, the expected widget order and the saved values (``WidgetLayoutError``), never shifted.
"""
import math
from dataclasses import dataclass, field

WIDGET_TYPES = frozenset({"INT", "FLOAT", "BOOLEAN", "STRING", "MARKDOWN", "COMBO", "FILEUPLOAD", "COLOR",
                          "IMAGECOMPARE", "TREESELECT", "MULTISELECT", "CHART", "GALLERIA", "SELECTBUTTON",
                          "TEXTAREA"})
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
AUDIO_UI_NODES = frozenset({"LoadAudio", "SaveAudio", "PreviewAudio", "SaveAudioMP3", "SaveAudioOpus"})
CONTROL_VALUES = frozenset({"fixed", "increment", "increment-wrap", "decrement", "randomize"})

# Nodes whose frontend extensions add widgets that no input rule predicts (read from the real frontend 1.27.10:
# tests/comfyui/test_editor_browser.py compares). Each entry: (widget name, node input it sets or None, kind).
FRONTEND_EXTENSION_LAYOUTS = {
    "Load3D": [("model_file", "model_file", "value"), ("upload 3d model", None, "button"),
               ("upload extra resources", None, "button"), ("clear", None, "button"), ("image", "image", "value"),
               ("width", "width", "value"), ("height", "height", "value")],
    "Load3DAnimation": [("model_file", "model_file", "value"), ("upload 3d model", None, "button"),
                        ("upload extra resources", None, "button"), ("clear", None, "button"),
                        ("image", "image", "value"), ("width", "width", "value"), ("height", "height", "value")],
    "Preview3D": [("model_file", "model_file", "value"), ("image", None, "viewer")],
    "Preview3DAnimation": [("model_file", "model_file", "value"), ("image", None, "viewer")],
    "SaveGLB": [("filename_prefix", "filename_prefix", "value"), ("image", None, "viewer")],
    "WebcamCapture": [("image", "image", "value"), ("width", "width", "value"), ("height", "height", "value"),
                      ("capture_on_queue", "capture_on_queue", "value"),
                      ("waiting for camera...", None, "button")],
    "PreviewAny": [("preview", None, "ui")],     # a text box showing the value; not saved
}


# Widgets whose value the editor makes when you queue (a capture of the 3D viewer or the webcam): a batch run has
# no viewer or camera, so a node that needs one is refused unless its saved value is already usable.
QUEUE_TIME_WIDGETS = {
    "Load3D": ("image", "the 3D viewer's render"), "Load3DAnimation": ("image", "the 3D viewer's render"),
    "WebcamCapture": ("image", "a webcam capture"),
}


@dataclass(frozen=True)
class Widget:
    """One widget of a node in the editor. ``input`` is the node input it sets (None: UI only, never sent)."""
    name: str
    input: str = None
    kind: str = "value"          # value | control | filter | upload | toggle | button | viewer | ui (unsaved display)
    type: object = None          # the input's type (a list for old-style combos)
    opts: dict = field(default_factory=dict, compare=False, hash=False)
    saved: bool = True           # has a slot in widgets_values

    @property
    def sent(self):
        return self.input is not None


class WidgetLayoutError(ValueError):
    """Saved widget values that do not fit the node's widgets (the converter refuses rather than shift them)."""


# --- input specs ----------------------------------------------------------------------------------------------

def spec_entry(entry):
    """(type, options) of one ``/object_info`` input entry."""
    if isinstance(entry, str):
        entry = [entry]
    typ = entry[0]
    opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
    return typ, opts


def input_specs(info):
    """[(name, type, options)] of a node's inputs in ``input_order`` (required, then optional)."""
    return [(name, typ, opts) for name, typ, opts, _ in ordered_inputs(info, with_extensions=False)]


def is_combo(typ):
    return isinstance(typ, list) or typ == "COMBO"


def combo_options(typ, opts):
    return typ if isinstance(typ, list) else opts.get("options")


def widget_type(typ, opts):
    """The frontend widget type of an input, or None for a socket."""
    if opts.get("forceInput") or opts.get("rawLink"):
        return None
    kind = opts.get("widgetType") or ("COMBO" if is_combo(typ) else typ)
    return kind if isinstance(kind, str) and kind in WIDGET_TYPES else None


def is_widget(typ, opts):
    return widget_type(typ, opts) is not None


def ordered_inputs(info, class_type=None, with_extensions=True):
    """[(name, type, options, optional)] in the frontend's order (``getOrderedInputSpecs``), with the inputs
    the upload and audio extensions add to ``required`` (type "IMAGEUPLOAD" / "AUDIO_UI" / "AUDIOUPLOAD")."""
    sections = info.get("input") or {}
    required = [(name, *spec_entry(e), False) for name, e in (sections.get("required") or {}).items()]
    optional = [(name, *spec_entry(e), True) for name, e in (sections.get("optional") or {}).items()]
    if with_extensions:
        required += _extension_inputs(required, class_type)
    order = info.get("input_order")
    if not order:
        return required + optional
    by_name = {}
    for entry in required + optional:
        by_name.setdefault(entry[0], entry)
    out = [by_name[n] for n in order.get("required") or [] if n in by_name and not by_name[n][3]]
    out += [by_name[n] for n in order.get("optional") or [] if n in by_name and by_name[n][3]]
    named = {entry[0] for entry in out}
    return out + [entry for entry in required + optional if entry[0] not in named]


def _extension_inputs(required, class_type):
    added = []
    if class_type in AUDIO_UI_NODES:
        added.append(("audioUI", "AUDIO_UI", {}, False))
    names = {name: (typ, opts) for name, typ, opts, _ in required}
    for name, typ, opts, _ in required:
        if is_combo(typ) and any(opts.get(flag) is True for flag in UPLOAD_FLAGS):
            added.append(("upload", "IMAGEUPLOAD", {"imageInputName": name}, False))
            break
    if "audio" in names and names["audio"][1].get("audio_upload") is True:
        added.append(("upload", "AUDIOUPLOAD", {}, False))
    return added


# --- layouts ------------------------------------------------------------------------------------------------------

def widget_layout(info, class_type=None, extensions=True):
    """Every widget the editor gives a node of this spec, in order (``Widget`` list, unsaved ones included).
    ``extensions=False`` leaves out the inputs the frontend's extensions add (for specs that already hold them)."""
    if class_type in FRONTEND_EXTENSION_LAYOUTS:
        specs = {name: (typ, opts) for name, typ, opts, _ in ordered_inputs(info, class_type)}
        return [Widget(name, inp, kind, *specs.get(inp or "", (None, {})), saved=kind != "ui")
                for name, inp, kind in FRONTEND_EXTENSION_LAYOUTS[class_type]]
    widgets = []
    for name, typ, opts, _ in ordered_inputs(info, class_type, with_extensions=extensions):
        if typ == "IMAGEUPLOAD" or typ == "AUDIOUPLOAD":
            widgets.append(Widget(name, None, "upload"))
            continue
        if typ == "AUDIO_UI":
            widgets.append(Widget(name, None, "ui", saved=False))
            continue
        kind = widget_type(typ, opts)
        if kind is None:
            continue
        widgets.append(Widget(name, name, "value", typ, opts))
        if kind == "INT" and opts.get("control_after_generate", name in ("seed", "noise_seed")):
            widgets.append(Widget("control_after_generate", None, "control"))
        elif kind == "COMBO" and opts.get("control_after_generate"):
            widgets += [Widget("control_after_generate", None, "control"),
                        Widget("control_filter_list", None, "filter")]
        if kind == "COMBO" and isinstance(opts.get("remote"), dict):
            widgets.append(Widget("Auto-refresh after generation", None, "toggle"))
            if opts["remote"].get("refresh_button"):
                widgets.append(Widget("refresh", None, "button"))
    return widgets


def saved_widgets(info, class_type=None):
    """The widgets that own a slot of ``widgets_values``, in order."""
    return [w for w in widget_layout(info, class_type) if w.saved]


def default_value(typ, opts):
    if "default" in opts:
        return opts["default"]
    options = combo_options(typ, opts)
    if options:
        return options[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(typ)


def ui_default(widget):
    """What the editor saves for a UI-only widget of a fresh node."""
    return {"control": "fixed", "filter": "", "upload": "image", "toggle": False}.get(widget.kind, "")


# --- reading widgets_values ---------------------------------------------------------------------------------------

def read_widget_values(saved, info, class_type, where, extensions=True):
    """{input name: value} of a node's saved widgets. ``saved`` is its ``widgets_values`` (a list, or a dict by
    name as some packs save). Raises WidgetLayoutError when the values do not fit the layout."""
    layout = widget_layout(info, class_type, extensions)
    if isinstance(saved, dict):
        return {w.input: saved[w.name] for w in layout if w.sent and w.name in saved}
    if not any(w.sent for w in layout):
        return {}   # nothing is read, so nothing can shift (e.g. PreviewAny saved by a newer editor)
    if not saved:    # a node saved before it had widgets: the editor shows the defaults, nothing can shift
        return {w.input: default_value(w.type, w.opts) for w in layout if w.sent}
    values = aligned_values(list(saved), layout)
    if values is None:
        raise WidgetLayoutError(layout_message(where, layout, saved))
    out = {}
    for widget, value in zip([w for w in layout if w.saved], values):
        problem = value_problem(widget, value)
        if problem:
            raise WidgetLayoutError(layout_message(where, layout, saved, problem))
        if widget.sent:
            out[widget.input] = value
    return out


def aligned_values(saved, layout):
    """The saved values, one per saved widget: the compact form (what the frontend reads) or the by-index form
    (what it writes when an unsaved widget sits between saved ones: a null hole). None when neither fits."""
    saved_count = sum(w.saved for w in layout)
    if len(saved) == saved_count:
        return saved
    last = max((i for i, w in enumerate(layout) if w.saved), default=-1)
    if len(saved) == last + 1 and all(saved[i] is None for i, w in enumerate(layout[:last + 1]) if not w.saved):
        return [saved[i] for i, w in enumerate(layout[:last + 1]) if w.saved]
    return None


def value_problem(widget, value):
    """Why a saved value cannot belong to this widget (a sign of shifted values), else None."""
    if widget.kind == "control":   # (old editors saved a true/false 'randomize' toggle here)
        ok = value in CONTROL_VALUES or isinstance(value, bool)
        return None if ok else f"{value!r} is not a control_after_generate mode"
    if widget.kind != "value" or value is None:
        return None
    kind = widget_type(widget.type, widget.opts)
    if kind == "INT" and (isinstance(value, bool) or not isinstance(value, (int, float))
                          or not math.isfinite(value) or float(value) != int(value)):
        return f"{widget.name}: {value!r} is not an integer"
    if kind == "FLOAT" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"{widget.name}: {value!r} is not a number"
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{widget.name}: {value!r} is not true/false"
    return None


def layout_message(where, layout, saved, problem=None):
    names = [w.name + ("" if w.sent else f" ({w.kind})") for w in layout if w.saved]
    count = len(saved) if isinstance(saved, list) else "?"
    head = problem or f"{count} saved widget values for {len(names)} widgets"
    return (f"{where}: {head}. Expected widget order: {names}; saved values: {saved!r}. The file was saved by "
            f"another version of this node or of the editor: open it in ComfyUI's editor, check the node and save "
            f"it again (or export it with 'Export (API)')")
