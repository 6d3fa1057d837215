"""The pack as ComfyUI sees it: import by path under any folder name, cheap imports, valid V1 node schemas."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

import rewardlab
from rewardlab import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

ROOT = os.path.dirname(os.path.abspath(rewardlab.__file__))
STOCK_TYPES = {"MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "MASK", "NOISE", "GUIDER", "SIGMAS", "SAMPLER",
               "FLOAT", "INT", "STRING", "BOOLEAN", "LORA_MODEL", "LOSS_MAP", "*"}
CUSTOM_TYPES = {"REWARD_MODEL", "GUIDANCE_SCHEDULE", "DRAFT_OPTIONS"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


def test_loads_like_comfyui_under_any_folder_name_without_comfy_or_heavy_imports():
    """ComfyUI imports custom_nodes/<dir>/__init__.py by file path with a mangled module name."""
    code = textwrap.dedent(f"""
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location("custom_nodes_x_my_pack", {os.path.join(ROOT, '__init__.py')!r},
                                                      submodule_search_locations=[{ROOT!r}])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        heavy = [m for m in ("comfy", "diffusers", "open_clip", "transformers", "timm") if m in sys.modules]
        print(json.dumps({{"nodes": len(mod.NODE_CLASS_MAPPINGS), "heavy": heavy}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["heavy"] == []
    assert res["nodes"] == len(NODE_CLASS_MAPPINGS)


def test_exports_nodes():
    assert isinstance(NODE_CLASS_MAPPINGS, dict)
    assert set(NODE_DISPLAY_NAME_MAPPINGS) <= set(NODE_CLASS_MAPPINGS)


def _check_input(cls_name, name, spec, custom_types):
    assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, f"{cls_name}.{name}: spec must be (type,) or (type, opts)"
    typ = spec[0]
    opts = spec[1] if len(spec) == 2 else {}
    assert isinstance(opts, dict), f"{cls_name}.{name}: options must be a dict"
    assert opts.get("tooltip"), f"{cls_name}.{name} has no tooltip"
    if isinstance(typ, list):                               # COMBO
        assert typ, f"{cls_name}.{name}: empty combo"
        if "default" in opts:
            assert opts["default"] in typ, f"{cls_name}.{name}: default not among the choices"
        return
    assert isinstance(typ, str), f"{cls_name}.{name}: type must be a string or a list"
    assert typ in STOCK_TYPES | custom_types, f"{cls_name}.{name}: unknown type {typ}"
    if typ in ("INT", "FLOAT") and "default" in opts:
        lo, hi = opts.get("min", float("-inf")), opts.get("max", float("inf"))
        assert lo <= opts["default"] <= hi, f"{cls_name}.{name}: default outside [min, max]"
        if typ == "INT":
            assert isinstance(opts["default"], int) and not isinstance(opts["default"], bool)


@pytest.mark.parametrize("cls_name", sorted(NODE_CLASS_MAPPINGS))
def test_node_schema(cls_name):
    cls = NODE_CLASS_MAPPINGS[cls_name]
    assert cls_name.startswith("RewardLab"), "node ids carry the pack prefix to avoid clashes"
    types = cls.INPUT_TYPES()
    assert set(types) <= {"required", "optional", "hidden"}
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            _check_input(cls_name, name, spec, CUSTOM_TYPES)
    assert isinstance(cls.RETURN_TYPES, tuple)
    for t in cls.RETURN_TYPES:
        assert isinstance(t, (str, list)) and (isinstance(t, list) or t in STOCK_TYPES | CUSTOM_TYPES), t
    if hasattr(cls, "RETURN_NAMES"):
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    if hasattr(cls, "OUTPUT_TOOLTIPS"):
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    assert callable(getattr(cls, cls.FUNCTION)), "FUNCTION must name a method"
    assert cls.CATEGORY.startswith("RewardLab")
    assert getattr(cls, "DESCRIPTION", ""), "every node describes itself"
    assert cls.RETURN_TYPES or getattr(cls, "OUTPUT_NODE", False), "a node without outputs must be an output node"


def test_readme_and_ci_agree():
    """CI runs the README's test command; the README opens with the two set-up commands."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    lines = readme.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("    "))
    assert not any(line.startswith("#") for line in lines[1:first]), "the set-up commands come before any section"
    commands = []
    for line in lines[first:]:
        if not line.startswith("    "):
            break
        commands.append(line.strip())
    assert len(commands) == 2, "the README must open with exactly two set-up commands"
    assert "rewardlab demo" in commands[0] and "pytest" in commands[1]
    assert "sed -n" in ci and ".venv/bin/python -m pytest" in commands[1]


def test_no_torch_pin_in_pack_dependencies():
    """Users keep their own CUDA torch: neither requirements.txt nor pyproject may list torch/torchvision."""
    reqs = open(os.path.join(ROOT, "requirements.txt")).read().lower()
    py = open(os.path.join(ROOT, "pyproject.toml")).read().lower()
    deps = py.split("dependencies = [", 1)[1].split("]", 1)[0]
    for name in ("torch", "torchvision"):
        assert not any(line.strip().split("=")[0].split(">")[0].split("<")[0] == name for line in reqs.splitlines())
        assert f'"{name}' not in deps.replace("open_clip_torch", "")
