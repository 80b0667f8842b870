"""Repository rules that keep CI honest and the core host-free."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST_MODULES = {"modules", "backend", "ldm", "sgm", "ldm_patched", "modules_forge", "gradio", "k_diffusion"}


def _readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    commands = [block for block in blocks if "pytest" in block]
    assert commands, "README.md must give the test command"
    return commands[0].strip()  # the first one, at the top: the API tier's come later


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert _readme_test_command() in [line.strip() for line in ci_lines]
    assert "set -euo pipefail" in ci_lines


def test_core_imports_only_torch_and_the_standard_library():
    for path in sorted((ROOT / "seg_lib" / "core").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top not in HOST_MODULES, f"{path.name} imports {name}"
                assert top in {"torch", "seg_lib"} or top in _stdlib(), f"{path.name} imports {name}"


def _stdlib() -> frozenset[str]:
    import sys

    return frozenset(sys.stdlib_module_names) | {"__future__"}


def test_seg_lib_is_the_only_top_level_package():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages <= {"seg_lib", "tests"}
