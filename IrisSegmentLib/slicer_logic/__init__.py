"""The 3D Slicer side of IrisSegment without Qt: scene <-> engine conversion, a worker thread, the panel's logic.

Imports `slicer`, `vtk` and torch, never `qt`, `ctk` or `ScriptedLoadableModule`, so it runs in the
desktop app and in tests on a slicer-core scene alike. The module file imports the torch-using part
(`logic`) only once torch is installed (the PyTorch extension may install it after Slicer starts);
`scene_bridge`, `sample_data`, `worker` and `dialogs` (the panel's error messages and PyTorch
install) import no torch at import time, so exporting a result or loading the sample data never asks for
PyTorch. The names below load `logic` on first use.
"""
from __future__ import annotations

__all__ = ["STRATEGIES", "IrisSceneLogic", "Job", "Reference"]


def __getattr__(name: str):
    if name in ("STRATEGIES", "IrisSceneLogic", "Reference"):
        from . import logic

        return getattr(logic, name)
    if name == "Job":
        from .worker import Job

        return Job
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
