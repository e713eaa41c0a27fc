"""Architecture rules that the folder layout promises, and the API code being reproducible."""

from __future__ import annotations

import ast
import filecmp
import subprocess
import sys
from pathlib import Path

from stillroom.services.protogen import PROTO_ROOT, generate

REPO = Path(__file__).resolve().parents[2]


def test_regenerating_the_api_code_changes_nothing(tmp_path):
    written = generate(tmp_path)
    committed = PROTO_ROOT / "stillroom" / "v1"
    assert {p.name for p in written} == {p.name for p in committed.glob("*_pb2*.py*")}
    mismatched = [p.name for p in written if not filecmp.cmp(p, committed / p.name, shallow=False)]
    assert mismatched == [], "run `make proto` and commit the result"


def _imported_by(modules: str) -> list[str]:
    """The heavy packages that importing `modules` (comma-separated) pulls in, in a fresh process."""
    code = (
        f"import sys, {modules}; "
        "print(','.join(m for m in ('torch', 'transformers', 'deepspeed', 'peft', 'grpc', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True, text=True)
    return [m for m in out.stdout.strip().split(",") if m]


def test_the_shared_package_imports_neither_torch_nor_grpc_nor_ray():
    modules = ", ".join(
        f"stillroom.actors.common.{p.stem}" for p in (REPO / "actors" / "common").glob("*.py") if p.stem != "__init__"
    )
    assert _imported_by(modules) == []


def test_everything_installs_under_the_stillroom_namespace():
    import stillroom.actors.runtime.loop
    import stillroom.services.server

    assert Path(stillroom.services.server.__file__).resolve() == REPO / "services" / "server.py"
    assert Path(stillroom.actors.runtime.loop.__file__).resolve() == REPO / "actors" / "runtime" / "loop.py"


def _defs(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _source_files():
    for folder in ("actors", "services", "bench", "examples"):
        for path in (REPO / folder).rglob("*.py"):
            if "_pb2" not in path.name:
                yield path


def test_no_function_over_60_lines_and_no_file_over_400():
    long_functions = [
        f"{p.relative_to(REPO)}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)"
        for p in _source_files()
        for f in _defs(p)
        if f.end_lineno - f.lineno + 1 > 60
    ]
    assert long_functions == []
    long_files = [str(p.relative_to(REPO)) for p in _source_files() if len(p.read_text().splitlines()) > 400]
    assert long_files == []


def test_importing_services_does_not_import_torch():
    code = (
        "import sys, stillroom.services.server, stillroom.services.cli, stillroom.services.client; "
        "import stillroom.services.validation; "
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
