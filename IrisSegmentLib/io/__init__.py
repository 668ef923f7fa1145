"""Files in and out of the engine: 3D images and label maps as Volumes (IJK -> RAS affine).

Images: NIfTI (.nii, .nii.gz) and NRRD (.nrrd, .nhdr; LPS, RAS or LAS space).
Label maps: the same plus Slicer segmentations (.seg.nrrd) with segment names, colors and terminology.
Every problem with a file is an InputError naming the file; writes are atomic and never overwrite by accident.

This package is the only part of the engine that needs nibabel, pynrrd and slicerio (the "io" extra).
"""
from .images import read_image, write_image
from .segmentations import read_label_map, write_label_map

__all__ = ["read_image", "read_label_map", "write_image", "write_label_map"]
