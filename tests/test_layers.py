"""The import rule of docs/architecture.md, read from the source: data flows one way."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kvforge"

# room -> rooms it may import (besides itself)
ALLOWED = {
    "config": set(),
    "types": set(),
    "metrics": set(),
    "ops": {"config", "types", "metrics"},
    "cache": {"config", "types", "metrics", "ops"},
    "model": {"config", "types", "metrics", "ops"},
    "engine": {"config", "types", "metrics", "ops", "cache", "model"},
    "server": {"config", "types", "metrics", "engine"},
    "cli": {"config", "types", "metrics", "engine", "server"},
    "__init__": {"config", "types", "engine"},
}


def _room(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_rooms(path: Path) -> set[str]:
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        rooms |= {n.split(".")[1] for n in names if n.startswith("kvforge.")}
    return rooms


def test_every_room_imports_only_the_rooms_below_it():
    bad = []
    for path in PACKAGE.rglob("*.py"):
        room = _room(path)
        extra = _imported_rooms(path) - ALLOWED[room] - {room}
        if extra:
            bad.append(f"{path.relative_to(PACKAGE)} imports {sorted(extra)}")
    assert not bad, bad
