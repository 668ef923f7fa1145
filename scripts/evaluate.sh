#!/usr/bin/env bash
# Reproduce the model card's evaluation: the bundled model (one-shot, 3-reference ensemble, tuning on
# one corrected case, repeated on 3 such cases and averaged) against the registration baseline on the
# held-out cases of three development sets. Needs ../shared/data; writes reports/<dataset>/ (CSV, summary.md, plots)
# and reports/pooled.md (every method against one-shot over the three sets).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e ".[train]"
DATA=${DATA:-../shared/data}
for dataset in HeadNeck_CT Hippocampus_MRI Abdomen_MRI; do
    .venv/bin/iris-segment evaluate --data "$DATA/$dataset" --output "reports/$dataset" \
        --references 3 --strategy one-shot ensemble tune ${CASES:+--cases $CASES} "$@"
done
.venv/bin/iris-segment pool --reports reports/HeadNeck_CT reports/Hippocampus_MRI reports/Abdomen_MRI --output reports/pooled.md --overwrite
