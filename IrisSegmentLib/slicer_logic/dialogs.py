"""How the panel turns failures into messages, without Qt, so tests can check it.

The Slicer panel (IrisSegment/IrisSegment.py) imports `qt` and cannot be loaded outside Slicer; these
functions take the message box functions as arguments (the panel passes slicer.util's), so the same code
runs in the app and in tests. Nothing here imports qt or torch when the module is imported: torch is
imported by `ensure_torch` only once the PyTorch extension says it is installed.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, ContextManager, Optional, Protocol, TypeVar

from IrisSegmentLib.errors import Cancelled, IrisError

__all__ = ["TorchInstaller", "ensure_torch", "finished_job", "guarded"]

T = TypeVar("T")


def _describe(exc: BaseException) -> str:
    """The exception's text, or its type name when it has none (an empty message would say nothing)."""
    return str(exc) or type(exc).__name__


def guarded(action: Callable[[], T], what: str, show_error: Callable[[str], None]) -> Optional[T]:
    """Run `action`; every error ends in one message, never a bare traceback: an IrisError (input the user
    can fix) as its own text, anything else as `what` failed, with the traceback logged for the Python
    console. Returns the action's value, or None when it failed."""
    try:
        return action()
    except IrisError as exc:
        show_error(str(exc))
    except Exception as exc:  # noqa: BLE001 - the user gets a message, the console the traceback
        logging.exception("IrisSegment: %s failed", what)
        show_error(f"{what} failed: {_describe(exc)}. Details are in the Python console.")
    return None


def finished_job(result: Callable[[], T], what: str, show_error: Callable[[str], None]) -> tuple[str, Optional[T]]:
    """How a background job ended, from `result` (its Job.result): ("done", its value), ("cancelled", None)
    with no message (the user asked for it), or ("failed", None) after one message as `guarded` gives it."""

    def outcome() -> tuple[str, Optional[T]]:
        try:
            return "done", result()
        except Cancelled:
            return "cancelled", None

    ended = guarded(outcome, what, show_error)
    return ("failed", None) if ended is None else ended


class TorchInstaller(Protocol):
    """What ensure_torch uses of the PyTorch extension's PyTorchUtils.PyTorchUtilsLogic."""

    def torchInstalled(self) -> bool: ...

    def installTorch(self, askConfirmation: bool = ..., torchVersionRequirement: Optional[str] = ...) -> object: ...


def ensure_torch(
    torch_logic: Optional[TorchInstaller],
    confirm: Callable[[str], bool],
    show_error: Callable[[str], None],
    requirement: str,
    busy: Callable[[], ContextManager[object]] = contextlib.nullcontext,
) -> bool:
    """True when torch meeting `requirement` (">=X.Y") can be imported, installing it through the PyTorch
    extension if the user agrees (`confirm`): the extension picks the CUDA build that matches the driver.
    `torch_logic` is None when the extension is missing. `busy` wraps the download (the panel shows a wait
    cursor). Every way this can fail ends in one message and False (the extension's install raises on a
    failed download), except the user saying no, which is answer enough."""
    if torch_logic is None:
        show_error("IrisSegment needs the PyTorch extension: install 'PyTorch' in the Extensions Manager, then restart Slicer.")
        return False
    if not torch_logic.torchInstalled() and not _install_torch(torch_logic, confirm, show_error, requirement, busy):
        return False
    try:
        import torch
        from packaging.version import Version  # in Slicer's Python and in the test environment (via pytest)

        version = Version(torch.__version__.split("+")[0])
    except Exception as exc:  # noqa: BLE001 - a broken install: say so
        logging.exception("IrisSegment: importing PyTorch failed")
        show_error(
            f"PyTorch is installed but cannot be loaded ({_describe(exc)}): in the PyTorch Utils module Uninstall, "
            "restart Slicer, Install."
        )
        return False
    if version < Version(requirement.lstrip(">=")):
        show_error(
            f"PyTorch {torch.__version__} is too old for IrisSegment (needs {requirement}): update it in the PyTorch "
            "Utils module (Uninstall, restart Slicer, Install)."
        )
        return False
    return True


def _install_torch(
    torch_logic: TorchInstaller,
    confirm: Callable[[str], bool],
    show_error: Callable[[str], None],
    requirement: str,
    busy: Callable[[], ContextManager[object]],
) -> bool:
    """Ask, then install torch; True once it is importable. A refusal or a cancelled install is silent."""
    question = (
        "IrisSegment needs PyTorch, which is not installed. Download and install it now? "
        "This takes a few minutes and 1-3 GB; the build matching your GPU driver is chosen automatically."
    )
    if not confirm(question):
        return False
    failure = (
        "PyTorch could not be installed ({error}). Check the internet connection and the free disk space, then try "
        "again; or install it in the PyTorch Utils module (restart Slicer first if an earlier attempt failed). "
        "Details are in the Python console."
    )
    try:
        with busy():
            installed = torch_logic.installTorch(askConfirmation=False, torchVersionRequirement=requirement)
    except Exception as exc:  # noqa: BLE001 - pip/light-the-torch errors: a message, not a traceback
        logging.exception("IrisSegment: installing PyTorch failed")
        show_error(failure.format(error=_describe(exc)))
        return False
    if installed is None:  # the user cancelled inside the extension's own dialogs
        return False
    if not torch_logic.torchInstalled():
        show_error(failure.format(error="torch is still not importable"))
        return False
    return True
