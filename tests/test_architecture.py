"""The imports inside `madlens` respect the table in `docs/architecture.md`.

The allowed-imports table is parsed from the doc itself, so the doc and the code cannot
drift apart: an import the table does not allow, or a unit the table does not name, fails.
"""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "madlens"
DOC = ROOT / "docs" / "architecture.md"
HEADER = ("folder / file", "owns", "may import")
EVERYTHING = "everything"
ROOT_UNIT = "__init__"  # the package root: `madlens.__version__`, readable by every unit
CLI = "cli"
CLI_FRAMEWORKS = ("typer", "click")
LEAVES = ("cache", "errors", "report")  # import nothing of madlens
ONLY_ERRORS = ("metrics",)  # imports nothing of madlens but `errors`


# --- the table ---------------------------------------------------------------------------------


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def parse_table(text: str) -> dict[str, set[str] | str]:
    """`{unit: allowed units, or EVERYTHING}` from the markdown table whose header is HEADER.
    A unit is named by its first cell (`detectors/` or `cache.py`); allowed units are the
    backticked names in its last cell."""
    lines = text.splitlines()
    start = next(
        (i for i, line in enumerate(lines) if tuple(_cells(line)) == HEADER),
        None,
    )
    if start is None:
        raise AssertionError(f"{DOC.name}: no table with header {' | '.join(HEADER)}")
    table: dict[str, set[str] | str] = {}
    for line in lines[start + 2 :]:
        if not line.strip().startswith("|"):
            break
        cells = _cells(line)
        if len(cells) != len(HEADER):
            raise AssertionError(f"{DOC.name}: table row with {len(cells)} cells: {line}")
        name = re.fullmatch(r"`([\w.]+?)(?:/|\.py)`", cells[0])
        if name is None:
            raise AssertionError(f"{DOC.name}: unit not written as `folder/` or `file.py`: {line}")
        allowed = cells[-1]
        table[name.group(1)] = (
            EVERYTHING if allowed.strip() == EVERYTHING else set(re.findall(r"`(\w+)`", allowed))
        )
    return table


@pytest.fixture(scope="module")
def table() -> dict[str, set[str] | str]:
    return parse_table(DOC.read_text(encoding="utf-8"))


# --- the imports -------------------------------------------------------------------------------


