"""IrisSegment: segment any structure shown in example segmentations (Iris, in-context segmentation).

A thin panel over IrisSegmentLib.slicer_logic, which reads the scene into numpy, runs the model on its
own worker thread and changes the scene only when the panel collects the finished job (a QTimer polls
it; Segment or Tune turns into Cancel meanwhile). Nothing heavy is imported here: IrisSegmentLib and
torch are imported once the PyTorch extension provides torch.
"""
import logging
import os
import tempfile
import time
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

TORCH_REQUIREMENT = ">=2.5"  # the engine catches torch.OutOfMemoryError, new in 2.5
STRATEGY_ITEMS = ("one-shot", "ensemble", "retrieval")  # the Strategy combo box items, in order
DEVICE_ITEMS = ("auto", "cuda", "cpu")  # the Device combo box items, in order
POLL_MILLISECONDS = 100


class IrisSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("IrisSegment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["IrisSegment contributors"]
        self.parent.helpText = _(
            "Segment the structures of one or a few example segmentations (references) on a new scan, with no "
            "training: add references, pick the target scan, Segment. Correct the result with the Segment Editor "
            "and Tune to teach the task your corrections; save the task to reuse it on other scans or with the "
            "iris-segment command line. Runs on a CUDA GPU when there is one, else on the CPU (slower)."
        )
        self.parent.acknowledgementText = _(
            "IrisSegment implements the Iris method: Gao et al., 'Show and Segment: Universal Medical Image "
            "Segmentation via In-Context Learning', CVPR 2025. PyTorch is provided by the SlicerPyTorch extension."
        )


@parameterNodeWrapper
class IrisSegmentParameterNode:
    targetVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    allowModalityMismatch: bool = False
    tuneSteps: Annotated[int, WithinRange(1, 1000)] = 10  # the engine's default (TUNING_STEPS in IrisSegmentLib.inference.predictor)
    strategy: str = "one-shot"
    device: str = "auto"
    weights: str = ""  # empty: the bundled model


class IrisSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._rows = []  # per reference row: {"volume", "segmentation", "segments" widgets, "unticked" ids, "task"}
        self._job = None
        self._jobButtonName = ""  # the button that started the job: it is the Cancel button meanwhile
        self._jobButtonText = ""
        self._onJobDone = None
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MILLISECONDS)
        self._timer.timeout.connect(self._collectJob)

    # ------------------------------------------------------------------ set-up and scene life cycle
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/IrisSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = IrisSegmentLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        header = self.ui.referencesTable.horizontalHeader()
        header.setSectionResizeMode(0, qt.QHeaderView.Stretch)
        header.setSectionResizeMode(1, qt.QHeaderView.Stretch)
        self.ui.addReferenceButton.clicked.connect(lambda: self.addReferenceRow())
        self.ui.addTaskFileButton.clicked.connect(self.onAddTaskFile)
        self.ui.removeReferenceButton.clicked.connect(self.onRemoveReferences)
        self.ui.strategyComboBox.currentIndexChanged.connect(lambda i: self._setParameter("strategy", STRATEGY_ITEMS[i]))
        self.ui.deviceComboBox.currentIndexChanged.connect(lambda i: self._setParameter("device", DEVICE_ITEMS[i]))
        self.ui.weightsPathLineEdit.currentPathChanged.connect(lambda path: self._setParameter("weights", path))
        self.ui.segmentButton.clicked.connect(self.onSegment)
        self.ui.tuneButton.clicked.connect(self.onTune)
        self.ui.undoButton.clicked.connect(self.onUndo)
        self.ui.saveTaskButton.clicked.connect(self.onSaveTask)
        self.ui.exportLabelmapButton.clicked.connect(self.onExportLabelmap)
        self.ui.exportFileButton.clicked.connect(self.onExportFile)

        self.addReferenceRow()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._timer.stop()
        self.removeObservers()
        self.logic.shutdown()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:
            self._job.cancel()
        self.setParameterNode(None)
        self.ui.referencesTable.setRowCount(0)
        self._rows = []

    def onSceneEndClose(self, caller, event) -> None:
        self.addReferenceRow()
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
        self._updateGUI()

    def _setParameter(self, name: str, value) -> None:
        if self._parameterNode:
            setattr(self._parameterNode, name, value)

    def _updateGUI(self, caller=None, event=None) -> None:
        """Widgets the wrapper does not bind, and which actions are possible now."""
        node = self._parameterNode
        if node:
            for widget, items, value in (
                (self.ui.strategyComboBox, STRATEGY_ITEMS, node.strategy),
                (self.ui.deviceComboBox, DEVICE_ITEMS, node.device),
            ):
                wasBlocked = widget.blockSignals(True)
                widget.currentIndex = items.index(value) if value in items else 0
                widget.blockSignals(wasBlocked)
            if self.ui.weightsPathLineEdit.currentPath != node.weights:
                wasBlocked = self.ui.weightsPathLineEdit.blockSignals(True)
                self.ui.weightsPathLineEdit.currentPath = node.weights
                self.ui.weightsPathLineEdit.blockSignals(wasBlocked)
        running = self._job is not None
        sceneLogic = self.logic.currentSceneLogic if self.logic else None
        hasOutput = bool(node and node.outputSegmentation)
        self.ui.segmentButton.enabled = bool(node and node.targetVolume and self._rows) and (not running or self._jobButtonName == "segmentButton")
        self.ui.tuneButton.enabled = hasOutput and (not running or self._jobButtonName == "tuneButton")
        self.ui.undoButton.enabled = not running and bool(sceneLogic and sceneLogic.can_undo)
        self.ui.saveTaskButton.enabled = not running and bool(sceneLogic and sceneLogic.task is not None)
        self.ui.exportLabelmapButton.enabled = hasOutput and not running
        self.ui.exportFileButton.enabled = hasOutput and not running
        for widget in (self.ui.referencesCollapsibleButton, self.ui.targetCollapsibleButton, self.ui.modelCollapsibleButton):
            widget.enabled = not running

    # ------------------------------------------------------------------ references
    def addReferenceRow(self, volume=None, segmentation=None) -> None:
        """A row with the reference's scan, its segmentation and a menu to untick segments."""
        table = self.ui.referencesTable
        row = table.rowCount
        table.insertRow(row)
        entry = {"unticked": set(), "task": None}
        for column, (key, nodeType, node) in enumerate((("volume", "vtkMRMLScalarVolumeNode", volume), ("segmentation", "vtkMRMLSegmentationNode", segmentation))):
            selector = slicer.qMRMLNodeComboBox()
            selector.nodeTypes = [nodeType]
            selector.showChildNodeTypes = False
            selector.noneEnabled = True
            selector.addEnabled = False
            selector.removeEnabled = False
            selector.setMRMLScene(slicer.mrmlScene)
            selector.setCurrentNode(node)
            table.setCellWidget(row, column, selector)
            entry[key] = selector
        segmentsButton = qt.QToolButton()
        segmentsButton.popupMode = qt.QToolButton.InstantPopup
        segmentsButton.setMenu(qt.QMenu(segmentsButton))
        table.setCellWidget(row, 2, segmentsButton)
        entry["segments"] = segmentsButton
        entry["segmentation"].currentNodeChanged.connect(lambda node, e=entry: self._resetSegments(e))
        segmentsButton.menu().aboutToShow.connect(lambda e=entry: self._fillSegmentsMenu(e))
        self._rows.append(entry)
        self._resetSegments(entry)
        self._updateGUI()

    def _resetSegments(self, entry: dict) -> None:
        entry["unticked"] = set()
        self._updateSegmentsButton(entry)

    def _segmentIds(self, entry: dict) -> list:
        node = entry["segmentation"].currentNode()
        if node is None:
            return []
        segmentation = node.GetSegmentation()
        return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]

    def _updateSegmentsButton(self, entry: dict) -> None:
        ids = self._segmentIds(entry)
        ticked = [i for i in ids if i not in entry["unticked"]]
        entry["segments"].text = _("All ({count})").format(count=len(ids)) if len(ticked) == len(ids) else _("{ticked} of {count}").format(ticked=len(ticked), count=len(ids))

    def _fillSegmentsMenu(self, entry: dict) -> None:
        menu = entry["segments"].menu()
        menu.clear()
        segmentation = entry["segmentation"].currentNode()
        for segmentId in self._segmentIds(entry):
            action = menu.addAction(segmentation.GetSegmentation().GetSegment(segmentId).GetName())
            action.checkable = True
            action.checked = segmentId not in entry["unticked"]
            action.toggled.connect(lambda checked, e=entry, s=segmentId: self._tickSegment(e, s, checked))
        self._updateSegmentsButton(entry)

    def _tickSegment(self, entry: dict, segmentId: str, checked: bool) -> None:
        if checked:
            entry["unticked"].discard(segmentId)
        else:
            entry["unticked"].add(segmentId)
        self._updateSegmentsButton(entry)

    def onAddTaskFile(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Add task file"), "", _("IrisSegment task (*.safetensors)"))
        sceneLogic = self.logic.sceneLogic() if path else None
        if sceneLogic is None:
            return
        from IrisSegmentLib.errors import IrisError

        try:
            task = sceneLogic.load_task(path)
        except IrisError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        table = self.ui.referencesTable
        row = table.rowCount
        table.insertRow(row)
        table.setCellWidget(row, 0, qt.QLabel(_("Task file")))
        table.setCellWidget(row, 1, qt.QLabel(os.path.basename(path)))
        table.setCellWidget(row, 2, qt.QLabel(", ".join(task.class_names)))
        self._rows.append({"task": task})
        self._updateGUI()

    def onRemoveReferences(self) -> None:
        """Remove the selected rows (select them by their row number), or the last row."""
        rows = sorted({index.row() for index in self.ui.referencesTable.selectionModel().selectedRows()}, reverse=True)
        for row in rows or [self.ui.referencesTable.rowCount - 1]:
            if row >= 0:
                self.ui.referencesTable.removeRow(row)
                del self._rows[row]
        self._updateGUI()

    def _sources(self) -> list:
        from IrisSegmentLib.slicer_logic import Reference

        sources = []
        for entry in self._rows:
            if entry["task"] is not None:
                sources.append(entry["task"])
                continue
            ids = [i for i in self._segmentIds(entry) if i not in entry["unticked"]] if entry["unticked"] else None
            sources.append(Reference(entry["volume"].currentNode(), entry["segmentation"].currentNode(), ids))
        return sources

    # ------------------------------------------------------------------ jobs
    def onSegment(self) -> None:
        self._cancelOrStart(
            lambda sceneLogic, node: sceneLogic.start_segment(
                node.targetVolume, self._sources(), node.strategy, node.outputSegmentation, node.allowModalityMismatch
            ),
            "segmentButton",
        )

    def onTune(self) -> None:
        self._cancelOrStart(
            lambda sceneLogic, node: sceneLogic.start_tune(
                node.targetVolume, node.outputSegmentation, node.tuneSteps, node.allowModalityMismatch
            ),
            "tuneButton",
            self._onTuned,
        )

    def _cancelOrStart(self, startJob, buttonName: str, onDone=None) -> None:
        """The Segment and Tune buttons: Cancel while a job runs; otherwise start the job that
        startJob(sceneLogic, parameterNode) returns (the panel's model settings applied first)."""
        if self._job is not None:
            self._job.cancel()
            return
        sceneLogic = self._readySceneLogic()
        if sceneLogic is None:
            return
        node = self._parameterNode
        self._start(lambda: startJob(sceneLogic, node), buttonName, onDone or self._onSegmented)

    def _readySceneLogic(self):
        """The logic with the panel's model settings applied; None when PyTorch is not available."""
        sceneLogic = self.logic.sceneLogic()
        if sceneLogic is not None:
            sceneLogic.set_model(self._parameterNode.weights or None, self._parameterNode.device)
        return sceneLogic

    def _start(self, startJob, buttonName: str, onDone) -> None:
        from IrisSegmentLib.errors import IrisError

        try:
            job = startJob()
        except IrisError as exc:  # bad input found before any work: nothing changed
            slicer.util.errorDisplay(str(exc))
            return
        button = getattr(self.ui, buttonName)
        self._job, self._jobButtonName, self._jobButtonText, self._onJobDone = job, buttonName, button.text, onDone
        button.text = _("Cancel")
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = job.title + "..."
        self._updateGUI()
        self._timer.start()

    def _collectJob(self) -> None:
        """Called by the QTimer: show progress; once the job has ended, apply or report it."""
        from IrisSegmentLib.errors import Cancelled, IrisError

        for fraction, message in self._job.progress():
            self.ui.progressBar.value = round(100 * fraction)
            self.ui.statusLabel.text = message
        if not self._job.poll():
            return
        self._timer.stop()
        job, self._job = self._job, None
        getattr(self.ui, self._jobButtonName).text = self._jobButtonText
        try:
            outcome = job.result()
        except Cancelled:
            self.ui.statusLabel.text = _("Cancelled: nothing was changed.")
        except IrisError as exc:
            self.ui.statusLabel.text = _("Failed: nothing was changed.")
            slicer.util.errorDisplay(str(exc))
        except Exception as exc:
            logging.exception("IrisSegment: %s failed", job.title)
            self.ui.statusLabel.text = _("Failed: nothing was changed.")
            slicer.util.errorDisplay(_("Unexpected error: {error}. Details are in the Python console.").format(error=exc))
        else:
            self._onJobDone(outcome)
        finally:
            self._showDevice()
            self._updateGUI()

    def _onSegmented(self, output) -> None:
        self._parameterNode.outputSegmentation = output  # the next run replaces it (Undo brings it back)
        slicer.util.setSliceViewerLayers(background=self._parameterNode.targetVolume)
        self.ui.statusLabel.text = _("Done: {count} segments in '{name}'.").format(count=output.GetSegmentation().GetNumberOfSegments(), name=output.GetName())
        task = self.logic.currentSceneLogic.task
        note = task.calibration_note() if task is not None else ""
        if note:
            self.ui.statusLabel.text += " " + _("Class settings: {note}.").format(note=note)

    def _onTuned(self, output) -> None:
        self._onSegmented(output)
        sceneLogic = self.logic.currentSceneLogic
        if sceneLogic.untuned:
            self.ui.statusLabel.text += " " + _("Kept untuned, as tuning made them (or a neighbour) worse on the references: {names}.").format(names=", ".join(sceneLogic.untuned))
        if sceneLogic.tuned_uncalibrated:
            self.ui.statusLabel.text += " " + _(
                "No reference of this task is in the scene, so your corrections joined it uncalibrated and unchecked (worse on validation cases): "
                "load a reference and segment with it before tuning."
            )
        elif sceneLogic.tuned_unchecked:
            self.ui.statusLabel.text += " " + _(
                "No reference of this task is in the scene, so the tuned classes were not checked against one: "
                "load a reference and segment with it before tuning."
            )

    def _showDevice(self) -> None:
        sceneLogic = self.logic.currentSceneLogic
        description = sceneLogic.device_description if sceneLogic else ""
        if not description:
            return
        if sceneLogic.on_cpu:
            self.ui.deviceStatusLabel.text = _("Running on {device}. Segmenting and tuning are much slower than on a CUDA GPU.").format(device=description)
            self.ui.deviceStatusLabel.styleSheet = "color: #d07000"
        else:
            self.ui.deviceStatusLabel.text = _("Running on {device}.").format(device=description)
            self.ui.deviceStatusLabel.styleSheet = ""

    # ------------------------------------------------------------------ undo, task files, export
    def _runAction(self, action) -> None:
        """Quick main-thread actions: errors a user can act on are shown as they are."""
        from IrisSegmentLib.errors import IrisError

        try:
            message = action()
        except IrisError as exc:
            slicer.util.errorDisplay(str(exc))
        else:
            if message:
                self.ui.statusLabel.text = message
        self._updateGUI()

    def onUndo(self) -> None:
        sceneLogic = self.logic.currentSceneLogic
        self._runAction(lambda: _("Restored '{name}'.").format(name=sceneLogic.undo().GetName()))

    def onSaveTask(self) -> None:
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), _("Save task"), "task.safetensors", _("IrisSegment task (*.safetensors)"))
        if not path:
            return
        if not path.lower().endswith(".safetensors"):
            path += ".safetensors"
        sceneLogic = self.logic.currentSceneLogic
        self._runAction(lambda: _("Saved the task to {path}.").format(path=sceneLogic.save_task(path)))

    def onExportLabelmap(self) -> None:
        sceneLogic = self._readySceneLogic()
        if sceneLogic is not None:
            node = self._parameterNode
            self._runAction(lambda: _("Created label map '{name}'.").format(name=sceneLogic.export_labelmap(node.outputSegmentation, node.targetVolume).GetName()))

    def onExportFile(self) -> None:
        path = qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(), _("Export segmentation"), "", _("Slicer segmentation (*.seg.nrrd);;NIfTI label map (*.nii.gz);;NRRD label map (*.nrrd)")
        )
        sceneLogic = self._readySceneLogic() if path else None
        if sceneLogic is not None:
            node = self._parameterNode
            self._runAction(lambda: _("Wrote {files}.").format(files=", ".join(str(p) for p in sceneLogic.export_file(node.outputSegmentation, path, node.targetVolume))))


