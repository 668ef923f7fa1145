"""Errors a user can act on.

Every check of user input raises one of these with a sentence that says what is wrong
and what to do, so the CLI and the Slicer panel can show it as is instead of a traceback.
"""


class IrisError(Exception):
    """Base class: an error whose message is meant for the user."""


class InputError(IrisError, ValueError):
    """An image, label map or option the user gave cannot be used as it is."""


class WeightsError(IrisError):
    """A weights or task-embedding file is missing, corrupt, foreign or from another model."""


class DeviceError(IrisError):
    """The requested compute device is not available or ran out of memory."""


class Cancelled(IrisError):
    """The user cancelled a running job; nothing was written."""
