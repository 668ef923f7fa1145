"""The panel's failures end in one message, never a bare traceback (issue 16).

IrisSegment/IrisSegment.py imports qt and cannot be loaded here, so how it turns errors into messages
and installs PyTorch lives in IrisSegmentLib.slicer_logic.dialogs, with the message box functions as
arguments: these tests pass a list's append where the panel passes slicer.util.errorDisplay, and check
(by parsing the module file) that the panel really calls these functions.
"""
from __future__ import annotations

import ast
import contextlib
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from IrisSegmentLib.errors import Cancelled, InputError
from IrisSegmentLib.slicer_logic.dialogs import ensure_torch, finished_job, guarded
from IrisSegmentLib.slicer_logic.worker import Job, Worker

ROOT = Path(__file__).resolve().parents[1]
TORCH_REQUIREMENT = ">=2.2"  # the panel's (IrisSegment.py); test_the_panel_calls_the_tested_functions checks it


class FakePyTorchUtilsLogic:
    """Stands in for PyTorchUtils.PyTorchUtilsLogic, the logic of the PyTorch Slicer extension, which is
    external and exists only inside Slicer with that extension installed.

    `installed`: what torchInstalled() says before any install; installTorch records its arguments and
    whether the wait cursor was on, then raises `install_error` if given, else makes torchInstalled() say
    `importable_after` and returns `install_result` (None: the user cancelled in the extension's dialog)."""

    def __init__(self, installed: bool = False, install_result: object = "torch module", install_error: Exception | None = None,
                 importable_after: bool = True, busy: list[bool] | None = None) -> None:
        self.installed, self.install_result, self.install_error, self.importable_after = installed, install_result, install_error, importable_after
        self.busy = busy if busy is not None else []
        self.install_calls: list[dict] = []

    def torchInstalled(self) -> bool:
        return self.installed

    def installTorch(self, **kwargs) -> object:
        self.install_calls.append({**kwargs, "busy": bool(self.busy)})
        if self.install_error is not None:
            raise self.install_error
        self.installed = self.importable_after
        return self.install_result


def _ensure(torch_logic, answer: bool = True, requirement: str = TORCH_REQUIREMENT, busy=contextlib.nullcontext):
    """ensure_torch with the user answering `answer`: (its result, the messages shown, the questions asked)."""
    messages: list[str] = []
    questions: list[str] = []

    def confirm(question: str) -> bool:
        questions.append(question)
        return answer

    return ensure_torch(torch_logic, confirm, messages.append, requirement, busy=busy), messages, questions


# ------------------------------------------------------------------ guarded: any action of the panel
def test_an_unexpected_error_is_one_message_naming_the_action_with_the_traceback_in_the_console(caplog):
    messages: list[str] = []

    def save():
        raise PermissionError("[Errno 13] Permission denied: '/x'")

    with caplog.at_level(logging.ERROR):
        assert guarded(save, "Save task", messages.append) is None
    assert messages == ["Save task failed: [Errno 13] Permission denied: '/x'. Details are in the Python console."]
    [record] = caplog.records
    assert "Save task" in record.getMessage() and record.exc_info[0] is PermissionError


def test_an_iris_error_is_shown_as_its_own_text(caplog):
    messages: list[str] = []

    def load():
        raise InputError("the task file has no classes: save a task after segmenting.")

    assert guarded(load, "Add task file", messages.append) is None
    assert messages == ["the task file has no classes: save a task after segmenting."]
    assert not caplog.records  # the user's to fix, not a bug: no traceback


def test_an_error_without_text_is_named_by_its_type():
    messages: list[str] = []

    def export():
        raise RuntimeError()

    assert guarded(export, "Export to file", messages.append) is None
    assert messages == ["Export to file failed: RuntimeError. Details are in the Python console."]


def test_a_successful_action_returns_its_value_and_shows_nothing():
    messages: list[str] = []
    assert guarded(lambda: [], "Export to file", messages.append) == []  # a falsy value is still a success
    assert guarded(lambda: "Restored 'Output'.", "Undo", messages.append) == "Restored 'Output'."
    assert messages == []


