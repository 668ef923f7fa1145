"""IrisSegment: segment any structure shown in example segmentations (Iris, in-context segmentation).

A thin panel over IrisSegmentLib.slicer_logic, which reads the scene into numpy, runs the model on its
own worker thread and changes the scene only when the panel collects the finished job (a QTimer ticks;
Segment or Tune turns into Cancel meanwhile). Slicer's main thread keeps Python's lock while it sits in
the Qt event loop, so each tick waits on the job for most of its time (Job.tick), letting the worker
run. Nothing heavy is imported here: IrisSegmentLib's torch-using logic and torch are imported once the
PyTorch extension provides torch; exporting and the sample data need neither.

Every user action ends in a status line or a message box, never in a bare traceback: errors the user can
act on (IrisError) are shown as they are, anything else as a failure with the details logged. How errors
and the PyTorch install become messages lives in IrisSegmentLib.slicer_logic.dialogs, which tests run
without Qt.
"""
import logging
import os
import tempfile
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

# torch 2.2 is the last release for Intel Macs, which is what Slicer 5.8 and 5.10 are on macOS; the
# engine takes its out-of-memory error from whatever torch has (torch.OutOfMemoryError is new in 2.5).
TORCH_REQUIREMENT = ">=2.2"
STRATEGY_ITEMS = ("one-shot", "ensemble", "retrieval")  # the Strategy combo box items, in order
DEVICE_ITEMS = ("auto", "cuda", "cpu")  # the Device combo box items, in order
DOCUMENTATION_URL = "https://github.com/IrisSegment/IrisSegment#the-3d-slicer-module"


class IrisSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("IrisSegment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["IrisSegment developers (IrisSegment project)"]
        self.parent.helpText = _(
            "Segment the structures of one or a few example segmentations (references) on a new scan, with no "
            "training: add references, pick the target scan, Segment. Correct the result with the Segment Editor "
            "and Tune to teach the task your corrections; save the task to reuse it on other scans or with the "
            "iris-segment command line. Runs on a CUDA GPU when there is one, else on the CPU (slower). "
            "Sample data: 'Hippocampus MRI pair' in the Sample Data module."
        ) + "<p>" + _('Documentation and tutorial: <a href="{url}">{url}</a>').format(url=DOCUMENTATION_URL) + "</p>"
        self.parent.acknowledgementText = _(
            "IrisSegment implements the Iris method: Gao et al., 'Show and Segment: Universal Medical Image "
            "Segmentation via In-Context Learning', CVPR 2025. PyTorch is provided by the SlicerPyTorch extension. "
            "Sample data: Medical Segmentation Decathlon, Task04 Hippocampus (CC-BY-SA 4.0)."
        )
        # Sample Data lists the bundled pair once Slicer has started (the module may not be loaded before).
        slicer.app.connect("startupCompleted()", registerSampleData)


def _iconPath() -> str:
    return os.path.join(os.path.dirname(__file__), "Resources", "Icons", "IrisSegment.png")


def registerSampleData() -> None:
    """The bundled hippocampus pair in the Sample Data module: local files, nothing downloaded. Its button
    loads the reference labels as a segmentation named by their color table."""
    try:
        import SampleData
        from IrisSegmentLib.slicer_logic import sample_data

        source = sample_data.sample_data_source(thumbnail=_iconPath())
    except Exception:  # noqa: BLE001 - never let sample data stop Slicer from starting
        logging.exception("IrisSegment: could not register the sample data")
        return
    SampleData.SampleDataLogic.registerCustomSampleDataSource(**source, customDownloader=downloadSampleData)


def downloadSampleData(source):
    """Sample Data's customDownloader for the pair (a named function: registering again finds it registered)."""
    return loadSampleData()


def loadSampleData():
    """Load the bundled pair (the Sample Data button and the self-test) and show the target."""
    from IrisSegmentLib.errors import IrisError
    from IrisSegmentLib.slicer_logic import sample_data

    try:
        sample = sample_data.load_sample()
    except IrisError as exc:
        slicer.util.errorDisplay(str(exc))
        return None
    slicer.util.setSliceViewerLayers(background=sample.target, fit=True)
    return sample


def saveSegmentEditorUndoState(node) -> None:
    """IrisSceneLogic.before_change: when the Segment Editor shows `node`, save its undo state first, so
    its Undo brings back what IrisSegment is about to replace (and IrisSegment's Undo keeps editor edits
    recoverable the same way)."""
    try:
        editorModuleWidget = getattr(slicer.modules, "SegmentEditorWidget", None)
        editor = getattr(editorModuleWidget, "editor", None)
        shown = editor.segmentationNode() if editor is not None else None
        if shown is not None and shown.GetID() == node.GetID():
            editor.saveStateForUndo()
    except Exception:  # noqa: BLE001 - the editor's undo must never stop IrisSegment's own write
        logging.exception("IrisSegment: could not save the Segment Editor's undo state")


@parameterNodeWrapper
class IrisSegmentParameterNode:
    targetVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    allowModalityMismatch: bool = False
    tuneSteps: Annotated[int, WithinRange(1, 1000)] = 10  # the engine's default (TUNING_STEPS in IrisSegmentLib.inference.predictor)
    fitSteps: Annotated[int, WithinRange(0, 1000)] = 40  # fitting poorly followed classes to their reference before use (0: off)
    matching: bool = True  # reference matching (IrisSegmentLib.inference.matching); off: the network alone
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
        from IrisSegmentLib.slicer_logic.worker import POLL_SECONDS  # no torch: each tick waits on the job for most of it (Job.tick)

        self._timer.setInterval(round(1000 * POLL_SECONDS))
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
        self.ui.segmentEditorButton.clicked.connect(self.onEditInSegmentEditor)
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
            self._job.cancel()  # collected as cancelled: it changes nothing
        self.setParameterNode(None)
        self.ui.referencesTable.setRowCount(0)
        self._rows = []

    def onSceneEndClose(self, caller, event) -> None:
        """A new scene: forget the task, the Tune history (keyed by node IDs the new scene reuses) and Undo."""
        self.logic.reset()
        self.ui.statusLabel.text = ""
        self.ui.progressBar.value = 0
        self.addReferenceRow()
        if self.parent.isEntered:
            self.initializeParameterNode()
        self._updateGUI()

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
        self.ui.segmentEditorButton.enabled = hasOutput
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
        sceneLogic = self._guarded(self.logic.sceneLogic, _("Add task file")) if path else None
        if sceneLogic is None:
            return
        task = self._guarded(lambda: sceneLogic.load_task(path), _("Add task file"))
        if task is None:
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
                node.targetVolume, self._sources(), node.strategy, node.outputSegmentation, node.allowModalityMismatch, node.fitSteps, node.matching
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
        what = getattr(self.ui, buttonName).text
        sceneLogic = self._guarded(self._readySceneLogic, what)
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
        job = self._guarded(startJob, getattr(self.ui, buttonName).text)  # bad input is found before any work: nothing changed
        if job is None:
            return
        button = getattr(self.ui, buttonName)
        self._job, self._jobButtonName, self._jobButtonText, self._onJobDone = job, buttonName, button.text, onDone
        button.text = _("Cancel")
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = job.title + "..."
        self._updateGUI()
        self._timer.start()

    def _collectJob(self) -> None:
        """Called by the QTimer: wait on the job for most of the tick (Slicer's event loop holds Python's
        lock, so the worker only runs while Python waits here), show progress; once the job has ended,
        apply or report it."""
        from IrisSegmentLib.slicer_logic.dialogs import finished_job

        updates, ended = self._job.tick()  # the job's own errors come out of result() below
        for fraction, message in updates:
            self.ui.progressBar.value = round(100 * fraction)
            self.ui.statusLabel.text = message
        if not ended:
            return
        self._timer.stop()
        job, self._job = self._job, None
        getattr(self.ui, self._jobButtonName).text = self._jobButtonText
        try:
            status, outcome = finished_job(job.result, job.title, slicer.util.errorDisplay)
            if status == "cancelled":
                self.ui.statusLabel.text = _("Cancelled: nothing was changed.")
            elif status == "failed":
                self.ui.statusLabel.text = _("Failed: nothing was changed.")
            elif self._guarded(lambda: self._onJobDone(outcome) or True, job.title) is None:
                self.ui.statusLabel.text = _("{title} finished, but showing its result failed; see the Python console.").format(title=job.title)
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
        matched = task.matching_note() if task is not None else ""
        if matched:
            self.ui.statusLabel.text += " " + _("Segments {note}.").format(note=matched)

    def _onTuned(self, output) -> None:
        self._onSegmented(output)
        sceneLogic = self.logic.currentSceneLogic
        if sceneLogic.untuned:
            self.ui.statusLabel.text += " " + _("Kept untuned, as tuning made them (or a neighbour) worse on the references: {names}.").format(names=", ".join(sceneLogic.untuned))
        if sceneLogic.kept_segments:
            self.ui.statusLabel.text += " " + _("Kept as they were (not classes of the task, so not tuned): {names}.").format(names=", ".join(sceneLogic.kept_segments))
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
    @staticmethod
    def _guarded(action, what: str):
        """Run `action`; every error ends in a message box, never a bare traceback (IrisError as it is,
        anything else with the details in the Python console). Returns the action's value, or None."""
        from IrisSegmentLib.slicer_logic.dialogs import guarded

        return guarded(action, what, slicer.util.errorDisplay)

    def _runAction(self, action, what: str) -> None:
        """Quick main-thread actions: the status line says what was done, or a message box why not."""
        message = self._guarded(action, what)
        if message:
            self.ui.statusLabel.text = message
        self._updateGUI()

    def onUndo(self) -> None:
        sceneLogic = self.logic.currentSceneLogic
        if sceneLogic is not None:
            self._runAction(lambda: _("Restored '{name}'.").format(name=sceneLogic.undo().GetName()), _("Undo"))

    def _defaultFolder(self) -> str:
        """A folder the file dialogs start in: Slicer's default scene folder (never a relative path)."""
        folder = getattr(slicer.app, "defaultScenePath", "") or os.path.expanduser("~")
        return folder if os.path.isdir(folder) else os.path.expanduser("~")

    def onSaveTask(self) -> None:
        path = qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(), _("Save task"), os.path.join(self._defaultFolder(), "task.safetensors"), _("IrisSegment task (*.safetensors)")
        )
        if not path:
            return
        if not path.lower().endswith(".safetensors"):
            path += ".safetensors"
        sceneLogic = self.logic.currentSceneLogic
        if sceneLogic is not None:
            self._runAction(lambda: _("Saved the task to {path}.").format(path=sceneLogic.save_task(os.path.abspath(path))), _("Save task"))

    # Exports read the segmentation only: no model, no torch (so never the PyTorch install prompt).
    def onExportLabelmap(self) -> None:
        from IrisSegmentLib.slicer_logic import scene_bridge

        node = self._parameterNode
        self._runAction(
            lambda: _("Created label map '{name}'.").format(name=scene_bridge.export_labelmap(node.outputSegmentation, node.targetVolume).GetName()),
            _("Export to label map"),
        )

    def onExportFile(self) -> None:
        from IrisSegmentLib.slicer_logic import scene_bridge

        path = qt.QFileDialog.getSaveFileName(
            slicer.util.mainWindow(), _("Export segmentation"), self._defaultFolder(),
            _("Slicer segmentation (*.seg.nrrd);;NIfTI label map (*.nii.gz);;NRRD label map (*.nrrd)"),
        )
        if not path:
            return
        path = os.path.abspath(path)
        # The dialog confirmed replacing the file itself; a sidecar (.ctbl) it would replace is asked for here.
        sidecars = self._guarded(lambda: [str(p) for p in scene_bridge.export_paths(path)[1:] if p.exists()], _("Export to file"))
        if sidecars is None:  # an unsupported file type: said in a message box
            return
        if sidecars and not slicer.util.confirmYesNoDisplay(
            _("{files} already exists and would be replaced by the names and colors of this export. Replace it?").format(files=", ".join(sidecars)),
            windowTitle=_("Export to file"),
        ):
            return
        node = self._parameterNode
        self._runAction(
            lambda: _("Wrote {files}.").format(files=", ".join(str(p) for p in scene_bridge.export_file(node.outputSegmentation, node.targetVolume, path, overwrite=True))),
            _("Export to file"),
        )

    def onEditInSegmentEditor(self) -> None:
        """Open the output in the Segment Editor, on the target scan (its source volume), to correct it."""
        node = self._parameterNode
        if not (node and node.outputSegmentation):
            return

        def open_editor():
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.modules.SegmentEditorWidget.editor
            editor.setSegmentationNode(node.outputSegmentation)
            if node.targetVolume is not None:
                setSource = getattr(editor, "setSourceVolumeNode", None) or editor.setMasterVolumeNode  # Slicer < 5.2: "master"
                setSource(node.targetVolume)

        self._guarded(open_editor, _("Open in Segment Editor"))


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
            self._sceneLogic.before_change = saveSegmentEditorUndoState
        return self._sceneLogic

    @property
    def currentSceneLogic(self):
        """The scene logic if something already needed it (never imports torch)."""
        return self._sceneLogic

    def shutdown(self) -> None:
        if self._sceneLogic is not None:
            self._sceneLogic.shutdown()

    def reset(self) -> None:
        """Scene closed: forget the task, Tune history and Undo (the model stays loaded)."""
        if self._sceneLogic is not None:
            self._sceneLogic.reset()

    @staticmethod
    def torchAvailable() -> bool:
        """torch is installed (never installs it)."""
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            return False
        return bool(PyTorchUtils.PyTorchUtilsLogic().torchInstalled())

    @staticmethod
    def _torchReady() -> bool:
        """torch through the PyTorch extension only, installed with the user's consent; every way this can
        fail ends in a message (IrisSegmentLib.slicer_logic.dialogs.ensure_torch)."""
        from IrisSegmentLib.slicer_logic.dialogs import ensure_torch

        try:
            import PyTorchUtils

            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        except ModuleNotFoundError:
            torchLogic = None
        return ensure_torch(torchLogic, slicer.util.confirmOkCancelDisplay, slicer.util.errorDisplay, TORCH_REQUIREMENT, busy=slicer.util.WaitCursor)