class IrisSegmentLogic(ScriptedLoadableModuleLogic):
    """Slicer-side glue: PyTorch on demand (with the user's consent), then the Qt-free scene logic."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._sceneLogic = None

    def getParameterNode(self):
        return IrisSegmentParameterNode(super().getParameterNode())

    def sceneLogic(self):
        """IrisSegmentLib's IrisSceneLogic, installing PyTorch first if the user agrees; None without PyTorch."""
        if self._sceneLogic is None and self._torchReady():
            from IrisSegmentLib.slicer_logic import IrisSceneLogic

            self._sceneLogic = IrisSceneLogic()
        return self._sceneLogic

    @property
    def currentSceneLogic(self):
        """The scene logic if something already needed it (never imports torch)."""
        return self._sceneLogic

    def shutdown(self) -> None:
        if self._sceneLogic is not None:
            self._sceneLogic.shutdown()

    @staticmethod
    def _torchReady() -> bool:
        """torch through the PyTorch extension only: it picks the CUDA build that matches the driver."""
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            slicer.util.errorDisplay(_("IrisSegment needs the PyTorch extension: install 'PyTorch' in the Extensions Manager, then restart Slicer."))
            return False
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            question = _(
                "IrisSegment needs PyTorch, which is not installed. Download and install it now? "
                "This takes a few minutes and 1-3 GB; the build matching your GPU driver is chosen automatically."
            )
            if not (slicer.app.testingEnabled() or slicer.util.confirmOkCancelDisplay(question)):
                return False
            with slicer.util.tryWithErrorDisplay(_("PyTorch could not be installed."), waitCursor=True):
                if torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT) is None:
                    return False
            if not torchLogic.torchInstalled():
                return False
        import torch
        from packaging.version import Version

        if Version(torch.__version__.split("+")[0]) < Version(TORCH_REQUIREMENT.lstrip(">=")):
            slicer.util.errorDisplay(
                _("PyTorch {version} is too old for IrisSegment (needs {requirement}): update it in the PyTorch Utils module "
                  "(Uninstall, restart Slicer, Install).").format(version=torch.__version__, requirement=TORCH_REQUIREMENT)
            )
            return False
        return True


