"""Label names stored beside NIfTI/NRRD label maps, which cannot hold them.

Two sources: a Slicer color table `<stem>.ctbl` next to the file (what Slicer and write_label_map use),
and the "labels" of an nnU-Net `dataset.json` two folders up (`<Dataset>/labelsTr/case.nii.gz`).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError

# Comment line of a .ctbl written by IrisSegment holding the exact segment names (JSON, label value -> name).
NAMES_COMMENT = "# IrisSegment names: "


def read_color_table(path: Path) -> dict[int, dict]:
    """Label value -> {"name", "color"} from a Slicer .ctbl (lines `value name r g b a`, 0-255, '#' comments)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: could not read this color table ({exc}); fix or remove it.") from exc
    segments: dict[int, dict] = {}
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        try:
            if len(fields) not in (5, 6):
                raise ValueError
            value = int(fields[0])
            rgb = [round(float(c)) for c in fields[2:5]]
            if value < 0 or not all(0 <= c <= 255 for c in rgb):
                raise ValueError
        except ValueError:
            raise InputError(
                f"{path}, line {number}: expected 'value name r g b a' with colors in 0-255, got {line.strip()!r}; "
                "fix or remove the color table."
            ) from None
        # As Slicer reads it: quotes (from scene files) dropped, underscores back to the spaces they stood for.
        segments[value] = {"name": fields[1].strip("'").replace("_", " "), "color": tuple(c / 255 for c in rgb)}
    # The exact names IrisSegment wrote, where the table's one-word name still matches them (a name edited
    # since, in Slicer or by hand, wins).
    for value, name in _exact_names(lines).items():
        if value in segments and _one_word(name) == _one_word(segments[value]["name"]):
            segments[value]["name"] = name
    return segments


def _one_word(name: str) -> str:
    """A name as a .ctbl stores it: one word, spaces written as underscores (as Slicer writes it)."""
    return "_".join(name.split())


def _exact_names(lines: list[str]) -> dict[int, str]:
    """Label value -> name from the NAMES_COMMENT line IrisSegment writes; {} without one or if it is damaged."""
    for line in lines:
        if line.startswith(NAMES_COMMENT):
            try:
                names = json.loads(line[len(NAMES_COMMENT):])
                return {int(value): name for value, name in names.items() if isinstance(name, str) and name.strip()}
            except (ValueError, AttributeError):
                return {}
    return {}


def write_color_table(segments: dict[int, dict], path: Path) -> None:
    """Write names and colors as a Slicer .ctbl.

    Names are one word in this format: as Slicer does, spaces are written as underscores, and Slicer reads
    every underscore back as a space. So that names round-trip exactly here ("kidney_left" stays
    "kidney_left", "front part" stays "front part"), the exact names are also written on a comment line
    (NAMES_COMMENT, JSON), which Slicer skips and read_color_table prefers.
    """
    lines = ["# Color table written by IrisSegment: value name r g b a (0-255)", "0 Background 0 0 0 0"]
    for value, segment in sorted(segments.items()):
        r, g, b = (round(c * 255) for c in segment["color"])
        lines.append(f"{value} {_one_word(segment['name'])} {r} {g} {b} 255")
    lines.append(NAMES_COMMENT + json.dumps({str(value): segment["name"] for value, segment in sorted(segments.items())}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def parse_label_table(labels: dict) -> tuple[dict[int, str], list[tuple[object, object]]]:
    """The "labels" table of a dataset.json as (label value -> name, entries that name no single label value).

    Accepts nnU-Net v2 ("name": value) and the older MSD / nnU-Net v1 form ("value": "name"); anything else,
    such as an nnU-Net region (a name for a list of values), is returned as a (key, value) pair, in table order.
    """
    names: dict[int, str] = {}
    others: list[tuple[object, object]] = []
    for key, value in labels.items():
        if isinstance(value, int) and not isinstance(value, bool):
            names[value] = str(key)
        elif isinstance(value, str) and str(key).isdigit():
            names[int(key)] = value
        else:
            others.append((key, value))
    return names, others


def dataset_label_names(label_map: Path) -> dict[int, str]:
    """Label value -> name from `<Dataset>/dataset.json` for `<Dataset>/<labels folder>/<case>`; {} if there is none.

    Accepts nnU-Net v2 ("name": value) and the older MSD / nnU-Net v1 form ("value": "name"); region
    entries (a name for a list of values) name no single label and are skipped.
    """
    json_path = label_map.absolute().parent.parent / "dataset.json"
    if not json_path.is_file():
        return {}
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(
            f"{json_path}: could not be read as JSON ({exc}); it names the labels of {label_map.name}: fix or move it."
        ) from exc
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(labels, dict):
        return {}
    return parse_label_table(labels)[0]
