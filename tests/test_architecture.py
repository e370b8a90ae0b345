"""The shape of the house: dependencies point one way (stages -> pipeline), the library imports neither accelerate
nor the stages, and no import cycle exists inside pipeline/ (imports inside functions count too).

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
NOT_YET = ("pipeline/latents/",)


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
           if not (rel := p.relative_to(ROOT).as_posix()).startswith(("pipeline/storage/", *NOT_YET))
           and (found := backend_tests(p.read_text()))}
    assert bad == {}, "ask the storage (pipeline.storage.base.Storage) instead of testing for a backend"


if __name__ == "__main__":
    for name, deps in sorted(library_graph().items()):
        print(f"{name}: {', '.join(sorted(deps))}")
    print("cycle:", find_cycle(library_graph()), file=sys.stderr)