class IrisSegmentTest(ScriptedLoadableModuleTest):
    """The clinician's loop inside Slicer on sample data: segment, correct, tune, undo, save task, export."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_IrisSegmentLoop()

    def _downsampled(self, volume, name: str, offset: tuple):
        """Every 4th voxel from `offset` (i, j, k): a small scan on its own grid, for a quick test."""
        import numpy as np

        i, j, k = offset
        voxels = slicer.util.arrayFromVolume(volume)[k::4, j::4, i::4].copy()
        matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrix)
        shift = np.eye(4)
        shift[:3, 3] = offset
        return slicer.util.addVolumeFromArray(voxels, slicer.util.arrayFromVTKMatrix(matrix) @ shift @ np.diag([4.0, 4.0, 4.0, 1.0]), name)

    @staticmethod
    def _wait(job):
        while not job.poll():
            slicer.app.processEvents()
            time.sleep(0.05)
        return job.result()

    @staticmethod
    def _masks(node, geometry) -> dict:
        segmentation = node.GetSegmentation()
        return {
            segmentation.GetSegment(s).GetName(): slicer.util.arrayFromSegmentBinaryLabelmap(node, s, geometry) > 0
            for s in (segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments()))
        }

    def test_IrisSegmentLoop(self) -> None:
        import numpy as np
        import SampleData

        self.delayDisplay("Preparing sample data")
        sceneLogic = IrisSegmentLogic().sceneLogic()
        self.assertIsNotNone(sceneLogic, "PyTorch is not available")
        from IrisSegmentLib.model.weights import default_weights_path
        from IrisSegmentLib.slicer_logic import Reference

        if not default_weights_path().is_file():
            # A development build without the bundled model: a small random one still exercises the loop.
            from IrisSegmentLib.inference.predictor import IrisPredictor
            from IrisSegmentLib.model.config import IrisConfig
            from IrisSegmentLib.model.iris import IrisModel

            logging.warning("IrisSegment test: no bundled weights at %s; using a random model", default_weights_path())
            sceneLogic.predictor = IrisPredictor(IrisModel(IrisConfig(channels=(8, 16, 32, 64), token_dim=32, context_tokens=4, working_size=64)))
        chest = SampleData.downloadSample("CTChest")
        reference = self._downsampled(chest, "reference", (0, 0, 0))
        target = self._downsampled(chest, "target", (2, 2, 1))
        voxels = slicer.util.arrayFromVolume(reference)
        bone = voxels > 200
        body = (voxels > -500) & ~bone
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reference segmentation")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        for name, color, mask in (("Bone", (0.95, 0.9, 0.75), bone), ("Body", (0.8, 0.6, 0.5), body)):
            segmentId = segmentation.GetSegmentation().AddEmptySegment("", name, color)
            slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), segmentation, segmentId, reference)
        referenceMasks = self._masks(segmentation, reference)

        self.delayDisplay("Segmenting")
        output = self._wait(sceneLogic.start_segment(target, [Reference(reference, segmentation)]))
        segments = [output.GetSegmentation().GetNthSegment(i) for i in range(2)]
        self.assertEqual([s.GetName() for s in segments], ["Bone", "Body"])
        self.assertEqual([tuple(round(c, 3) for c in s.GetColor()) for s in segments], [(0.95, 0.9, 0.75), (0.8, 0.6, 0.5)])
        result = self._masks(output, target)
        self.assertEqual(result["Body"].shape, slicer.util.arrayFromVolume(target).shape)
        unchanged = self._masks(segmentation, reference)
        self.assertTrue(all(np.array_equal(referenceMasks[k], unchanged[k]) for k in referenceMasks))

        self.delayDisplay("Correcting and tuning")
        targetVoxels = slicer.util.arrayFromVolume(target)
        bodyId = output.GetSegmentation().GetSegmentIdBySegmentName("Body")
        corrected = (targetVoxels > -500) & ~result["Bone"]
        slicer.util.updateSegmentBinaryLabelmapFromArray(corrected.astype(np.uint8), output, bodyId, target)
        self._wait(sceneLogic.start_tune(target, output, steps=5))
        self.assertTrue(sceneLogic.can_undo)
        sceneLogic.undo()
        self.assertTrue(np.array_equal(self._masks(output, target)["Body"], corrected))

        self.delayDisplay("Saving and reusing the task")
        with tempfile.TemporaryDirectory() as folder:
            taskPath = sceneLogic.save_task(os.path.join(folder, "task.safetensors"))
            again = self._wait(sceneLogic.start_segment(target, [sceneLogic.load_task(taskPath)]))
            self.assertEqual(again.GetSegmentation().GetNumberOfSegments(), 2)

            self.delayDisplay("Exporting")
            labelmap = sceneLogic.export_labelmap(output, target)
            self.assertEqual(slicer.util.arrayFromVolume(labelmap).shape, targetVoxels.shape)
            segPath = sceneLogic.export_file(output, os.path.join(folder, "result.seg.nrrd"), target)[0]
            reloaded = slicer.util.loadSegmentation(str(segPath))
            expected = self._masks(output, target)
            self.assertTrue(all(np.array_equal(m, expected[name]) for name, m in self._masks(reloaded, target).items()))
        self.delayDisplay("Test passed")