# ------------------------------------------------------------------ finished_job: a background job's end
def _ended(work, finish=lambda value: value) -> Job:
    """A Job run to its end on a real worker thread, as the panel's Segment/Tune jobs are."""
    worker = Worker()
    try:
        job = worker.submit(Job("Segment", work, finish))
        assert job.wait(30)
    finally:
        worker.shutdown(30)
    return job


def test_a_job_that_raised_without_text_is_one_message_naming_the_job(caplog):
    messages: list[str] = []

    def work(progress, cancelled):
        raise MemoryError()

    with caplog.at_level(logging.ERROR):
        assert finished_job(_ended(work).result, "Segment", messages.append) == ("failed", None)
    assert messages == ["Segment failed: MemoryError. Details are in the Python console."]
    [record] = caplog.records
    assert record.exc_info[0] is MemoryError


def test_a_job_refused_for_its_input_shows_the_reason_only():
    messages: list[str] = []

    def work(progress, cancelled):
        raise InputError("the reference segmentation is empty: paint at least one segment.")

    assert finished_job(_ended(work).result, "Segment", messages.append) == ("failed", None)
    assert messages == ["the reference segmentation is empty: paint at least one segment."]


def test_a_cancelled_job_is_silent_and_its_result_dropped():
    messages: list[str] = []
    applied: list[str] = []

    def work(progress, cancelled):
        raise Cancelled("cancelled by the user; nothing was changed.")

    assert finished_job(_ended(work, applied.append).result, "Tune", messages.append) == ("cancelled", None)
    assert messages == [] and applied == []


def test_a_finished_job_hands_back_what_its_finish_step_made():
    messages: list[str] = []
    status, outcome = finished_job(_ended(lambda progress, cancelled: 3, lambda value: f"{value} segments").result, "Segment", messages.append)
    assert (status, outcome, messages) == ("done", "3 segments", [])


# ------------------------------------------------------------------ ensure_torch: PyTorch on demand
def test_without_the_pytorch_extension_the_message_points_to_the_extensions_manager():
    ready, messages, questions = _ensure(None)
    assert ready is False and questions == []
    assert len(messages) == 1 and "'PyTorch' in the Extensions Manager" in messages[0]


def test_declining_the_install_is_silent_and_installs_nothing():
    torch_logic = FakePyTorchUtilsLogic(installed=False)
    ready, messages, questions = _ensure(torch_logic, answer=False)
    assert ready is False and messages == [] and torch_logic.install_calls == []
    assert len(questions) == 1 and "Download and install it now?" in questions[0]


@pytest.mark.parametrize("error", [
    subprocess.CalledProcessError(1, ["python", "-m", "pip", "install", "torch"]),  # pip failed (no network, no disk space)
    RuntimeError("light-the-torch could not find a torch build for this platform"),
    RuntimeError(),
], ids=["pip", "light-the-torch", "no text"])
def test_a_failed_install_is_one_message_not_a_traceback(error, caplog):
    torch_logic = FakePyTorchUtilsLogic(installed=False, install_error=error)
    with caplog.at_level(logging.ERROR):
        ready, messages, _ = _ensure(torch_logic)  # would raise if the install's error escaped
    assert ready is False and len(messages) == 1
    assert f"PyTorch could not be installed ({str(error) or type(error).__name__})" in messages[0]
    assert "try again" in messages[0] and "Details are in the Python console" in messages[0]
    assert [record.exc_info[1] for record in caplog.records] == [error]


def test_an_install_the_user_cancelled_is_silent():
    torch_logic = FakePyTorchUtilsLogic(installed=False, install_result=None, importable_after=False)
    ready, messages, _ = _ensure(torch_logic)
    assert ready is False and messages == [] and len(torch_logic.install_calls) == 1


def test_an_install_that_leaves_torch_unimportable_is_a_message():
    torch_logic = FakePyTorchUtilsLogic(installed=False, importable_after=False)
    ready, messages, _ = _ensure(torch_logic)
    assert ready is False and len(messages) == 1
    assert "PyTorch could not be installed (torch is still not importable)" in messages[0]


