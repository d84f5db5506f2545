"""Imports between the reference ops and their fused twins run one way (issue 14)."""

import ast
from pathlib import Path

from ssiu.ops import backend

OPS = Path(backend.__file__).parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_reference_ops_never_import_their_fused_twins():
    twins = set(backend.FUSED_MODULES.values())
    for op in ("layer_norm", "msgm", "esam", "moe", "tail"):
        assert not _imports(OPS / f"{op}.py") & twins, op


def test_fused_finds_each_twin():
    for op, module in backend.FUSED_MODULES.items():
        assert backend.fused(op).__name__ == module
