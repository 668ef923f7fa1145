"""File-name handling, error translation and atomic writes shared by the image and label-map IO."""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import InputError, IrisError

# Longest first, so "x.seg.nrrd" is not taken for a plain ".nrrd" when segmentations are accepted.
_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr")


def file_format(path: Path, supported: tuple[str, ...], action: str) -> str:
    """The (lower-case) suffix that decides how `path` is read or written, or an error listing what is supported."""
    name = path.name.lower()
    found = next((suffix for suffix in _SUFFIXES if name.endswith(suffix) and len(name) > len(suffix)), None)
    if found in supported:
        return found
    kind = f"'{found}' files" if found else "this file type"
    raise InputError(f"{path}: cannot {action} {kind}; supported: {', '.join(supported)}.")


def file_stem(path: Path, suffix: str) -> str:
    """File name without its format suffix ("case_0000" for "case_0000.nii.gz"), used as the volume name."""
    return path.name[: -len(suffix)]


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextmanager
def reading(path: Path, what: str) -> Iterator[None]:
    """Check `path` is a file, and turn any library failure while parsing it into an InputError.

    nibabel, pynrrd and slicerio raise many exception types (zlib, EOF, header parse errors...);
    the user needs one sentence naming the file and the reason, not their traceback.
    """
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a {what} file (save DICOM series as NRRD or NIfTI in Slicer first).")
    if not path.is_file():
        raise InputError(f"{path}: file not found.")
    try:
        yield
    except (IrisError, MemoryError):
        raise
    except Exception as exc:
        raise InputError(
            f"{path}: could not read this {what} file ({_reason(exc)}). It may be truncated, corrupt or not a {what} file."
        ) from exc


@contextmanager
def staged_write(target: Path, *sidecars: Path, overwrite: bool) -> Iterator[list[Path]]:
    """Yield temporary paths beside `target` and its `sidecars`; move them into place only if the block succeeds.

    A crash or error while writing then never leaves a partial file under the final name (os.replace within
    one folder is atomic). Sidecars are moved first, so a complete `target` always has its sidecars.
    """
    if target.exists() and not overwrite:
        raise InputError(f"{target} already exists; choose another name or pass overwrite=True to replace it.")
    if not target.parent.is_dir():
        raise InputError(f"cannot write {target}: the folder {target.parent} does not exist; create it first.")
    finals = [target, *sidecars]
    # The temporary name keeps the final suffix, which tells nibabel and pynrrd what to write.
    temps = [final.with_name(f".{secrets.token_hex(4)}.{final.name}") for final in finals]
    try:
        yield temps
        for temp, final in reversed(list(zip(temps, finals))):
            os.replace(temp, final)
    except (IrisError, MemoryError):
        raise
    except Exception as exc:
        raise InputError(f"could not write {target} ({_reason(exc)}); nothing was written.") from exc
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
