"""Read and write 3D scalar images (NIfTI, NRRD) as Volumes whose affine maps (i, j, k) to RAS.

NIfTI stores RAS already. NRRD stores a 'space' (Slicer writes left-posterior-superior) with per-axis
'space directions' and a 'space origin'; they are flipped into RAS here so every file lands on the same
world grid Slicer shows.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np

from ..errors import InputError
from ..volume import Volume
from ..files import check_volume_size, file_format, file_stem, reading, staged_write

READ_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr")
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd")

# LPS <-> RAS negates x and y; the matrix is its own inverse.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# NRRD 'space' values we understand -> per-axis signs taking that frame to RAS.
_NRRD_SPACES = {
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
}


def read_image(path: str | Path) -> Volume:
    """Read a 3D image (.nii, .nii.gz, .nrrd, .nhdr); every problem is an InputError naming the file.

    Intensities are returned as stored (after NIfTI scaling); NaN voxels are left for the caller to judge.
    """
    path = Path(path)
    suffix = file_format(path, READ_SUFFIXES, "read an image from")
    array, affine = read_voxels(path, suffix)
    volume = Volume(array, affine, name=str(path))  # geometry and voxel-type errors then name the full path
    volume.check_voxel_type()
    volume.name = file_stem(path, suffix)
    return volume


def write_image(volume: Volume, path: str | Path, overwrite: bool = False) -> None:
    """Write `volume` to .nii, .nii.gz or .nrrd on its exact grid, atomically; refuse to replace a file unless `overwrite`."""
    path = Path(path)
    suffix = file_format(path, WRITE_SUFFIXES, "write an image as")
    array = volume.array
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:  # neither format stores half floats
        array = array.astype(np.float32)
    with staged_write(path, overwrite=overwrite) as (temp,):
        write_voxels(array, volume.affine, temp, suffix)


def read_voxels(path: Path, suffix: str) -> tuple[np.ndarray, np.ndarray]:
    """The 3D voxel array (native byte order) and IJK->RAS affine of a NIfTI or NRRD file."""
    if suffix in (".nii", ".nii.gz"):
        with reading(path, "NIfTI"):
            image = nib.load(str(path), mmap=False)
            stored = None
            if suffix == ".nii":  # uncompressed: the file's size says how many voxel bytes it holds
                stored = max(0, path.stat().st_size - int(getattr(image.dataobj, "offset", 352)))
            check_volume_size(path, image.header.get_data_shape(), image.header.get_data_dtype().itemsize, stored)
            array = np.asanyarray(image.dataobj)
            # NIfTI axes 1-3 are space, 4 is time, 5 holds vector components.
            return _single_volume(array, min(array.ndim, 3), path), image.affine
    with reading(path, "NRRD"):
        check_nrrd_size(path)
        array, header = nrrd.read(str(path))
        spatial = _nrrd_spatial_axes(header, array.ndim, path)
        array = np.moveaxis(array, spatial, list(range(len(spatial))))
        return _single_volume(array, len(spatial), path), _nrrd_affine(header, spatial, path)


def check_nrrd_size(path: Path) -> None:
    """Refuse a NRRD whose header asks for more voxels than can be loaded, before reading them."""
    header = nrrd.read_header(str(path))
    try:
        itemsize = nrrd.reader._determine_datatype(header).itemsize
    except Exception:  # an unknown type is reported when the file is read; assume the widest here
        itemsize = 8
    check_volume_size(path, tuple(header.get("sizes", ())), itemsize)


def write_voxels(array: np.ndarray, affine: np.ndarray, path: Path, suffix: str) -> None:
    """Write a 3D array on an IJK->RAS grid as NIfTI (RAS) or NRRD (LPS, as Slicer writes it)."""
    if suffix in (".nii", ".nii.gz"):
        image = nib.Nifti1Image(array, affine, dtype=array.dtype)
        # Both codes set, so tools that prefer the qform (ITK, Slicer) and the sform (nibabel) agree.
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        image.header.set_xyzt_units("mm")
        nib.save(image, str(path))
        return
    lps = LPS_TO_RAS @ affine
    header = {
        "space": "left-posterior-superior",
        "space directions": lps[:3, :3].T,
        "space origin": lps[:3, 3],
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
    }
    nrrd.write(str(path), array, header)


def _single_volume(array: np.ndarray, n_spatial: int, path: Path) -> np.ndarray:
    """The 3D array of a file whose spatial axes come first; 2D images and series or multi-channel data are refused."""
    if n_spatial != 3:
        raise InputError(
            f"{path} is a {n_spatial}D image (shape {array.shape}); IrisSegment needs a 3D volume (a stack of slices)."
        )
    count = int(np.prod(array.shape[3:]))
    if count > 1:
        raise InputError(
            f"{path} holds {count} volumes or channels (shape {array.shape}); give a single 3D volume "
            "(split the time series or pick one channel first)."
        )
    array = array.reshape(array.shape[:3])
    # Torch and most numpy code need native byte order; big-endian files are common from older scanners.
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def _nrrd_spatial_axes(header: dict, ndim: int, path: Path) -> list[int]:
    """Indices of the world axes: those with a space direction, else 'domain'/'space' kinds, else the first three."""
    if "space directions" in header:
        directions = np.asarray(header["space directions"], dtype=np.float64)
        # A non-spatial axis (channels, time) has direction 'none', which pynrrd reads as a row of NaN.
        broken = [axis for axis in range(ndim) if np.any(np.isfinite(directions[axis])) and not np.all(np.isfinite(directions[axis]))]
        if broken:
            raise InputError(f"{path}: NRRD 'space directions' of axis {broken[0]} mix numbers and NaN ({directions[broken[0]].tolist()}); fix the header.")
        return [axis for axis in range(ndim) if np.all(np.isfinite(directions[axis]))]
    if "kinds" in header:
        return [axis for axis, kind in enumerate(header["kinds"]) if kind in ("domain", "space")]
    return list(range(min(ndim, 3)))


def _nrrd_affine(header: dict, spatial: list[int], path: Path) -> np.ndarray:
    """IJK->RAS from the NRRD header; a file without 'space' is taken as LPS, as ITK and Slicer read it."""
    space = str(header.get("space", "left-posterior-superior"))
    signs = _NRRD_SPACES.get(space.lower())
    if signs is None:
        raise InputError(
            f"{path}: NRRD space '{space}' is not supported; supported: left-posterior-superior (Slicer's default), "
            "right-anterior-superior, left-anterior-superior."
        )
    affine = np.eye(4)
    if "space directions" in header:
        affine[:3, :3] = np.asarray(header["space directions"], dtype=np.float64)[spatial].T
        affine[:3, 3] = header.get("space origin", np.zeros(3))
    else:
        spacings = np.asarray(header.get("spacings", np.ones(max(spatial) + 1)), dtype=np.float64)[spatial]
        affine[:3, :3] = np.diag(np.where(np.isfinite(spacings), spacings, 1.0))
    return np.diag([*signs, 1.0]) @ affine
