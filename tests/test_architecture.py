"""The shape of the house: dependencies point one way (stages -> pipeline), the library imports neither accelerate
nor the stages, no import cycle exists inside pipeline/ (imports inside functions count too), and no module keeps a
process-wide registry (a module-level container its code fills at run time): what is loaded once belongs to the object
that uses it (the Trainer, the Evaluator, a stage) and is handed on, never wired through a global.

  python -m pytest tests/test_architecture.py        # the check; `python tests/test_architecture.py` prints the graph
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (absolute names; `from a import b` counts a.b when b is a module)."""
    out = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def library_graph() -> dict[str, set[str]]:
    """pipeline module -> the pipeline modules it imports (packages resolve to their __init__)."""
    files = {module_name(p): p for p in (ROOT / "pipeline").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        graph[name] = {m for m in imports_of(path) if m in files and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            # a package's __init__ re-exporting its own modules is not a cycle with them
            if n.startswith(m + ".") or m.startswith(n + ".") and ROOT.joinpath(*n.split("."), "__init__.py").is_file():
                continue
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_library_imports_neither_accelerate_nor_the_stages():
    bad = sorted((module_name(p), m) for p in (ROOT / "pipeline").rglob("*.py") for m in imports_of(p)
                 if m.split(".")[0] in ("accelerate", "stages"))
    assert bad == []


def test_no_import_cycle_in_the_library():
    assert find_cycle(library_graph()) is None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# ------------------------------------------------------------------------------------------------ registries
MUTABLE_CALLS = {"dict", "list", "set", "defaultdict", "OrderedDict", "Counter", "deque", "bytearray",
                 "WeakValueDictionary", "WeakKeyDictionary", "WeakSet"}
MUTATORS = {"append", "add", "update", "setdefault", "pop", "popitem", "clear", "extend", "insert", "remove", "discard",
            "appendleft", "extendleft", "difference_update", "intersection_update", "symmetric_difference_update",
            "sort", "reverse", "__setitem__", "__delitem__"}
# where a process-wide table is the design: the storage backends' instances, options and held locks; the family table
# (filled once, at import)
ALLOWED_FOLDERS = ("pipeline/storage/",)
ALLOWED = {("pipeline/models/families/__init__.py", "FAMILIES")}


def _name(node) -> str | None:
    """`f` of f and of module.f."""
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


def _dotted(node) -> str | None:
    """"a.b.c" of a name or an attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def _mutable(value) -> bool:
    if isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)):
        return True
    return isinstance(value, ast.Call) and _name(value.func) in MUTABLE_CALLS


def _locals(fn) -> set[str]:
    """Names a function binds itself (parameters, assignments) and does not declare global: they shadow the module's."""
    declared = {n for node in ast.walk(fn) if isinstance(node, ast.Global) for n in node.names}
    args = fn.args
    bound = {a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg) if a}
    bound |= {node.id for node in ast.walk(fn) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
    return bound - declared


def _scan(module: str, source: str) -> tuple[set[str], set[str], set[str]]:
    """(the module's containers, its cached functions, what its functions mutate): "module.NAME" each, a name its
    functions mutate resolved through its imports (`from m import X`, `import m as a`: a.X) to where it is bound."""
    tree = ast.parse(source)
    containers, cached = set(), set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and _mutable(node.value):
            containers |= {f"{module}.{t.id}" for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and node.value is not None and _mutable(node.value) \
                and isinstance(node.target, ast.Name):
            containers.add(f"{module}.{node.target.id}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                _name(getattr(d, "func", d)) in ("cache", "lru_cache") for d in node.decorator_list):
            cached.add(f"{module}.{node.name}")
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname or a.name.split(".")[0]: a.name if a.asname else a.name.split(".")[0]
                            for a in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})

    def where(dotted: str | None, shadowed: set[str]) -> set[str]:
        head, _, rest = (dotted or "").partition(".")
        if not head or head in shadowed:
            return set()
        return {".".join(filter(None, [aliases.get(head, f"{module}.{head}"), rest]))}

    mutated = set()
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        shadowed = _locals(fn) if not isinstance(fn, ast.Lambda) else set()
        for node in ast.walk(fn):
            if isinstance(node, ast.Global):
                mutated |= {f"{module}.{n}" for n in node.names}
            targets = (node.targets if isinstance(node, (ast.Assign, ast.Delete)) else
                       [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for t in targets:
                if isinstance(t, ast.Subscript):
                    mutated |= where(_dotted(t.value), shadowed)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
                mutated |= where(_dotted(node.func.value), shadowed)
    return containers, cached, mutated


def registries(sources: dict[str, str]) -> list[str]:
    """Of the modules {name: source}, the module-level names bound to a mutable container (dict, list, set,
    defaultdict, ...) that a function of any of them mutates (item assignment or deletion, .append / .add / .update /
    .setdefault / .pop / .clear ..., rebinding through `global`): process-wide registries, as "module NAME". A module
    function under functools.cache / lru_cache is the same table under another name, and counts too. A table built
    at import and only read afterwards is not one."""
    scans = [_scan(module, source) for module, source in sources.items()]
    mutated = set().union(*(m for _, _, m in scans))
    found = set().union(*((c & mutated) | cached for c, cached, _ in scans))
    return sorted(" ".join(name.rsplit(".", 1)) for name in found)


def test_no_module_keeps_a_registry():
    """Process-wide registries do hidden wiring: what a module fills at run time is state another caller sees (two
    trainers in one process, a test after another). Outside pipeline/storage/ and the family table, none."""
    files = {module_name(p): p for p in [*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "stages").rglob("*.py")]}
    found = []
    for entry in registries({m: p.read_text() for m, p in files.items()}):
        module, name = entry.split()
        rel = files[module].relative_to(ROOT).as_posix()
        if not rel.startswith(ALLOWED_FOLDERS) and (rel, name) not in ALLOWED:
            found.append(f"{rel} {name}")
    assert found == []


def test_the_registry_finder_finds_a_registry():
    def one(source: str) -> list[str]:
        return [e.split()[1] for e in registries({"m": source})]

    assert one("_SEEN = {}\ndef load(k):\n    if k not in _SEEN:\n        _SEEN[k] = k * 2\n    return _SEEN[k]\n") \
        == ["_SEEN"]
    assert one("_PINS: list = []\ndef pin(p):\n    _PINS.append(p)\n") == ["_PINS"]
    assert one("_DONE = set()\ndef done(k):\n    _DONE.add(k)\n") == ["_DONE"]
    assert one("_T = dict()\ndef reset():\n    global _T\n    _T = {}\n") == ["_T"]
    assert one("_T = {}\ndef forget(k):\n    del _T[k]\n") == ["_T"]
    assert one("import functools\n@functools.lru_cache(maxsize=None)\ndef load(k):\n    return k\n") == ["load"]
    assert one("from functools import cache\n@cache\ndef load(k):\n    return k\n") == ["load"]
    # filled from another module, by name or through the module
    table = "TABLE = {}\n"
    assert registries({"a.t": table, "b": "from a.t import TABLE\ndef add(k):\n    TABLE[k] = 1\n"}) == ["a.t TABLE"]
    assert registries({"a.t": table, "b": "import a.t as m\ndef add(k):\n    m.TABLE.update(k=1)\n"}) == ["a.t TABLE"]
    # constants, a local of the same name, and a table filled at import are not registries
    assert one("TABLE = {'a': 1}\ndef get(k):\n    return TABLE[k]\n") == []
    assert one("_T = {}\ndef f():\n    _T = {}\n    _T['a'] = 1\n    return _T\n") == []
    assert one("_T = {}\n_T['a'] = 1\nfor k in 'bc':\n    _T[k] = 2\n") == []
    assert registries({"a.t": table, "b": "from a.t import TABLE\nTABLE['k'] = 1\n"}) == []


def test_stages_are_entry_points():
    long = {p.name: n for p in (ROOT / "stages").glob("*.py") if (n := len(p.read_text().splitlines())) > 200}
    assert long == {}


# ------------------------------------------------------------------------------ one storage interface
# Code outside pipeline/storage/ never tells backends apart by hand: it asks the storage (pipeline.storage.base.Storage)
# for what it needs. A backend test is a call or an import of is_remote / is_url, or a URL scheme literal ("s3://",
# "file://", "://") that is compared or matched (==, in, startswith, split...); building a URL in an f-string, and
# docstrings or comments naming s3:// URLs as examples, are not tests.
BACKEND_TESTS = {"is_remote", "is_url"}
MATCHING = {"startswith", "endswith", "partition", "rpartition", "split", "rsplit", "find", "index", "removeprefix",
            "match", "fullmatch", "search"}
# pipeline/latents/ still tests backends until the helper that moves it onto the interface lands (issue 30)
def _scheme(node) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and "://" in node.value


def backend_tests(source: str) -> list[str]:
    """'line: what' for each place in `source` (Python) that tells storage backends apart by hand."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and any(a.name in BACKEND_TESTS for a in node.names):
            found.append(f"{node.lineno}: imports {', '.join(a.name for a in node.names if a.name in BACKEND_TESTS)}")
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name in BACKEND_TESTS:
                found.append(f"{node.lineno}: calls {name}")
            elif name in MATCHING and any(_scheme(a) for a in ast.walk(node) if a is not f):
                found.append(f"{node.lineno}: {name} of a URL scheme")
        elif isinstance(node, ast.Compare) and any(_scheme(a) for a in [node.left, *node.comparators]):
            found.append(f"{node.lineno}: compares with a URL scheme")
    return found


def test_the_finder_of_backend_tests_finds_them():
    assert backend_tests("from pipeline.storage import is_remote\nif is_remote(p): pass") == [
        "1: imports is_remote", "2: calls is_remote"]
    assert backend_tests("x = str(p).startswith('s3://')\ny = 's3://' in p\nz = storage.is_url(p)") == [
        "1: startswith of a URL scheme", "2: compares with a URL scheme", "3: calls is_url"]
    assert backend_tests('"""Read s3://bucket/key."""\nu = f"s3://{bucket}/{key}"  # s3:// in a comment') == []


def test_no_backend_is_told_apart_outside_the_storage():
    files = [p for folder in ("pipeline", "stages", "benchmarks") for p in sorted((ROOT / folder).rglob("*.py"))]
    bad = {rel: found for p in files
           if not (rel := p.relative_to(ROOT).as_posix()).startswith("pipeline/storage/")
           and (found := backend_tests(p.read_text()))}
    assert bad == {}, "ask the storage (pipeline.storage.base.Storage) instead of testing for a backend"


if __name__ == "__main__":
    for name, deps in sorted(library_graph().items()):
        print(f"{name}: {', '.join(sorted(deps))}")
    print("cycle:", find_cycle(library_graph()), file=sys.stderr)
