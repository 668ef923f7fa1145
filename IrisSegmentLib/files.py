"""File names, error translation, size checks and atomic writes, shared by the file IO, the command line and the Slicer export (standard library only, so the panel can use it without nibabel)."""
from __future__ import annotations

import math
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import InputError, IrisError

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


def color_table_path(label_map: Path, suffix: str) -> Path:
    """`<stem>.ctbl` beside a NIfTI/NRRD label map ("case.nii.gz" -> "case.ctbl"): the sidecar that holds its names."""
    return label_map.with_name(file_stem(label_map, suffix) + ".ctbl")


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
    for sidecar in sidecars:  # a sidecar is part of its file: the same rule
        if sidecar.exists() and not overwrite:
            raise InputError(
                f"{sidecar} already exists and would be replaced by the one written with {target.name}; "
                "choose another name or pass overwrite=True to replace both."
            )
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


# The largest volume read: 2**30 voxels (1024^3, 4 GiB as float32), far beyond what the 128-voxel working
# cube needs; a header claiming more is corrupt or the scan must be cropped or downsampled first.
MAX_VOXELS = 1 << 30


def physical_memory() -> int | None:
    """This computer's memory in bytes, where the platform says (Linux, macOS); None elsewhere."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def check_volume_size(path: Path, shape: tuple[int, ...], itemsize: int, stored_bytes: int | None = None) -> None:
    """Refuse, from the header alone, a volume too large to load or larger than the file holds.

    `stored_bytes`: the bytes of voxel data the file holds when that is known without reading it (an
    uncompressed file); a header asking for more describes a truncated or corrupt file."""
    dims = [int(n) for n in shape]
    if any(n < 0 for n in dims):
        raise InputError(f"{path}: the header gives a negative size ({' x '.join(map(str, dims))}); the file is corrupt.")
    voxels = math.prod(dims)
    size = " x ".join(map(str, dims))
    needed = voxels * max(int(itemsize), 4)  # read, then held as float32 at least
    if stored_bytes is not None and voxels * int(itemsize) > stored_bytes:
        raise InputError(
            f"{path}: the header describes {size} voxels ({_size(voxels * int(itemsize))}) but the file holds only "
            f"{_size(stored_bytes)} of voxel data: it is truncated or corrupt."
        )
    memory = physical_memory()
    if voxels > MAX_VOXELS or (memory is not None and needed > memory):
        limit = f"at most {MAX_VOXELS:,} voxels" + (f" and this computer's {_size(memory)} of memory" if memory is not None else "")
        raise InputError(
            f"{path}: the header describes {size} voxels ({voxels:,} voxels, {_size(needed)} to load), more than IrisSegment "
            f"can load ({limit}). If the size is right, crop or downsample the scan first (Slicer: Crop Volume); "
            "otherwise the header is corrupt."
        )


def _size(count: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def check_writable_folder(path: Path, what: str = "output") -> None:
    """Refuse, before any work, an output whose folder is missing or cannot be written to.

    Tried by creating (and removing) an empty hidden file there: permission bits, read-only file systems
    and access-control lists all say no the same way, and root passes permission bits only where writing works."""
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"{what} folder {folder} does not exist: create it first.")
    probe = folder / f".{secrets.token_hex(4)}.{path.name}.probe"
    try:
        with open(probe, "xb"):
            pass
    except OSError as exc:
        raise InputError(f"cannot write {what} {path}: the folder {folder} is not writable ({_reason(exc)}); choose another folder.") from None
    probe.unlink(missing_ok=True)
