"""The Slicer extension build installs every engine file the panel needs.

Slicer gets IrisSegmentLib from the list in IrisSegmentLib/CMakeLists.txt, not from the source tree:
a module the panel imports but the list misses works here and fails in an installed Slicer.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "IrisSegmentLib"


def panel_imports() -> list[str]:
    """The engine modules IrisSegment/IrisSegment.py imports (lazily, inside its functions)."""
    tree = ast.parse((ROOT / "IrisSegment" / "IrisSegment.py").read_text())
    return sorted({node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("IrisSegmentLib")})


def listed_scripts() -> set[str]:
    block = re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", (PACKAGE / "CMakeLists.txt").read_text(), re.S)
    return set(block.group(1).split())


def test_every_engine_module_the_panel_imports_is_installed():
    loaded = subprocess.run(
        [sys.executable, "-c", f"import sys\nfor m in {panel_imports()!r}: __import__(m)\n"
         "print('\\n'.join(m.__file__ for n, m in sys.modules.items() if n.split('.')[0] == 'IrisSegmentLib'))"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    needed = {Path(f).resolve().relative_to(PACKAGE).as_posix() for f in loaded}
    assert "slicer_logic/logic.py" in needed  # the import really ran
    missing = needed - listed_scripts()
    assert not missing, f"add to MODULE_PYTHON_SCRIPTS in IrisSegmentLib/CMakeLists.txt: {sorted(missing)}"
    assert all((PACKAGE / script).is_file() for script in listed_scripts())
