"""The rooms of the house, checked by reading the imports (every ``import``, at any depth, in functions
too): model/ is pure PyTorch, ingest/ brings data in without the model or Ray, deploy/ never reaches
into the jobs, and ``danmul --help`` does not pay for torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    # transformers is a test dependency (the reference model/bert.py is checked against), never a runtime one
    "model": {"ray", "redis", "boto3", "botocore", "fastapi", "starlette", "prometheus_client", "ingest", "deploy",
              "ray_jobs", "dashboards", "transformers"},
    "ingest": {"model", "ray", "torch", "timm", "transformers", "deploy", "ray_jobs", "dashboards"},
    "deploy": {"ray_jobs", "transformers"},
    "ray_jobs": {"transformers"},
    "dashboards": {"model", "ingest", "deploy", "ray_jobs", "ray", "torch", "transformers"},
}


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_what_their_room_allows(package):
    bad = [f"{path.relative_to(ROOT)}:{line} imports {name}"
           for path in sorted((ROOT / package).rglob("*.py"))
           for line, name in imports(path) if name.split(".")[0] in FORBIDDEN[package]]  # fmt: skip
    assert not bad, "\n".join(bad)


def test_the_walker_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from ray import serve\n    import redis.asyncio\n")
    assert [name for _, name in imports(source)] == ["ray", "redis.asyncio"]


def test_the_command_line_parser_does_not_import_torch():
    code = ("import sys; from ray_jobs.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'timm', 'ray', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
