"""Errors a user can act on.

Every check of user input raises one of these with a sentence that says what is wrong
and what to do, so the CLI and the Slicer panel can show it as is instead of a traceback.
"""


class IrisError(Exception):
    """Base class: an error whose message is meant for the user."""


class InputError(IrisError, ValueError):
    """An image, label map or option the user gave cannot be used as it is."""


class ModalityMismatch(InputError):
    """The references' modality (CT or MR) is not the target's.

    `reference` and `target` name the two modalities, so each front end can say how to override the
    check in its own words (the CLI's --allow-modality-mismatch, the panel's check box)."""

    def __init__(self, reference: str, target: str) -> None:
        self.reference, self.target = reference, target
        super().__init__(
            f"the reference is {reference} but the target looks like {target}: use a reference of the target's modality "
            "(or override the modality check if you are sure; results are then unreliable)."
        )


class WeightsError(IrisError):
    """A weights or task-embedding file is missing, corrupt, foreign or from another model."""


class DeviceError(IrisError):
    """The requested compute device is not available or ran out of memory."""


class Cancelled(IrisError):
    """The user cancelled a running job; nothing was written."""