def test_the_install_asks_for_the_required_version_without_asking_again_under_a_wait_cursor():
    busy: list[bool] = []

    @contextlib.contextmanager
    def wait_cursor():
        busy.append(True)
        try:
            yield
        finally:
            busy.pop()

    torch_logic = FakePyTorchUtilsLogic(installed=False, busy=busy)
    ready, messages, questions = _ensure(torch_logic, busy=wait_cursor)
    assert ready is True and messages == [] and len(questions) == 1  # the installed torch (this test's) is new enough
    assert torch_logic.install_calls == [{"askConfirmation": False, "torchVersionRequirement": TORCH_REQUIREMENT, "busy": True}]
    assert busy == []  # the wait cursor is off again


def test_torch_older_than_required_is_a_message():
    ready, messages, questions = _ensure(FakePyTorchUtilsLogic(installed=True), requirement=">=99.0")
    assert ready is False and questions == []
    assert len(messages) == 1 and f"PyTorch {torch.__version__} is too old for IrisSegment (needs >=99.0)" in messages[0]


def test_installed_torch_meeting_the_requirement_is_ready_without_a_question():
    torch_logic = FakePyTorchUtilsLogic(installed=True)
    assert _ensure(torch_logic) == (True, [], [])
    assert torch_logic.install_calls == []


def test_torch_that_is_installed_but_cannot_be_imported_is_a_message(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError, as a broken install does
    ready, messages, _ = _ensure(FakePyTorchUtilsLogic(installed=True))
    assert ready is False and len(messages) == 1 and "PyTorch is installed but cannot be loaded" in messages[0]
    assert caplog.records and issubclass(caplog.records[0].exc_info[0], ImportError)


# ------------------------------------------------------------------ the panel calls the tested code
def _function(tree: ast.Module, name: str) -> ast.FunctionDef:
    [function] = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == name]
    return function


def _returned_call(function: ast.FunctionDef, callee: str) -> ast.Call:
    """The `return callee(...)` of `function`, which imports `callee` from IrisSegmentLib.slicer_logic.dialogs."""
    imports = [node for node in ast.walk(function) if isinstance(node, ast.ImportFrom) and node.module == "IrisSegmentLib.slicer_logic.dialogs"]
    assert any(alias.name == callee for node in imports for alias in node.names), f"{function.name} does not import {callee}"
    calls = [node.value for node in ast.walk(function)
             if isinstance(node, ast.Return) and isinstance(node.value, ast.Call) and ast.unparse(node.value.func) == callee]
    assert len(calls) == 1, f"{function.name} does not return {callee}(...)"
    return calls[0]


def test_the_panel_calls_the_tested_functions():
    """IrisSegment.py's _guarded, _collectJob and _torchReady are these functions with Slicer's message boxes."""
    source = (ROOT / "IrisSegment" / "IrisSegment.py").read_text()
    tree = ast.parse(source)

    call = _returned_call(_function(tree, "_guarded"), "guarded")
    assert [ast.unparse(arg) for arg in call.args] == ["action", "what", "slicer.util.errorDisplay"]

    collect = _function(tree, "_collectJob")
    [call] = [node for node in ast.walk(collect) if isinstance(node, ast.Call) and ast.unparse(node.func) == "finished_job"]
    assert [ast.unparse(arg) for arg in call.args] == ["job.result", "job.title", "slicer.util.errorDisplay"]
    assert "errorDisplay" not in ast.unparse(collect).replace("finished_job(job.result, job.title, slicer.util.errorDisplay)", "")

    torch_ready = _function(tree, "_torchReady")
    call = _returned_call(torch_ready, "ensure_torch")
    assert [ast.unparse(arg) for arg in call.args] == [
        "torchLogic", "slicer.util.confirmOkCancelDisplay", "slicer.util.errorDisplay", "TORCH_REQUIREMENT"]
    assert {keyword.arg: ast.unparse(keyword.value) for keyword in call.keywords} == {"busy": "slicer.util.WaitCursor"}
    assert "PyTorchUtils.PyTorchUtilsLogic()" in ast.unparse(torch_ready)
    assert f'TORCH_REQUIREMENT = "{TORCH_REQUIREMENT}"' in source
