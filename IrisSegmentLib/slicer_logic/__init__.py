"""The 3D Slicer side of IrisSegment without Qt: scene <-> engine conversion, a worker thread, the panel's logic.

Imports `slicer`, `vtk` and torch, never `qt`, `ctk` or `ScriptedLoadableModule`, so it runs in the
desktop app and in tests on a slicer-core scene alike. The module file imports it only once torch is
installed (the PyTorch extension may install it after Slicer starts).
"""
from .logic import STRATEGIES, IrisSceneLogic, Reference
from .worker import Job

__all__ = ["STRATEGIES", "IrisSceneLogic", "Job", "Reference"]
