"""The layout's rules (DESIGN §1), checked by reading the source, not by trusting it.

- nothing under ``popex/`` imports Flask or the apps;
- no production module (anything ``edge_api`` or ``cloud_api`` imports,
  transitively) imports the test harness (``popex.testbed``) or the
  experiment runners (``experiments``);
- no module of ``popex/``, ``edge_api/``, ``cloud_api/`` is over 450 lines;
- a docstring or comment that names a ``popex.`` module names one that exists.

Each rule is a function over a source tree, so the tests also run it on a
copy of the tree with a synthetic offender added and see it fail.
"""

from __future__ import annotations

import ast
import re
import shutil
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("popex", "edge_api", "cloud_api", "api_common", "experiments")
APPS = ("edge_api", "cloud_api", "api_common")
NEVER_IN_POPEX = ("flask", "edge_api", "cloud_api", "api_common")
NEVER_IN_PRODUCTION = ("popex.testbed", "experiments")
MAX_MODULE_LINES = 450
_MODULE_REFERENCE = re.compile(r"\bpopex(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(root: Path) -> dict[str, Path]:
    """Every module of the project's packages under ``root``, by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")) if (root / package).is_dir() else []:
            found[_module_name(root, path)] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    """Dotted names a module imports anywhere in its body (function-level imports too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _matches(imported: str, forbidden: str) -> bool:
    return imported == forbidden or imported.startswith(forbidden + ".")


def layout_violations(root: Path) -> list[str]:
    """Every broken import rule in the tree at ``root``, one line each (empty: all hold)."""
    modules = _modules(root)
    imports = {name: _imports(name, path) for name, path in modules.items()}
    problems = []
    for name in sorted(modules):
        if name == "popex" or name.startswith("popex."):
            for imported in sorted(imports[name]):
                if any(_matches(imported, bad) for bad in NEVER_IN_POPEX):
                    problems.append(f"{name} imports {imported} (popex never imports Flask or the apps)")
    # Production: the apps and everything they import, transitively.
    production, todo = set(), [name for name in modules if name.split(".")[0] in APPS]
    while todo:
        name = todo.pop()
        if name in production:
            continue
        production.add(name)
        for imported in imports[name]:
            # "from popex.edge import node" names the module popex.edge.node or an attribute of popex.edge
            parts = imported.split(".")
            for n in range(len(parts), 0, -1):
                candidate = ".".join(parts[:n])
                if candidate in modules:
                    todo.append(candidate)
                    # a package's __init__ runs too
                    todo.extend(".".join(parts[:k]) for k in range(1, n) if ".".join(parts[:k]) in modules)
                    break
    for name in sorted(production):
        for imported in sorted(imports[name]):
            if any(_matches(imported, bad) for bad in NEVER_IN_PRODUCTION):
                problems.append(f"{name} (production: imported by the apps) imports {imported}")
    return problems


def long_modules(root: Path) -> list[str]:
    return [f"{path.relative_to(root)}: {n} lines"
            for package in ("popex", "edge_api", "cloud_api", "api_common")
            for path in sorted((root / package).rglob("*.py"))
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES]


def _defines(path: Path, attribute: str) -> bool:
    """Whether a module binds ``attribute`` anywhere (def, class, assignment, import), methods included."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == attribute:
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                (alias.asname or alias.name).split(".")[0] == attribute for alias in node.names):
            return True
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id == attribute:
            return True
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == attribute:
            return True
    return False


def _prose(path: Path) -> str:
    """The strings and comments of a module (a local variable called ``popex`` is not a reference)."""
    with path.open("rb") as handle:
        return "\n".join(token.string for token in tokenize.tokenize(handle.readline)
                         if token.type in (tokenize.STRING, tokenize.COMMENT))


def stale_references(root: Path) -> list[str]:
    """``popex.x.y`` names in the sources that are neither a module nor a module's attribute."""
    modules = _modules(root)
    problems = []
    for package in ("popex", "edge_api", "cloud_api", "experiments", "tests", "benchmarks"):
        for path in sorted((root / package).rglob("*.py")) if (root / package).is_dir() else []:
            if path.name == "test_layout.py":  # its synthetic offenders are the point
                continue
            for match in _MODULE_REFERENCE.finditer(_prose(path)):
                parts = match.group(0).split(".")
                n = max((k for k in range(1, len(parts) + 1) if ".".join(parts[:k]) in modules), default=0)
                rest = parts[n:]
                if n == 0 or (rest and not _defines(modules[".".join(parts[:n])], rest[0])):
                    problems.append(f"{path.relative_to(root)} names {match.group(0)}")
    return sorted(set(problems))


NUMPYDOC_ROOTS = ("popex/edge", "popex/cloud", "popex/wire.py", "popex/decision", "popex/tiers", "popex/device")


def _returns_something(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return node.returns is not None and not (isinstance(node.returns, ast.Constant) and node.returns.value is None)


def numpydoc_gaps(root: Path) -> list[str]:
    """Public functions and methods of the tier packages, the wire and the decision without numpydoc.

    A docstring needs a Parameters section when there are parameters and a
    Returns (or Yields) section when something is returned; a doctest
    example counts as documentation of both. Properties need a docstring.
    """
    gaps = []
    for name in NUMPYDOC_ROOTS:
        path = root / name
        for module in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            def visit(body: list[ast.stmt], prefix: str) -> None:
                for node in body:
                    if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                        visit(node.body, f"{prefix}{node.name}.")
                    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
                        continue
                    where = f"{module.relative_to(root)}:{node.lineno} {prefix}{node.name}"
                    doc = ast.get_docstring(node) or ""
                    if any(isinstance(d, (ast.Name, ast.Attribute)) and getattr(d, "id", getattr(d, "attr", ""))
                           in ("property", "setter", "cached_property") for d in node.decorator_list):
                        gaps.extend([f"{where}: no docstring"] if not doc else [])
                        continue
                    arguments = node.args.args + node.args.kwonlyargs + [a for a in (node.args.vararg, node.args.kwarg) if a]
                    has_parameters = any(a.arg not in ("self", "cls") for a in arguments)
                    problems = ["no docstring"] if not doc else [
                        section for section, needed, present in (
                            ("no Parameters", has_parameters, "Parameters" in doc),
                            ("no Returns", _returns_something(node), "Returns" in doc or "Yields" in doc))
                        if needed and not present and ">>>" not in doc]
                    gaps.extend([f"{where}: {', '.join(problems)}"] if problems else [])
            visit(ast.parse(module.read_text()).body, "")
    return gaps


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for package in PACKAGES:
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_the_tree_keeps_the_import_rules():
    assert layout_violations(REPO) == []


def test_a_flask_import_in_popex_is_caught(tmp_path):
    root = _copy_tree(tmp_path)
    (root / "popex" / "edge" / "synthetic_view.py").write_text("from flask import jsonify\n")
    assert layout_violations(root) == [
        "popex.edge.synthetic_view imports flask (popex never imports Flask or the apps)",
        "popex.edge.synthetic_view imports flask.jsonify (popex never imports Flask or the apps)",
    ]


def test_a_testbed_import_reached_from_an_app_is_caught(tmp_path):
    root = _copy_tree(tmp_path)
    (root / "popex" / "edge" / "synthetic_helper.py").write_text(
        "def start():\n    from popex.testbed import services\n    return services\n")
    # Not imported by any app yet: the harness may import it, nothing is broken.
    assert layout_violations(root) == []
    init = root / "edge_api" / "__init__.py"
    init.write_text(init.read_text() + "\nfrom popex.edge import synthetic_helper  # noqa: E402\n")
    assert layout_violations(root) == [
        "popex.edge.synthetic_helper (production: imported by the apps) imports popex.testbed",
        "popex.edge.synthetic_helper (production: imported by the apps) imports popex.testbed.services",
    ]


def test_an_experiment_import_in_the_cloud_app_is_caught(tmp_path):
    root = _copy_tree(tmp_path)
    init = root / "cloud_api" / "__init__.py"
    init.write_text(init.read_text() + "\nimport experiments.report  # noqa: E402\n")
    # the runner's own imports (the testbed) become production too, and are named as well
    assert "cloud_api (production: imported by the apps) imports experiments.report" in layout_violations(root)


def test_no_module_is_over_450_lines(tmp_path):
    assert long_modules(REPO) == []
    root = _copy_tree(tmp_path)
    (root / "popex" / "synthetic_long.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    assert long_modules(root) == [f"popex/synthetic_long.py: {MAX_MODULE_LINES + 1} lines"]


def test_docstrings_name_only_modules_that_exist(tmp_path):
    assert stale_references(REPO) == []
    root = _copy_tree(tmp_path)
    (root / "popex" / "synthetic_doc.py").write_text(
        '"""See :mod:`popex.runtime.preparation` and :func:`popex.checks.check_deadline_ms`."""\n')
    assert stale_references(root) == ["popex/synthetic_doc.py names popex.runtime.preparation"]


def test_public_functions_of_the_tiers_wire_and_decision_have_numpydoc(tmp_path):
    assert numpydoc_gaps(REPO) == []
    root = _copy_tree(tmp_path)
    (root / "popex" / "edge" / "synthetic_api.py").write_text(
        'def budget_ms(deadline_ms: float) -> float:\n    """Why, but no sections."""\n    return deadline_ms\n')
    assert numpydoc_gaps(root) == ["popex/edge/synthetic_api.py:1 budget_ms: no Parameters, no Returns"]