class IrisSegmentTest(ScriptedLoadableModuleTest):
    """The clinician's loop inside Slicer on the bundled sample pair (no network): Sample Data, segment,
    correct, tune, undo, save task, export. The loop needs PyTorch; without it that part is skipped, never
    downloaded."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_SampleData()
        self.setUp()
        self.test_IrisSegmentLoop()

    @staticmethod
    def _wait(job):
        """Collect the job as the panel does: wait on it (without Python's lock), let Qt run, poll."""
        while not job.tick(wait=0.05)[1]:
            slicer.app.processEvents()
        return job.result()

    @staticmethod
    def _masks(node, geometry) -> dict:
        segmentation = node.GetSegmentation()
        return {
            segmentation.GetSegment(s).GetName(): slicer.util.arrayFromSegmentBinaryLabelmap(node, s, geometry) > 0
            for s in (segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments()))
        }

    def test_SampleData(self) -> None:
        """The bundled pair is in Sample Data and loads from the installed files, with named segments."""
        import SampleData
        from IrisSegmentLib.slicer_logic import sample_data

        self.delayDisplay("Sample data")
        registerSampleData()  # what startupCompleted did; registering again changes nothing
        sampleDataLogic = SampleData.SampleDataLogic()
        source = sampleDataLogic.sourceForSampleName(sample_data.SAMPLE_NAME)
        self.assertIsNotNone(source, "the IrisSegment sample data is not registered")
        nodes = sampleDataLogic.downloadFromSource(source)  # local files: copied into the cache, checksums checked
        self.assertEqual([n.GetClassName() for n in nodes], ["vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLScalarVolumeNode"])
        sample = source.customDownloader(source)  # the Sample Data button
        self.assertEqual(sorted(self._masks(sample.reference_segmentation, sample.reference)), ["hippocampus anterior", "hippocampus posterior"])

    def test_IrisSegmentLoop(self) -> None:
        import numpy as np

        if not IrisSegmentLogic.torchAvailable():
            self.skipTest("PyTorch is not installed (PyTorch Utils module): the segment-tune loop needs it")
        from IrisSegmentLib.model.weights import default_weights_path
        from IrisSegmentLib.slicer_logic import Reference, sample_data

        self.delayDisplay("Loading the sample pair")
        sample = loadSampleData()
        self.assertIsNotNone(sample)
        logic = IrisSegmentLogic()
        sceneLogic = logic.sceneLogic()
        self.assertIsNotNone(sceneLogic)
        try:
            trained = default_weights_path().is_file()
            if not trained:
                # A development build without the bundled model: a small random one still exercises the loop.
                from IrisSegmentLib.inference.predictor import IrisPredictor
                from IrisSegmentLib.model.config import IrisConfig
                from IrisSegmentLib.model.iris import IrisModel

                logging.warning("IrisSegment test: no bundled weights at %s; using a random model", default_weights_path())
                sceneLogic.predictor = IrisPredictor(IrisModel(IrisConfig(channels=(8, 16, 32, 64), token_dim=32, context_tokens=4, working_size=64)))
            reference, target = sample.reference, sample.target
            referenceMasks = self._masks(sample.reference_segmentation, reference)

            self.delayDisplay("Segmenting")
            output = self._wait(sceneLogic.start_segment(target, [Reference(reference, sample.reference_segmentation)]))
            segments = [output.GetSegmentation().GetNthSegment(i) for i in range(output.GetSegmentation().GetNumberOfSegments())]
            references = [sample.reference_segmentation.GetSegmentation().GetNthSegment(i) for i in range(2)]
            self.assertEqual([s.GetName() for s in segments], [s.GetName() for s in references])
            self.assertEqual([s.GetColor() for s in segments], [s.GetColor() for s in references])
            result = self._masks(output, target)
            targetShape = slicer.util.arrayFromVolume(target).shape
            self.assertTrue(all(m.shape == targetShape for m in result.values()))
            unchanged = self._masks(sample.reference_segmentation, reference)
            self.assertTrue(all(np.array_equal(referenceMasks[k], unchanged[k]) for k in referenceMasks))
            truth = self._masks(sample_data.load_target_truth(), target)
            if trained:  # the bundled model finds both parts (the README's demo: Dice 0.88 on this pair)
                for name, mask in truth.items():
                    dice = 2 * (mask & result[name]).sum() / max(1, mask.sum() + result[name].sum())
                    self.assertGreater(dice, 0.5, name)

            self.delayDisplay("Correcting and tuning")
            posteriorId = output.GetSegmentation().GetSegmentIdBySegmentName("hippocampus posterior")
            corrected = truth["hippocampus posterior"]
            slicer.util.updateSegmentBinaryLabelmapFromArray(corrected.astype(np.uint8), output, posteriorId, target)
            note = output.GetSegmentation().AddEmptySegment("", "my note", [1.0, 1.0, 0.0])  # not a class: Tune keeps it
            slicer.util.updateSegmentBinaryLabelmapFromArray(corrected.astype(np.uint8), output, note, target)
            self._wait(sceneLogic.start_tune(target, output, steps=5))
            self.assertEqual(sceneLogic.kept_segments, ["my note"])
            self.assertTrue(np.array_equal(self._masks(output, target)["my note"], corrected))
            self.assertTrue(sceneLogic.can_undo)
            sceneLogic.undo()
            self.assertTrue(np.array_equal(self._masks(output, target)["hippocampus posterior"], corrected))

            self.delayDisplay("Saving and reusing the task")
            with tempfile.TemporaryDirectory() as folder:
                taskPath = sceneLogic.save_task(os.path.join(folder, "task.safetensors"))
                again = self._wait(sceneLogic.start_segment(target, [sceneLogic.load_task(taskPath)]))
                self.assertEqual(again.GetSegmentation().GetNumberOfSegments(), 2)

                self.delayDisplay("Exporting")
                from IrisSegmentLib.errors import IrisError
                from IrisSegmentLib.slicer_logic import scene_bridge

                labelmap = scene_bridge.export_labelmap(output, target)
                self.assertEqual(slicer.util.arrayFromVolume(labelmap).shape, targetShape)
                segPath = scene_bridge.export_file(output, target, os.path.join(folder, "result.seg.nrrd"))[0]
                with self.assertRaises(IrisError):  # never replaces a file unasked
                    scene_bridge.export_file(output, target, segPath)
                reloaded = slicer.util.loadSegmentation(str(segPath))
                expected = self._masks(output, target)
                self.assertTrue(all(np.array_equal(m, expected[name]) for name, m in self._masks(reloaded, target).items()))

            self.delayDisplay("Closing the scene")
            slicer.mrmlScene.Clear()
            logic.reset()
            self.assertFalse(sceneLogic.can_undo)
            self.assertIsNone(sceneLogic.task)
        finally:
            logic.shutdown()  # the worker thread ends with the test
        self.delayDisplay("Test passed")
