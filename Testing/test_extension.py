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


def panel_imports() -> list[tuple[str, list[str]]]:
    """(module, names) of each `from IrisSegmentLib... import names` in IrisSegment/IrisSegment.py (lazy,
    inside its functions). The names count: IrisSegmentLib.slicer_logic loads its logic on first use."""
    tree = ast.parse((ROOT / "IrisSegment" / "IrisSegment.py").read_text())
    found: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("IrisSegmentLib"):
            found.setdefault(node.module, set()).update(alias.name for alias in node.names)
    return sorted((module, sorted(names)) for module, names in found.items())


def listed_scripts() -> set[str]:
    block = re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", (PACKAGE / "CMakeLists.txt").read_text(), re.S)
    return set(block.group(1).split())


def test_every_engine_module_the_panel_imports_is_installed():
    loaded = subprocess.run(
        [sys.executable, "-c", "import importlib, sys\n"
         f"for module, names in {panel_imports()!r}:\n"
         "    loaded = importlib.import_module(module)\n"
         "    for name in names:\n"
         "        getattr(loaded, name, None) or importlib.import_module(module + '.' + name)\n"
         "print('\\n'.join(m.__file__ for n, m in sys.modules.items() if n.split('.')[0] == 'IrisSegmentLib'))"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    needed = {Path(f).resolve().relative_to(PACKAGE).as_posix() for f in loaded}
    assert "slicer_logic/logic.py" in needed  # the import really ran
    missing = needed - listed_scripts()
    assert not missing, f"add to MODULE_PYTHON_SCRIPTS in IrisSegmentLib/CMakeLists.txt: {sorted(missing)}"
    assert all((PACKAGE / script).is_file() for script in listed_scripts())


def test_the_sample_data_the_module_registers_is_installed():
    """The module registers Resources/SampleData with Sample Data and its self-test runs on it: the build
    must install every file sample_data.py reads, where sample_folder() looks for them."""
    tree = ast.parse((PACKAGE / "slicer_logic" / "sample_data.py").read_text())
    constants = {
        target.id: ast.literal_eval(node.value)
        for node in tree.body if isinstance(node, ast.Assign)
        for target in node.targets if isinstance(target, ast.Name) and target.id in ("FILES", "REFERENCE_COLORS", "TARGET_TRUTH")
    }
    used = {name for name, _, _ in constants["FILES"]} | {constants["REFERENCE_COLORS"], *constants["TARGET_TRUTH"]}
    block = re.search(r"set\(_sample_files(.*?)\)", (PACKAGE / "CMakeLists.txt").read_text(), re.S)
    installed = set(block.group(1).split())
    assert used <= installed, f"add to _sample_files in IrisSegmentLib/CMakeLists.txt: {sorted(used - installed)}"
    assert all((ROOT / "Resources" / "SampleData" / name).is_file() for name in installed)


def test_catalog_entry_contributors_help_link_and_screenshot():
    """What the Extensions Index checks: contributors as "Name (Affiliation)", a screenshot that exists
    where EXTENSION_SCREENSHOTURLS points, and a documentation link in the module's help text that
    leads to the README's section on the module."""
    cmake = (ROOT / "CMakeLists.txt").read_text()
    contributors = re.search(r'set\(EXTENSION_CONTRIBUTORS "(.*?)"\)', cmake).group(1)
    assert all(re.fullmatch(r"[^()]+ \([^()]+\)", person.strip()) for person in contributors.split(",")), contributors
    screenshot = re.search(r'set\(EXTENSION_SCREENSHOTURLS "https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/(.*?)"\)', cmake).group(1)
    assert (ROOT / screenshot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    module = (ROOT / "IrisSegment" / "IrisSegment.py").read_text()
    assert re.search(r'self\.parent\.contributors = \["[^()"]+ \([^()"]+\)"\]', module)
    url = re.search(r'DOCUMENTATION_URL = "(https://[^"#]+)#([^"]+)"', module)
    assert url and "DOCUMENTATION_URL" in module[module.index("self.parent.helpText"):]
    headings = [line.lstrip("#").strip() for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("## ")]
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}
    assert url.group(2) in anchors, f"the help text links #{url.group(2)}, which no README section is"


def test_every_widget_the_panel_uses_is_in_its_ui_file():
    """`self.ui.<name>` comes from childWidgetVariables of the .ui file: a name missing there fails only
    inside Slicer, when the panel opens."""
    module = (ROOT / "IrisSegment" / "IrisSegment.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", module))
    ui = (ROOT / "IrisSegment" / "Resources" / "UI" / "IrisSegment.ui").read_text()
    declared = set(re.findall(r'<widget class="\w+" name="(\w+)"', ui))
    assert "segmentEditorButton" in used
    assert used <= declared, f"not in IrisSegment.ui: {sorted(used - declared)}"
