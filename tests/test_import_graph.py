"""The package's import graph, read from the source with `ast` (imports inside functions count too: they run, just
later): no cycle among modules, imports only go down the declared layers, and no private name is reached from another
module. A failure names the cycle or the offending import."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "stepdistill"

# Lowest first. A module may import from its own layer and the layers below it, never from one above. Modules are
# placed by their first name under stepdistill/ ("" is stepdistill/__init__.py, the public API).
LAYERS = [
    ({"errors", "files", "hashing", "registry", "data", "devices"},
     "leaves: they import nothing from the package but the error family (the registry finds its plug-ins by name "
     "at run time)"),
    ({"recipe"}, "the config schema; it looks a plug-in's Config class up in the registry, by name"),
    ({"diffusion"}, "pure maths: schedules, solvers, samplers; the caller passes its noise functions"),
    ({"parallel"}, "processes and their shares of the random draws: the training machinery's, not the maths'"),
    ({"models"}, "networks over the diffusion maths, with the recipe's defaults"),
    ({"kernels"}, "how the models' networks execute (attention, compile, checkpointing, forward-mode AD)"),
    ({"objectives", "teachers"}, "the plug-ins, registered by name; they build on models and kernels"),
    ({"eval"}, "sampling and metrics of students and teachers; the trainer calls it, plug-ins never do"),
    ({"training", "run"}, "the training loop and the run folders it writes (run.py reads them back, as resume does)"),
    ({"export"}, "writes a trained student out; training never needs it"),
    ({"bench", "speed", "plan", "cli", "__main__", ""}, "entry points: commands and the public API"),
]

def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package's __init__) for every module under stepdistill/."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (path, package)
    return out


def imported(name: str, package: bool, node: ast.Import | ast.ImportFrom, known) -> list[tuple[str, str, str | None]]:
    """(local name, module, name imported from it or None) for each target of one import statement inside the
    package. `from a import b` targets module a.b where that is a module, else a (b a name defined there)."""
    if isinstance(node, ast.Import):
        return [(a.asname or "stepdistill", a.name if a.asname else "stepdistill", None) for a in node.names
                if a.name.split(".")[0] == "stepdistill"]
    if node.level:  # relative: strip the module's own name (not a package's), then one part per extra dot
        base = name.split(".")[: None if package else -1]
        base = base[: len(base) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
        if source.split(".")[0] != "stepdistill":
            return []
    return [(a.asname or a.name, f"{source}.{a.name}", None) if f"{source}.{a.name}" in known
            else (a.asname or a.name, source, a.name) for a in node.names]


def graph() -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the modules it imports (anywhere in the file), and the private names reached across modules."""
    known = modules()
    edges, private = {}, []
    for name, (path, package) in known.items():
        tree = ast.parse(path.read_text(), str(path))
        bound = {}  # local names of imported package modules, for `module._name` reached as an attribute
        edges[name] = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for local, target, what in imported(name, package, node, known):
                while target not in known:  # `import stepdistill.x.y` counts as its nearest module
                    target = target.rpartition(".")[0]
                if target != name:
                    edges[name].add(target)
                where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
                if what is not None and what.startswith("_") and not what.startswith("__"):
                    private.append(f"{where} imports {what} from {target}")
                elif what is None:
                    last = target.rpartition(".")
                    if last[2].startswith("_") and not last[2].startswith("__") and \
                            not (name + ".").startswith(last[0] + "."):
                        private.append(f"{where} imports the private module {target} from outside {last[0]}")
                    bound[local] = target
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                private.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} reaches "
                               f"{bound[node.value.id]}.{node.attr}")
    return edges, private


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search; a node on the current path seen again closes one)."""
    done, path = set(), []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(edges):
        if (cycle := visit(start)) is not None:
            return cycle
    return None


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    return next(i for i, (members, _) in enumerate(LAYERS) if top in members)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    edges, _ = graph()
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer():
    tops = {m.split(".")[1] if "." in m else "" for m in modules()}
    placed = set().union(*(members for members, _ in LAYERS))
    assert tops <= placed, f"place {sorted(tops - placed)} in LAYERS (tests/test_import_graph.py)"


def test_imports_only_go_down_the_layers():
    edges, _ = graph()
    upward = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)}: {LAYERS[layer(b)][1]})"
              for a in sorted(edges) for b in sorted(edges[a]) if layer(b) > layer(a)]
    assert not upward, "imports up the layers:\n" + "\n".join(upward)


def test_no_private_name_is_reached_from_another_module():
    _, private = graph()
    assert not private, "make these public under a proper name, or move them:\n" + "\n".join(private)


def test_the_registry_finds_every_registered_plug_in_on_its_own():
    """A fresh interpreter that imports only the registry lists every @register("kind", "name") in the source."""
    kinds = ("objective", "teacher", "domain", "backbone")
    declared = {k: set() for k in kinds}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register" and len(node.args) == 2:
                kind, name = (a.value for a in node.args)
                declared[kind].add(name)
    code = "from stepdistill import registry\n" + "".join(f"print(registry.names({k!r}))\n" for k in kinds)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.splitlines()
    assert [ast.literal_eval(line) for line in out[-len(kinds):]] == [sorted(declared[k]) for k in kinds]


def test_no_subpackage_shadows_a_top_level_function():
    """Importing a subpackage sets it as an attribute of its parent, so a subpackage named like one of the top-level
    functions (stepdistill.train was one) replaces that function after its first call."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    modules = {p.stem if p.suffix == ".py" else p.name for p in PACKAGE.iterdir()
               if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert functions and not functions & modules
