"""Segment metadata shared by the engine, the file IO and the Slicer module (numpy only).

A label map's segments: {value: {"name": str, "color": (r, g, b) in 0..1, "terminology": Slicer
terminology tag (optional)}}. Every label gets a name and a color, so classes read the same everywhere.
"""
from __future__ import annotations

import colorsys

import numpy as np

from .errors import InputError

# SNOMED CT code of "Tissue", the category and type 3D Slicer gives every new segment: a tag made of it
# names no class, so it must not make different segments look like one class.
GENERIC_TISSUE_CODE = "85756007"


def class_terminology(tag: str | None) -> str:
    """The terminology tag when it names a class, '' for none or Slicer's generic default."""
    if not tag:
        return ""
    fields = tag.split("~")
    type_fields = fields[1:3]
    if len(type_fields) == 2 and all(f.split("^")[1:2] == [GENERIC_TISSUE_CODE] for f in type_fields):
        return ""
    return tag


def present_labels(labels: np.ndarray) -> list[int]:
    """Sorted non-zero values of a non-negative integer label array (of any integer, boolean or
    whole-number floating-point type, as Volume.check_label_map allows)."""
    top = int(labels.max())
    if top >= 1 << 16 or labels.dtype.kind not in "iub":
        return [int(v) for v in np.unique(labels) if v]
    # bincount is much faster than np.unique, but copies its input to int64: count in chunks to bound memory.
    counts = np.zeros(top + 1, dtype=np.int64)
    flat = labels.reshape(-1)
    chunk = 1 << 24
    for start in range(0, flat.size, chunk):
        counts += np.bincount(flat[start : start + chunk], minlength=top + 1)
    return [int(v) for v in np.flatnonzero(counts[1:]) + 1]


def default_color(value: int) -> tuple[float, float, float]:
    """A color fixed by the label value, so a label looks the same in every file and run.

    Hues step by the golden ratio, which keeps consecutive labels far apart on the color wheel; channels
    are rounded to 8 bits so the color survives a .ctbl round trip exactly.
    """
    rgb = colorsys.hsv_to_rgb((value * 0.618033988749895) % 1.0, 0.65, 0.95)
    return tuple(round(c * 255) / 255 for c in rgb)  # type: ignore[return-value]


def complete_segments(segments: dict, present: list[int]) -> dict[int, dict]:
    """Metadata for every given and present non-zero label: given names and colors kept, defaults filled in."""
    given = {int(value): segment or {} for value, segment in segments.items()}
    completed: dict[int, dict] = {}
    for value in sorted(set(given) | set(present)):
        if value == 0:
            continue
        segment = given.get(value, {})
        name = str(segment.get("name") or "").strip() or f"Segment_{value}"
        color = segment.get("color")
        color = tuple(float(c) for c in (default_color(value) if color is None else color))
        if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
            raise InputError(f"segment {name!r} (label {value}): color {color} must be three numbers in 0..1 (r, g, b).")
        completed[value] = {"name": name, "color": color}
        if segment.get("terminology"):
            completed[value]["terminology"] = str(segment["terminology"])
    return completed


def label_dtype(top: int) -> type:
    """Smallest unsigned type holding labels up to `top`: what Slicer, NIfTI and NRRD all handle."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return dtype
    raise InputError(f"label value {top} is too large; label values must be below 2**32.")
