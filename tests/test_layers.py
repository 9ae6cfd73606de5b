"""The layer contract: imports point down, from the application to the method's data types.

Every import in the source (module-level and inside functions) is read from the AST, so a
lazy import cannot hide an upward arrow.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CORE_LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "digest"),  # the errors a user's input raises; the one content hash
    ("envs",),  # the environments: the world the agent acts in
    ("types",),  # messages, steps, trajectories, pairs: the data stages pass
    ("agent",),  # the ReAct turn format and the one prompt builder
    ("training",),  # SFT, the mixture loss, the step reward model, checkpoints
    ("config",),  # the typed settings of a run
    ("engine",),  # policy backends and the lock-step rollout engine
    ("method",),  # explore, step rewards, mining, evaluation: IPR's algorithm
    ("store",),  # DuckDB: schema, SQL, row mapping, the JSON file formats
    ("run",),  # the loop: the one stage list, run context, costs, shards, experiments
)
"""`ipr_core`'s layers, bottom first: a module imports its own layer or one below it."""

APP_LAYERS: tuple[str, ...] = ("ipr_core", "tasks", "flows")
"""The packages above the library: Prefect stays out of `ipr_core`."""


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every module `path` imports; `from a import b` yields `a.b`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _module(path: Path, root: Path = ROOT) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts)


def _core_layer(name: str) -> int | None:
    """The layer of `ipr_core.<part>...`; None for the package root and anything outside."""
    parts = name.split(".")
    if parts[0] != "ipr_core" or len(parts) < 2:
        return None
    return next((i for i, layer in enumerate(CORE_LAYERS) if parts[1] in layer), None)


def upward_imports(package: str, root: Path = ROOT) -> list[str]:
    """`file:line imports name` for each import in `package` of a layer above the importer."""
    found = []
    for path in sorted((root / package).rglob("*.py")):
        module = _module(path, root)
        own_app = APP_LAYERS.index(package)
        own_core = _core_layer(module)
        for line, name in _imports(path):
            top = name.split(".")[0]
            above = top in APP_LAYERS and APP_LAYERS.index(top) > own_app
            above = above or (package == "ipr_core" and top == "prefect")
            if package == "ipr_core":
                layer = _core_layer(name)
                above = above or (layer is not None and own_core is not None and layer > own_core)
            if above:
                found.append(f"{path.relative_to(root)}:{line} imports {name}")
    return found


def test_every_core_module_sits_in_a_layer() -> None:
    """A new sub-package or top-level module must be given its place in the contract."""
    unplaced = [
        _module(path)
        for path in (ROOT / "ipr_core").rglob("*.py")
        if path.name != "__init__.py" or path.parent.name != "ipr_core"
        if _core_layer(_module(path)) is None
    ]
    assert unplaced == []


def test_imports_point_down() -> None:
    for package in APP_LAYERS:
        assert upward_imports(package) == [], package


def test_the_contract_sees_an_upward_import(tmp_path: Path) -> None:
    """A lazy import inside a function, the kind that hides best, and Prefect in the library."""
    method = tmp_path / "ipr_core" / "method"
    method.mkdir(parents=True)
    (method / "explore.py").write_text(
        "import prefect\n\n\ndef f():\n    from ipr_core.run import loop\n"
    )
    assert upward_imports("ipr_core", tmp_path) == [
        "ipr_core/method/explore.py:1 imports prefect",
        "ipr_core/method/explore.py:5 imports ipr_core.run.loop",
    ]


SQL = re.compile(
    r"\bSELECT\b[\s\S]*\bFROM\b|\bINSERT\s+(OR\s+\w+\s+)?INTO\b|\bUPDATE\s+\w+\s+SET\b"
    r"|\bDELETE\s+FROM\b|\bCREATE\s+(OR\s+REPLACE\s+)?(TABLE|VIEW|INDEX)\b|\bWHERE\b"
    r"|\b\w+\s*(=|<>|>=|<=|<|>)\s*\?"
)
"""What a string constant holding SQL (or a WHERE fragment of it) looks like."""
SQL_HOMES = {
    "ipr_core/store": "the store package: schema, migrations, every query of the store",
    "ipr_core/envs": "InterCode-SQL's MySQL: the environment's own database, not the store",
}


def sql_constants(root: Path = ROOT) -> list[str]:
    """`file:line` of each string constant that looks like SQL outside `SQL_HOMES`."""
    found = []
    for package in APP_LAYERS:
        for path in sorted((root / package).rglob("*.py")):
            name = path.relative_to(root).as_posix()
            if any(name == home or name.startswith(home + "/") for home in SQL_HOMES):
                continue
            for node in ast.walk(ast.parse(path.read_text(), name)):
                text = node.value if isinstance(node, ast.Constant) else None
                if isinstance(text, str) and SQL.search(text):
                    found.append((name, node.lineno))
    return [f"{name}:{line}" for name, line in sorted(found)]


def test_no_sql_outside_the_store() -> None:
    assert sql_constants() == []


def test_the_sql_walk_finds_a_query_and_a_fragment(tmp_path: Path) -> None:
    loop = tmp_path / "ipr_core" / "run" / "loop.py"
    loop.parent.mkdir(parents=True)
    loop.write_text(
        'Q = f"SELECT * FROM pairs WHERE {x}"\n'
        'W = "run_id = ? AND iteration = ?"\n'
        'S = "Select the best iteration from dev"\n'
    )
    assert sql_constants(tmp_path) == ["ipr_core/run/loop.py:1", "ipr_core/run/loop.py:2"]