def unit_of(module: str) -> str:
    """The top-level unit of a dotted module name under `madlens` (`madlens.sae.io` -> `sae`;
    `madlens` itself -> the package root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT_UNIT


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_submodule(dotted: str) -> bool:
    """Whether `madlens.a.b` names a module or package on disk (not an attribute)."""
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _dynamic_target(call: ast.Call) -> str | None:
    """The leading constant of `import_module("...")` / `__import__("...")`, f-strings too."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in ("import_module", "__import__") or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values:
        first = arg.values[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value.rstrip(".")
    return None


def imports_of(source: str, module: str, is_package: bool = False) -> list[tuple[str, int]]:
    """Every module imported anywhere in `source` (module level, in functions, dynamic
    `import_module` calls), as `(dotted name, line)`; `from madlens import x` counts as
    `madlens.x` when `x` is a submodule. Relative imports are resolved against `module`."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = {f"{base}.{a.name}" for a in node.names}
            targets = {t if _is_submodule(t) else base for t in targets}
            found += [(target, node.lineno) for target in sorted(targets)]
        elif isinstance(node, ast.Call):
            target = _dynamic_target(node)
            if target:
                found.append((target, node.lineno))
    return found


def edges() -> list[tuple[str, str, str]]:
    """`(importer unit, imported module, "file:line")` for every import in the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        where = path.relative_to(ROOT)
        source = path.read_text(encoding="utf-8")
        for imported, line in imports_of(source, module, path.name == "__init__.py"):
            found.append((unit_of(module), imported, f"{where}:{line}"))
    return found


def units_on_disk() -> set[str]:
    units = {p.stem for p in PACKAGE.glob("*.py")}
    units |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    return units


def _madlens_edges() -> list[tuple[str, str, str]]:
    return [
        (importer, unit_of(imported), where)
        for importer, imported, where in edges()
        if imported == "madlens" or imported.startswith("madlens.")
    ]


def _report(offending: list[tuple[str, str, str]]) -> str:
    return "\n".join(f"{a} -> {b} ({where})" for a, b, where in offending)


# --- the checks --------------------------------------------------------------------------------


def test_the_parser_sees_every_form_of_import(tmp_path):
    source = (
        "import madlens.models\n"
        "from madlens.data import format_chat\n"
        "from madlens import cache, __version__\n"
        "def f():\n"
        "    from madlens.sae.io import load_sae\n"
        "    import typer\n"
        "    return import_module(f'madlens.circuits.{name}')\n"
        "from . import store\n"
        "from .positions import encode\n"
    )
    found = imports_of(source, "madlens.activations.capture")
    assert sorted((line, unit_of(m) if m.startswith("madlens") else m) for m, line in found) == [
        (1, "models"), (2, "data"), (3, ROOT_UNIT), (3, "cache"), (5, "sae"), (6, "typer"),
        (7, "circuits"), (8, "activations"), (9, "activations"),
    ]  # fmt: skip


def test_the_table_names_every_unit_and_only_units_that_exist(table):
    on_disk = units_on_disk()
    assert not on_disk - set(table), (
        f"units missing from {DOC.name}'s table: {', '.join(sorted(on_disk - set(table)))}"
    )
    assert not set(table) - on_disk, (
        f"{DOC.name}'s table names units that do not exist: "
        f"{', '.join(sorted(set(table) - on_disk))} (list them under 'Planned' instead)"
    )
    unknown = {
        f"{unit}: {name}"
        for unit, allowed in table.items()
        if allowed != EVERYTHING
        for name in allowed
        if name not in table
    }
    assert not unknown, f"the table allows imports of unknown units: {sorted(unknown)}"


def test_imports_respect_the_table(table):
    offending = []
    for importer, imported, where in _madlens_edges():
        allowed = table.get(importer, set())
        if importer == imported or imported == ROOT_UNIT or allowed == EVERYTHING:
            continue
        if imported not in allowed:
            offending.append((importer, imported, where))
    assert not offending, f"imports that {DOC.name} does not allow:\n{_report(offending)}"


def test_only_the_cli_imports_a_cli_framework():
    offending = [
        (importer, imported.split(".")[0], where)
        for importer, imported, where in edges()
        if importer != CLI and imported.split(".")[0] in CLI_FRAMEWORKS
    ]
    assert not offending, f"library code importing a CLI framework:\n{_report(offending)}"


def test_leaves_import_nothing_of_madlens(table):
    for unit in LEAVES:
        assert table[unit] == set(), f"{DOC.name} must keep {unit} a leaf"
    for unit in ONLY_ERRORS:
        assert table[unit] <= {"errors"}, f"{DOC.name} must let {unit} import errors only"
    offending = [
        (importer, imported, where)
        for importer, imported, where in _madlens_edges()
        if importer != imported
        and (importer in LEAVES or (importer in ONLY_ERRORS and imported != "errors"))
    ]
    assert not offending, f"leaves importing madlens:\n{_report(offending)}"


def test_the_allowed_imports_form_no_cycle(table):
    graph = {
        unit: sorted(allowed)
        for unit, allowed in table.items()
        if allowed != EVERYTHING and unit != CLI
    }
    state: dict[str, str] = {}

    def visit(unit: str, path: list[str]) -> None:
        state[unit] = "open"
        for other in graph.get(unit, []):
            if other == unit or other not in graph:
                continue
            if state.get(other) == "open":
                raise AssertionError(f"cycle in {DOC.name}: {' -> '.join([*path, other])}")
            if other not in state:
                visit(other, [*path, other])
        state[unit] = "done"

    for unit in graph:
        if unit not in state:
            visit(unit, [unit])
