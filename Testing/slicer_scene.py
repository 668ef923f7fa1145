"""A real MRML scene without the Slicer desktop app (slicer-core), started the way Slicer starts.

Slicer's start-up creates the scene and the application logic, then registers each module's logic on
them: colors (as "Colors", which label maps and segment export look up), volumes, terminologies,
segmentations (its scene hookup registers the segmentation converter rules), subject hierarchy and data
(which removes a node's display and storage nodes with it). `slicer.util` reaches the scene and the
volumes/segmentations logics through `slicer.mrmlScene` and `slicer.modules`, so those are set too.

Use it from a test module with `from slicer_scene import mrml_scene  # noqa: F401` (a fixture), or
`with scene_context() as scene:` from a script.
"""
from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Iterator

import pytest


def _module(logic) -> types.SimpleNamespace:
    return types.SimpleNamespace(logic=lambda: logic)


@contextmanager
def _quiet(vtk) -> Iterator[None]:
    """The app's share folder (color and terminology files) is not part of slicer-core: silence the
    "file not found" errors while the logics attach to the scene and detach; other errors still show."""
    verbosity = vtk.vtkLogger.GetCurrentVerbosityCutoff()
    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
    try:
        yield
    finally:
        vtk.vtkLogger.SetStderrVerbosity(verbosity)


@contextmanager
def scene_context() -> Iterator[object]:
    """A fresh scene installed as `slicer.mrmlScene` (with `slicer.modules`) for the `with` block; for
    scripts (docs/make_screenshot.py) as for the fixture."""
    import slicer
    import vtk

    scene = slicer.vtkMRMLScene()
    application = slicer.vtkSlicerApplicationLogic()
    application.SetMRMLScene(scene)
    logics = {
        "Colors": slicer.vtkSlicerColorLogic(),
        "Volumes": slicer.vtkSlicerVolumesLogic(),
        "Terminologies": slicer.vtkSlicerTerminologiesModuleLogic(),
        "Segmentations": slicer.vtkSlicerSegmentationsModuleLogic(),
        "SubjectHierarchy": slicer.vtkSlicerSubjectHierarchyModuleLogic(),
        "Data": slicer.vtkSlicerDataModuleLogic(),
    }
    with _quiet(vtk):
        for name, logic in logics.items():
            logic.SetMRMLApplicationLogic(application)
            logic.SetMRMLScene(scene)
            application.SetModuleLogic(name, logic)
    saved = {name: getattr(slicer, name, None) for name in ("mrmlScene", "modules")}
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(
        colors=_module(logics["Colors"]),
        volumes=_module(logics["Volumes"]),
        terminologies=_module(logics["Terminologies"]),
        segmentations=_module(logics["Segmentations"]),
        subjecthierarchy=_module(logics["SubjectHierarchy"]),
        data=_module(logics["Data"]),
    )
    try:
        yield scene
    finally:
        for name, value in saved.items():
            setattr(slicer, name, value)
        with _quiet(vtk):
            for logic in logics.values():
                logic.SetMRMLScene(None)
            scene.Clear(True)


@pytest.fixture
def mrml_scene() -> Iterator[object]:
    """A fresh, empty-of-data scene for each test, installed as `slicer.mrmlScene`."""
    pytest.importorskip("slicer", reason="slicer-core (Slicer's Qt-free libraries, the 'test' extra) is not installed")
    with scene_context() as scene:
        yield scene
