"""IrisSegment engine: reference-guided (in-context) 3D medical image segmentation, Iris method.

Pure Python (torch, numpy and scipy at run time), importable without 3D Slicer.
"""
__version__ = "0.1.0"
