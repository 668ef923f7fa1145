"""Torch-free helpers shared by the test modules: where the real data is, and affines to test geometry with.

The real data lives in ../shared/data beside the repository, one nnU-Net-layout folder per dataset
(e.g. DATA / "Hippocampus_MRI"). Tests that need it skip, naming the path they did not find, when it is absent.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

# ../shared/data relative to the repository root.
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _missing_reason(paths: tuple[Path, ...]) -> str | None:
    """The skip reason naming the first of `paths` that does not exist; None when all exist."""
    for path in paths:
        if not path.exists():
            return f"shared test data not found at {path} (expected ../shared/data beside the repository)"
    return None


def needs_paths(*paths: Path) -> pytest.MarkDecorator:
    """Mark: skip the test unless every path (under DATA) exists."""
    reason = _missing_reason(paths)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def require_paths(*paths: Path, module: bool = False) -> None:
    """Skip the running test (or, called at import with module=True, the whole module) unless every path exists."""
    reason = _missing_reason(paths)
    if reason is not None:
        pytest.skip(reason, allow_module_level=module)


def rotation(axis: int, degrees: float) -> np.ndarray:
    """3x3 rotation by `degrees` about voxel axis `axis` (0, 1 or 2)."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i] = r[j, j] = c
    r[i, j], r[j, i] = -s, s
    return r


def make_affine(directions: np.ndarray, spacing, origin) -> np.ndarray:
    """IJK -> RAS affine from direction columns, voxel spacing (a negative one mirrors) and origin."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(directions, dtype=np.float64) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def read_only_folder(root: Path) -> Path | None:
    """A folder in which no file can be created: a new read-only one under `root`, or, as root (who
    writes through permission bits), /sys; None when neither refuses a write."""
    folder = root / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            (candidate / ".probe").touch()
            (candidate / ".probe").unlink()
        except OSError:
            return candidate
    return None
