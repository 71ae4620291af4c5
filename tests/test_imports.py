"""Which way imports point: an import graph of every module of the installed packages.

The packages and their folders come from pyproject.toml (`[tool.setuptools]`), so a package
added there is checked too. Each module is parsed with `ast`, never imported; imports inside
functions count like those at the top (that is how a cycle hides: it runs, until the day a
function-level import moves up). The rules (docs/architecture.md, "A map of the house"):

    ref       imports none of fast, kernels, parity, cli (nor the server or visualisation above)
    ref/      lists the model and nothing else: its top-level modules are REF_MODEL, the rest lives
              in the subpackages REF_SUBPACKAGES, and the model imports none of them (one named
              exception: vqvae's load/save write with checkpoints.tensorfiles)
    kernels   import neither model (ref, fast), nor anything above them
    cli       is imported by nothing but cli
    no module imports a private name (`_x`) from another module, or reads `module._x`
    no cycles among modules
"""

import ast
import pathlib
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOP = "paligemma"
# package -> the top-level packages it must not import (serve and viz land above fast).
FORBIDDEN = {
    "ref": {"fast", "kernels", "parity", "cli", "serve", "viz"},
    "kernels": {"ref", "fast", "parity", "cli", "serve", "viz"},
    "fast": {"parity", "cli", "serve", "viz"},
    "parity": {"cli", "serve", "viz"},
}
NOT_IMPORTED_BY_OTHERS = {"cli"}
# ref/ is the paper: the model's modules in the order of the data, then what surrounds the model in
# subpackages named for what they are (docs/architecture.md, "A map of the house").
REF_MODEL = ("config", "params", "ops", "mask", "siglip", "gemma", "model", "decode", "capture", "vqvae", "quant")
REF_SUBPACKAGES = ("checkpoints", "inputs", "tasks", "demo")
# (model module, subpackage module) pairs allowed against "the model imports none of the subpackages".
MODEL_MAY_IMPORT = {("paligemma.ref.vqvae", "paligemma.ref.checkpoints.tensorfiles")}
# The names `paligemma.ref` had before the move, still bound there for users (ref/__init__.py).
OLD_NAMES = {
    "checkpoint": "checkpoints.checkpoint", "tensorfiles": "checkpoints.tensorfiles",
    "hf_layout": "checkpoints.hf_layout", "inferconfig": "checkpoints.inferconfig",
    "quantfile": "checkpoints.quantfile", "quantread": "checkpoints.quantread",
    "tokenizer": "inputs.tokenizer", "image": "inputs.image", "video": "inputs.video", "media": "inputs.media",
    "scoring": "tasks.scoring", "metrics": "tasks.metrics", "draw": "tasks.draw", "shapes": "tasks.shapes",
}


def package_folder(package, folders, root=ROOT):
    """The folder of `package` as setuptools finds it: its own `package-dir` entry, else the
    nearest listed parent's folder plus the rest of the name (`paligemma.ref.tasks` -> ref/tasks)."""
    parts = package.split(".")
    for n in range(len(parts), 0, -1):
        parent = ".".join(parts[:n])
        if parent in folders:
            return root.joinpath(folders[parent], *parts[n:])
    return root.joinpath(*parts)


