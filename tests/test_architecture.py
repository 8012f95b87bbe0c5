"""The shape of the package holds: wings stack one way (import-linter's contract in pyproject.toml), no
module imports imgclf from inside a function to dodge a circle, and no module outgrows 300 lines."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "src" / "imgclf"


def test_the_layer_contract_holds():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    result = subprocess.run([lint], capture_output=True, text=True, cwd=PACKAGE.parents[1], timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "1 kept, 0 broken" in result.stdout


def _local_imgclf_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for func in ast.walk(tree):
        if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            for node in ast.walk(func):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("imgclf")):
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_imgclf_inside_a_function_or_grows_past_300_lines(path):
    assert _local_imgclf_imports(path) == []
    assert len(path.read_text(encoding="utf-8").splitlines()) <= 300


def test_at_most_ten_modules_sit_at_the_top_of_the_package():
    assert len(list(PACKAGE.glob("*.py"))) <= 10
