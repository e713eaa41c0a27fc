"""Architecture rules that the folder layout promises, and the API code being reproducible."""

from __future__ import annotations

import ast
import filecmp
import subprocess
import sys
from pathlib import Path

from services.protogen import PROTO_ROOT, generate

REPO = Path(__file__).resolve().parents[2]


def test_regenerating_the_api_code_changes_nothing(tmp_path):
    written = generate(tmp_path)
    committed = PROTO_ROOT / "stillroom" / "v1"
    assert {p.name for p in written} == {p.name for p in committed.glob("*_pb2*.py*")}
    mismatched = [p.name for p in written if not filecmp.cmp(p, committed / p.name, shallow=False)]
    assert mismatched == [], "run `make proto` and commit the result"


def test_importing_services_does_not_import_torch():
    code = (
        "import sys, services.server, services.cli, services.client, services.validation; "
        "bad = [m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_actors_never_import_grpc_and_services_never_import_torch():
    for path in (REPO / "actors").rglob("*.py"):
        assert "grpc" not in _imports(path), path
    for path in (REPO / "services").rglob("*.py"):
        assert not _imports(path) & {"torch", "transformers", "deepspeed", "peft", "trl"}, path
