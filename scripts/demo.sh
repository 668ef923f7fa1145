#!/usr/bin/env bash
# Fresh machine: set up .venv, then segment the bundled sample target from the bundled reference
# with the bundled model, and score it against the sample's manual labels.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e ".[train]"
mkdir -p demo_output
S=Resources/SampleData
.venv/bin/iris-segment segment \
    --reference "$S/reference_image.nii.gz" "$S/reference_labels.nii.gz" \
    --target "$S/target_image.nii.gz" \
    --output demo_output/target_segmentation.seg.nrrd --overwrite
.venv/bin/iris-segment score --prediction demo_output/target_segmentation.seg.nrrd --truth "$S/target_truth.nii.gz"
