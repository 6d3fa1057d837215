"""The package's layers and the one-way rule (docs/architecture.md), read from the source with ``ast``:

    core (samplers, rewards, noise, training, tiny, runtime.py, plots.py)  <-  host/  <-  nodes/
    apps (cli.py, batch/, workflows/, __init__.py) may import anything

- the core never imports the host wing or the nodes; the host wing never imports the nodes;
- only the host wing imports ComfyUI (comfy*, folder_paths, server, ComfyUI's own ``nodes``), also via importlib;
- no module imports another module's private (``_name``) objects;
- node files define node classes and small schema helpers only.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = {"samplers", "rewards", "noise", "training", "tiny", "runtime", "plots"}
ALLOWED = {"core": {"core"}, "host": {"core", "host"}, "nodes": {"core", "host", "nodes"}}
COMFY = {"comfy", "comfy_extras", "comfy_api", "comfy_execution", "comfy_config", "folder_paths", "server", "nodes",
         "execution", "latent_preview", "node_helpers"}
DYNAMIC_IMPORTERS = {"import_module", "_comfy", "optional"}
SMALL_HELPER_LINES = 12


def package_files():
    skip = {"tests", "bench", ".venv", ".comfyui", ".git", "build", "dist"}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in skip or rel.parts[0].startswith((".venv", ".")):
            continue
        yield rel, path.read_text(encoding="utf-8")


def layer(parts):
    """The layer of a module given by its path parts inside the package (e.g. ("training", "draft"))."""
    top = parts[0] if parts else ""
    if top in CORE:
        return "core"
    if top in ("host", "nodes"):
        return top
    return "app"


def module_parts(rel):
    parts = list(rel.with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imports(rel, source):
    """(line, kind, target) for every import in a file: kind "pack" with the target's parts inside the package,
    "external" with the top-level module name (static and importlib imports)."""
    here = module_parts(rel)
    package = here if rel.name == "__init__.py" else here[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = base + (node.module.split(".") if node.module else [])
                names = [target + [a.name] for a in node.names] if not node.module else [target]
                for t in names:
                    yield node.lineno, "pack", t, [a.name for a in node.names]
            elif node.module.split(".")[0] == "rewardlab":
                yield node.lineno, "pack", node.module.split(".")[1:], [a.name for a in node.names]
            else:
                yield node.lineno, "external", node.module.split(".")[0], [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                if top == "rewardlab":
                    yield node.lineno, "pack", a.name.split(".")[1:], []
                else:
                    yield node.lineno, "external", top, []
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in DYNAMIC_IMPORTERS and not node.args[0].value.startswith("."):
                yield node.lineno, "external", node.args[0].value.split(".")[0], []


def violations(files):
    found = []
    for rel, source in files:
        own = layer(module_parts(rel))
        for line, kind, target, names in imports(rel, source):
            where = f"{rel}:{line}"
            if kind == "external":
                if target in COMFY and own != "host":
                    found.append(f"{where} imports ComfyUI's {target!r} outside host/")
                continue
            other = layer(target)
            if own in ALLOWED and other not in ALLOWED[own]:
                found.append(f"{where} ({own}) imports {'.'.join(target)} ({other}): imports point core <- host <- nodes")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                found.append(f"{where} imports private names {private} from {'.'.join(target)}")
    return found


def test_imports_point_one_way_and_only_the_host_wing_imports_comfyui():
    files = list(package_files())
    assert len(files) > 40                              # the walk found the package
    assert violations(files) == []


def test_the_checker_catches_what_it_is_for():
    bad = [(Path("training/x.py"), "from ..host import grad\n"),
           (Path("rewards/y.py"), "def f():\n    from ..nodes import host\n"),
           (Path("host/z.py"), "from ..nodes.train_nodes import TARGETS\n"),
           (Path("samplers/w.py"), "import importlib\nm = importlib.import_module('comfy.samplers')\n"),
           (Path("nodes/v.py"), "import folder_paths\n"),
           (Path("noise/u.py"), "from .chain import _Stop\n")]
    assert len(violations(bad)) == len(bad)
    good = [(Path("host/a.py"), "import importlib\nfrom ..training.lora import LoRA\n"
                                "def f():\n    return importlib.import_module('comfy.sd')\n"),
            (Path("nodes/b.py"), "from ..host.bridge import STEP_NAMES\nfrom .. import runtime\n"),
            (Path("cli.py"), "from .nodes import NODE_CLASS_MAPPINGS\n")]
    assert violations(good) == []


def test_node_files_hold_node_classes_and_small_schema_helpers_only():
    for rel, source in package_files():
        if rel.parts[0] != "nodes" or rel.name == "__init__.py":
            continue
        for node in ast.parse(source).body:
            if isinstance(node, ast.ClassDef):
                attrs = {t.id for n in node.body if isinstance(n, ast.Assign) for t in n.targets
                         if isinstance(t, ast.Name)}
                methods = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
                assert {"FUNCTION", "RETURN_TYPES", "CATEGORY"} <= attrs and "INPUT_TYPES" in methods, \
                    f"{rel}: class {node.name} is not a node class; move it to the host wing or the core"
            elif isinstance(node, ast.FunctionDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= SMALL_HELPER_LINES or returns_a_schema(node), \
                    f"{rel}: {node.name}() has {length} lines; node files keep only small schema helpers"


def returns_a_schema(function):
    """A function whose body is one return of a literal dict/tuple (input specs), however many entries it lists."""
    body = [n for n in function.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    return len(body) == 1 and isinstance(body[0], ast.Return) and isinstance(body[0].value, (ast.Dict, ast.Tuple))