def installed_modules(root=ROOT):
    """`{dotted module name: path}` for every .py file of the packages pyproject.toml installs."""
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = setup.get("package-dir", {})
    modules = {}
    for package in setup["packages"]:
        folder = package_folder(package, folders, root)
        for path in sorted(folder.glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def _resolve(module, is_package, level, target):
    """The absolute name of `from <level dots><target> import ...` written in `module`."""
    if level == 0:
        return target
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(module, source, is_package, known):
    """`[(imported module, private name or None, line)]` for every import and `alias._x` in `source`.

    `from pkg import sub` points at `pkg.sub` when that is a module (not at `pkg`'s __init__);
    `from mod import name` points at `mod`. Only modules in `known` are returned.
    """
    tree = ast.parse(source)
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    found.append((alias.name, None, node.lineno))
                    if alias.asname:
                        aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    found.append((sub, None, node.lineno))
                    aliases[alias.asname or alias.name] = sub
                elif base in known:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    found.append((base, alias.name if private else None, node.lineno))
    for node in ast.walk(tree):  # `quantfile._helper` through a module bound above
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append((aliases[node.value.id], node.attr, node.lineno))
    return found


def import_graph(modules):
    """`{module: [(imported module, private name or None, line)]}`, self-imports left out."""
    graph = {}
    for name, path in modules.items():
        edges = imports_of(name, path.read_text(), path.stem == "__init__", set(modules))
        graph[name] = [e for e in edges if e[0] != name]
    return graph


def cycles(graph):
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _, _ in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _package(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == TOP else None


def _ref_part(module):
    """"model" for a model module of ref/, the subpackage's name for one of its modules, else None."""
    parts = module.split(".")
    if parts[:2] != [TOP, "ref"] or len(parts) < 3:
        return None
    return "model" if parts[2] in REF_MODEL else parts[2]


def violations(graph):
    """Every broken rule as one readable line."""
    lines = []
    for module, edges in sorted(graph.items()):
        mine = _package(module)
        for target, private, line in edges:
            theirs = _package(target)
            if theirs in FORBIDDEN.get(mine, ()):
                lines.append(f"{module}:{line} imports {target}: {mine} must not import {theirs}")
            if theirs in NOT_IMPORTED_BY_OTHERS and mine != theirs:
                lines.append(f"{module}:{line} imports {target}: nothing outside {theirs} imports it")
            if private:
                lines.append(f"{module}:{line} takes the private name {private} from {target}")
            if (_ref_part(module) == "model" and _ref_part(target) not in (None, "model")
                    and (module, target) not in MODEL_MAY_IMPORT):
                lines.append(f"{module}:{line} imports {target}: the model does not import what surrounds it")
    for component in cycles(graph):
        lines.append("import cycle: " + " <-> ".join(component))
    return lines


def ref_layout(root=ROOT):
    """Every way the folder of `paligemma.ref` departs from "the model, and named subpackages"."""
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    folder = package_folder("paligemma.ref", setup.get("package-dir", {}), root)
    modules = {path.stem for path in folder.glob("*.py")} - {"__init__"}
    subfolders = {path.name for path in folder.iterdir() if path.is_dir() and any(path.glob("*.py"))}
    lines = [f"ref/{stem}.py is not part of the model: it belongs in one of the subpackages "
             f"{', '.join(REF_SUBPACKAGES)}" for stem in sorted(modules - set(REF_MODEL))]
    lines += [f"ref/{stem}.py is missing (REF_MODEL lists it)" for stem in sorted(set(REF_MODEL) - modules)]
    lines += [f"ref/{name}/ is not a named subpackage (REF_SUBPACKAGES; docs/architecture.md says where "
              "things go)" for name in sorted(subfolders - set(REF_SUBPACKAGES) - {"__pycache__"})]
    lines += [f"paligemma.ref.{name} is missing from pyproject.toml's packages (it would not be installed)"
              for name in REF_SUBPACKAGES if f"paligemma.ref.{name}" not in setup["packages"]]
    return lines


@pytest.fixture(scope="module")
def graph():
    return import_graph(installed_modules())


def test_every_package_is_read(graph):
    packages = {_package(m) for m in graph}
    assert {"ref", "fast", "kernels", "parity", "cli"} <= packages
    assert "paligemma.ref.gemma" in graph and "paligemma.cli.common" in graph
    assert ("paligemma.ref.config", None) in {(t, p) for t, p, _ in graph["paligemma.ref.gemma"]}


def test_imports_point_one_way(graph):
    assert violations(graph) == []


def test_ref_lists_the_model_and_nothing_else():
    assert ref_layout() == []


def test_the_old_module_names_still_work():
    """`from paligemma.ref import metrics` (and the other names from before the move) still works;
    `paligemma.ref.tasks` is the subpackage, and still offers what `ref/tasks.py` held."""
    import importlib
    import inspect

    from paligemma import ref
    from paligemma.ref.tasks import answers

    for old, new in OLD_NAMES.items():
        assert getattr(ref, old) is importlib.import_module(f"paligemma.ref.{new}"), old
    assert ref.tasks.parse is answers.parse and ref.tasks.CONVENTIONS is answers.CONVENTIONS
    public = {name for name, value in vars(answers).items() if not name.startswith("_") and not inspect.ismodule(value)
              and getattr(value, "__module__", answers.__name__) == answers.__name__}
    assert public <= set(ref.tasks.__all__)


# --- the checker itself, on small planted sources -------------------------------------------------


def _planted(tmp_path, files):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "pyproject.toml").write_text(
        '[tool.setuptools]\npackages = ["paligemma.ref", "paligemma.fast", "paligemma.cli"]\n'
        '[tool.setuptools.package-dir]\n"paligemma.ref" = "ref"\n"paligemma.fast" = "fast"\n"paligemma.cli" = "cli"\n')
    return violations(import_graph(installed_modules(tmp_path)))


def test_a_cycle_hidden_in_a_function_is_found(tmp_path):
    found = _planted(tmp_path, {
        "ref/__init__.py": "",
        "ref/a.py": "from .b import f\n",
        "ref/b.py": "def f():\n    from .c import g  # the hidden half\n    return g()\n",
        "ref/c.py": "from paligemma.ref import a\n",
    })
    assert found == ["import cycle: paligemma.ref.a <-> paligemma.ref.b <-> paligemma.ref.c"]


def test_direction_and_private_names_are_found(tmp_path):
    found = _planted(tmp_path, {
        "ref/__init__.py": "",
        "ref/ops.py": "def _helper():\n    pass\n",
        "ref/model.py": "from . import ops\nfrom .ops import _helper\n\ndef f():\n    import paligemma.fast.x\n"
                        "    return ops._helper()\n",
        "fast/__init__.py": "",
        "fast/x.py": "from paligemma.cli import common\nfrom paligemma.ref import ops\n",
        "cli/__init__.py": "",
        "cli/common.py": "from paligemma.fast import x\n",
    })
    assert found == [
        "paligemma.fast.x:1 imports paligemma.cli.common: fast must not import cli",
        "paligemma.fast.x:1 imports paligemma.cli.common: nothing outside cli imports it",
        "paligemma.ref.model:2 takes the private name _helper from paligemma.ref.ops",
        "paligemma.ref.model:5 imports paligemma.fast.x: ref must not import fast",
        "paligemma.ref.model:6 takes the private name _helper from paligemma.ref.ops",
        "import cycle: paligemma.cli.common <-> paligemma.fast.x",
    ]


def test_plumbing_at_the_top_of_ref_is_found(tmp_path):
    files = {"ref/__init__.py": "", **{f"ref/{m}.py": "" for m in REF_MODEL},
             **{f"ref/{s}/__init__.py": "" for s in REF_SUBPACKAGES}}
    files["ref/tokenizer.py"] = ""  # plumbing planted back at the top
    files["ref/extras/__init__.py"] = ""  # a subpackage nobody named
    files["ref/gemma.py"] = "from .inputs import tokenizer\n"  # the model reaching out
    files["ref/inputs/tokenizer.py"] = "from ..config import X\n"  # the other way is fine
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    packages = ", ".join(f'"paligemma.ref.{s}"' for s in REF_SUBPACKAGES if s != "demo")
    (tmp_path / "pyproject.toml").write_text(
        f'[tool.setuptools]\npackages = ["paligemma.ref", {packages}]\n'
        '[tool.setuptools.package-dir]\n"paligemma.ref" = "ref"\n')
    assert ref_layout(tmp_path) == [
        "ref/tokenizer.py is not part of the model: it belongs in one of the subpackages "
        "checkpoints, inputs, tasks, demo",
        "ref/extras/ is not a named subpackage (REF_SUBPACKAGES; docs/architecture.md says where things go)",
        "paligemma.ref.demo is missing from pyproject.toml's packages (it would not be installed)",
    ]
    assert violations(import_graph(installed_modules(tmp_path))) == [
        "paligemma.ref.gemma:1 imports paligemma.ref.inputs.tokenizer: the model does not import what surrounds it",
    ]
